"""``sapa compare``: the demo's default settings (128 px, the published modules, dropout 0.1, one
evaluation rule), the paired differences to bilinear and the noise labels, table / JSON shape,
determinism (same seed -> same numbers, whatever the number of jobs), the figure, and errors."""
from __future__ import annotations

import json
import os

import pytest

import sapa.engine.compare as cmp
from sapa.cli import main
from sapa.engine.compare import CompareResult, build_config, format_table, geometric_padding_share, run_compare

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
    assert ra["sapa_b"]["d_miou"] == pytest.approx(ra["sapa_b"]["miou"] - ra["bilinear"]["miou"], abs=0.011)
    # 32 px input: the SAPA-B windows sit on 1x1, 2x2 and 4x4 maps; a uniform kernel puts 96 / 84 / 51 %
    # of its weight on padding, and any kernel puts all of it there on a 1x1 map but the centre tap
    pad = ra["sapa_b"]["padding_share"]
    assert list(pad) == ["1/32 (1x1)", "1/16 (2x2)", "1/8 (4x4)"]
    assert [v["uniform"] for v in pad.values()] == [0.96, 0.84, 0.51]
    assert all(0 < v["softmax"] < 1 for v in pad.values()) and "padding_share" not in ra["bilinear"]
    assert json.loads((tmp_path / "a" / "compare.json").read_text()) == a.rows
    assert (tmp_path / "a" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    table = format_table(a)
    assert "GFLOPs" in table and "bIoU" in table and "sapa_b" in table


def test_jobs_do_not_change_the_numbers_and_seeds_give_mean_std():
    before = os.environ.get("NUMBA_NUM_THREADS")
    one = run_compare(["bilinear"], seeds=2, overrides=SMALL, jobs=1, progress=False, figure=False)
    two = run_compare(["bilinear"], seeds=2, overrides=SMALL, jobs=2, progress=False, figure=False)
    r1, r2 = one.rows[0], two.rows[0]
    assert r1["miou_runs"] == r2["miou_runs"] and r1["biou_runs"] == r2["biou_runs"]
    assert r1["seeds"] == [0, 1] and r1["miou_runs"][0] != r1["miou_runs"][1]
    # the parent's thread settings are back (numba refuses a changed NUMBA_NUM_THREADS at its next compile)
    assert os.environ.get("NUMBA_NUM_THREADS") == before
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
    # bilinear, the reference of the paired differences, is always run
    assert [r["upsampler"] for r in rows] == ["bilinear", "nearest"] and KEYS <= set(rows[1])
    assert rows[0]["d_miou"] == 0.0 and rows[1]["d_miou"] == pytest.approx(rows[1]["miou"] - rows[0]["miou"], abs=0.011)
    assert main(["compare", "--upsamplers", "no_such_upsampler", "--no-progress"]) == 2
    assert "no_such_upsampler" in capsys.readouterr().err
    assert main(["compare", "--set", "optim.nope=1", "--no-progress"]) == 2
    assert "optim.nope" in capsys.readouterr().err


def test_demo_defaults_are_the_fair_miniature():
    """128 px, head dropout 0.1, one evaluation after the last iteration for every method, and the
    host builds the published SegFormer modules (NeurIPS SAPA-B, gated FADE)."""
    from sapa.engine.builders import build_model
    from sapa.nn._layers import LayerNorm2d, Linear2d

    for name in ("bilinear", "sapa_b", "fade", "sapa_d"):
        cfg = build_config(name, 0)
        assert (cfg.data.image_size, cfg.model.dropout, cfg.model.embed_dim) == (128, 0.1, 64)
        assert cfg.train.eval_interval == 0 and cfg.train.max_iters == 450 and cfg.data.batch_size == 8
        assert cfg.model.upsampler == name
    assert cmp.EVAL_RULE == "last"
    model = build_model(build_config("sapa_b", 0))
    up = model.decode_head.upsamplers[0]
    assert up.version == "neurips" and type(up.norm_x) is LayerNorm2d and type(up.q) is Linear2d
    assert up.q.out_features == 32
    assert model.decode_head.dropout.p == 0.1
    assert build_model(build_config("fade", 0)).decode_head.upsamplers[0].gating is True


def _fake_runs(values: dict[str, list[tuple[float, float]]]) -> list[dict]:
    return [{"upsampler": n, "seed": s, "miou": m / 100, "biou": b / 100}
            for n, vs in values.items() for s, (m, b) in enumerate(vs)]


COSTS = {n: {"gflops": 0.1, "params_m": 0.3, "latency_ms": 1.0} for n in ("bilinear", "a", "b")}


def test_paired_differences_spread_and_noise_labels():
    # mIoU per seed; differences to bilinear: a: +2, +3, +4 (mean 3, sd 1); b: +0, -1, +1 (mean 0, sd 1)
    runs = _fake_runs({"bilinear": [(70, 50), (71, 51), (72, 52)], "a": [(72, 53), (74, 53), (76, 53)],
                       "b": [(70, 50), (70, 51), (73, 52)]})
    rows, spread = cmp.summarise(runs, ["bilinear", "a", "b"], COSTS, 3)
    r = {x["upsampler"]: x for x in rows}
    assert r["a"]["d_miou_runs"] == [2.0, 3.0, 4.0] and r["a"]["d_miou"] == 3.0 and r["a"]["d_miou_std"] == 1.0
    assert r["b"]["d_miou_runs"] == [0.0, -1.0, 1.0] and r["b"]["d_miou"] == 0.0
    assert spread["miou"] == 1.0  # sqrt(mean(1, 1))
    # bIoU differences: a: +3, +2, +1 (sd 1); b: 0, 0, 0 (sd 0) -> pooled sqrt(0.5)
    assert spread["biou"] == round(0.5 ** 0.5, 2)
    assert r["a"]["miou_within_noise"] is False and r["b"]["miou_within_noise"] is True
    assert r["bilinear"]["d_miou"] == 0.0 and r["bilinear"]["miou_within_noise"] is None
    res = CompareResult(rows, runs, {"host": "h", "image_size": 128, "iters": 1, "batch_size": 1, "val_samples": 1,
                                     "seeds": 3, "spread": spread}, 0.0)
    table = format_table(res)
    line = {ln.split()[0]: ln for ln in table.splitlines() if not ln.startswith("#")}
    assert "+0.00 ± 1.00 within noise" in line["b"] and "+3.00 ± 1.00" in line["a"]
    assert "within noise" not in line["a"].split("+3.00")[1].split("  ")[0]
    assert "(reference)" in line["bilinear"] and "mIoU 1.00" in table


def test_one_seed_uses_the_recorded_spread_only_for_the_default_settings(monkeypatch):
    runs = _fake_runs({"bilinear": [(70, 50)], "a": [(70.5, 52)]})
    monkeypatch.setattr(cmp, "MEASURED_SPREAD", {"miou": 0.8, "biou": 1.0, "command": "sapa compare --seeds 3"})
    rows, spread = cmp.summarise(runs, ["bilinear", "a"], COSTS, 1, default_settings=True)
    assert spread["source"] == "sapa compare --seeds 3"
    assert rows[1]["miou_within_noise"] is True and rows[1]["biou_within_noise"] is False  # 0.5 < 0.8; 2 > 1
    rows, spread = cmp.summarise(runs, ["bilinear", "a"], COSTS, 1, default_settings=False)
    assert spread["miou"] is None and rows[1]["miou_within_noise"] is None and rows[1]["d_miou"] == 0.5
    res = CompareResult(rows, runs, {"host": "h", "image_size": 128, "iters": 1, "batch_size": 1, "val_samples": 1,
                                     "seeds": 1, "spread": spread}, 0.0)
    assert "no seed spread is known" in format_table(res)


def test_geometric_padding_share():
    # per axis, a 5-tap window at position i of an n-long map has min(i,2) + min(n-1-i,2) + 1 taps inside
    assert geometric_padding_share(2, 2) == pytest.approx(1 - 4 / 25)             # 84 %: 1/32 at 64 px
    assert geometric_padding_share(4, 4) == pytest.approx(1 - 3.5 ** 2 / 25)      # 51 %: 1/32 at 128 px
    assert geometric_padding_share(16, 16) == pytest.approx(1 - (74 / 16) ** 2 / 25)
