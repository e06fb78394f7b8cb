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
