"""`sapa list`: every registered upsampler with its parameter count; --run times fwd+bwd."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import sapa
from sapa.cli import main


def _json_rows(capsys, argv):
    assert main(argv) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_list_shows_every_upsampler_with_its_parameter_count(capsys):
    rows = _json_rows(capsys, ["list", "--json", "--channels", "64"])
    assert [r["upsampler"] for r in rows] == sapa.list_upsamplers()
    assert len(rows) >= 13
    by_name = {r["upsampler"]: r for r in rows}
    # independent expectations: docs/SEMANTICS.md §2 formulas at C = 64, d = 32
    C, d = 64, 32
    assert by_name["sapa_i"]["params"] == 0
    assert by_name["sapa_b"]["params"] == 4 * C + 2 * (C * d + d)
    assert by_name["sapa_d"]["params"] == 2 * (C * 4 * d + 4 * d) + (C * 2 * 4 * 9 * 4 + 2 * 4 * 9 * 4)
    assert by_name["sapa_b"]["guided"] is True and by_name["bilinear"]["guided"] is False


def test_list_run_times_forward_backward(capsys):
    rows = _json_rows(capsys, ["list", "sapa_[ib]", "--run", "--json", "--channels", "32", "--size", "4",
                               "--batch", "1", "--repeats", "1"])
    assert [r["upsampler"] for r in rows] == ["sapa_i", "sapa_b"]
    assert all(r["fwd_bwd_ms"] > 0 for r in rows)


def test_list_table_and_unknown_pattern(capsys):
    assert main(["list", "sapa*"]) == 0
    out = capsys.readouterr().out
    assert "sapa_d" in out and "139,808" in out and "carafe" not in out
    assert main(["list", "nope*"]) == 2
    assert "no upsampler matches 'nope*'" in capsys.readouterr().err


def test_console_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "sapa", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    assert "list" in res.stdout


@pytest.mark.parametrize("argv", [["list", "--channels", "0"]])
def test_list_bad_channels_is_a_clear_error(capsys, argv):
    assert main(argv) == 2
    assert "in_channels" in capsys.readouterr().err


def test_list_says_what_each_host_builds(capsys):
    rows = {r["upsampler"]: r for r in _json_rows(capsys, ["list", "--json", "--channels", "64"])}
    # by hand from the sources: FADE gated only in SegFormer; SAPA-B the NeurIPS module everywhere;
    # SAPA-G not in the UPerNet table; DySample in no table
    assert rows["fade"]["hosts"]["segformer"]["config"]["gating"] is True
    assert rows["fade"]["hosts"]["upernet"]["config"]["gating"] is False
    assert rows["fade"]["hosts"]["fpn"]["config"]["gating"] is False
    assert all(rows["sapa_b"]["hosts"][h]["config"]["version"] == "neurips" for h in ("segformer", "upernet", "fpn"))
    assert rows["sapa_g"]["hosts"]["upernet"] is None and rows["dysample"]["hosts"] == dict.fromkeys(
        ("segformer", "upernet", "fpn"))
    assert rows["sapa_i"]["hosts"]["segformer"]["basis"] == "ours"
    assert main(["list"]) == 0
    table = capsys.readouterr().out
    assert "NeurIPS LN+Linear d32" in table and "ungated" in table and "segformer" in table


def test_list_host_prints_the_rows_in_full(capsys):
    assert main(["list", "fade", "--host", "fpn"]) == 0
    out = capsys.readouterr().out
    assert "gating=False" in out and "Xavier" in out and "fade-without-gating" in out
    rows = _json_rows(capsys, ["list", "sapa_[dg]", "--host", "upernet", "--json"])
    assert [r["upsampler"] for r in rows] == ["sapa_g", "sapa_d"]
    assert rows[0]["config"] is None and rows[1]["basis"] == "ours" and rows[1]["why"]
