"""``sapa compare``: table / JSON shape, determinism (same seed -> same numbers, whatever the number
of jobs), the figure, and errors."""
from __future__ import annotations

import json

import pytest

from sapa.cli import main
from sapa.engine.compare import format_table, run_compare

SMALL = ["data.image_size=32", "train.max_iters=4", "data.train_samples=16", "data.val_samples=4",
         "model.widths=(8, 8, 16, 16)"]
KEYS = {"upsampler", "gflops", "params_m", "miou", "biou", "latency_ms"}


def test_same_seed_same_numbers_and_row_shape(tmp_path):
    a = run_compare(["bilinear", "sapa_b"], overrides=SMALL, jobs=1, output=tmp_path / "a", progress=False)
    b = run_compare(["bilinear", "sapa_b"], overrides=SMALL, jobs=1, output=None, progress=False)
    assert [r["upsampler"] for r in a.rows] == ["bilinear", "sapa_b"]
    for ra, rb in zip(a.rows, b.rows):
        assert KEYS <= set(ra)
        assert (ra["miou"], ra["biou"], ra["gflops"], ra["params_m"]) == (rb["miou"], rb["biou"], rb["gflops"],
                                                                          rb["params_m"])
        assert 0 <= ra["miou"] <= 100 and 0 <= ra["biou"] <= 100 and ra["latency_ms"] > 0
    ra = {r["upsampler"]: r for r in a.rows}
    assert ra["sapa_b"]["params_m"] > ra["bilinear"]["params_m"]   # six SAPA-B modules add parameters
    assert ra["sapa_b"]["gflops"] > ra["bilinear"]["gflops"]
    assert json.loads((tmp_path / "a" / "compare.json").read_text()) == a.rows
    assert (tmp_path / "a" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    table = format_table(a)
    assert "GFLOPs" in table and "bIoU" in table and "sapa_b" in table


def test_jobs_do_not_change_the_numbers_and_seeds_give_mean_std():
    one = run_compare(["bilinear"], seeds=2, overrides=SMALL, jobs=1, progress=False, figure=False)
    two = run_compare(["bilinear"], seeds=2, overrides=SMALL, jobs=2, progress=False, figure=False)
    r1, r2 = one.rows[0], two.rows[0]
    assert r1["miou_runs"] == r2["miou_runs"] and r1["biou_runs"] == r2["biou_runs"]
    assert r1["seeds"] == [0, 1] and r1["miou_runs"][0] != r1["miou_runs"][1]
    mean = sum(r1["miou_runs"]) / 2
    assert r1["miou"] == pytest.approx(mean, abs=0.006)
    assert "±" in format_table(one)


def test_cli_json_output_and_errors(tmp_path, capsys):
    args = ["compare", "--upsamplers", "nearest", "--output", str(tmp_path), "--no-progress", "--no-figure",
            "--json", "-"]
    for o in SMALL:
        args += ["--set", o]
    assert main(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and KEYS <= set(rows[0]) and rows[0]["upsampler"] == "nearest"
    assert main(["compare", "--upsamplers", "no_such_upsampler", "--no-progress"]) == 2
    assert "no_such_upsampler" in capsys.readouterr().err
    assert main(["compare", "--set", "optim.nope=1", "--no-progress"]) == 2
    assert "optim.nope" in capsys.readouterr().err
