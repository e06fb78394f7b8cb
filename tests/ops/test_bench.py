"""sapa.bench: the runner's records (fields, ratios from the same run, skipped backends), the peak
memory measurement, the named shape sets, and the ``sapa bench`` command."""
from __future__ import annotations

import json
import math

import pytest
import torch

from sapa.bench import OPS, SHAPE_SETS, PeakMemory, make_inputs, run_bench, shape_set, summary_table
from sapa.cli import main

REQUIRED = {"schema", "machine", "torch", "numba", "git_commit", "timestamp", "dtype", "matmul_gflops", "op",
            "backend", "mode", "shape_set", "shape", "batch", "channels", "in_hw", "out_hw", "scale",
            "repeats", "gflop", "median_ms", "min_ms", "max_ms", "gflops", "peak_mem_bytes", "mem_method"}


@pytest.fixture(scope="module")
def records():
    # without TRITON_INTERPRET the triton backend cannot run on CPU tensors: a skipped record
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        return run_bench(ops=["sapa", "sapa_deform"], backends=["reference", "cpu", "triton"],
                         shapes=["tiny"], modes=["fwd", "fwd+bwd"], repeats=2)


def test_records_are_well_formed(records):
    timed = [r for r in records if "skipped" not in r]
    assert len(timed) == 2 * 2 * 2  # ops x backends that run on CPU tensors x modes
    for r in timed:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["min_ms"] > 0
        assert r["machine"]["cores"] >= 1 and r["machine"]["threads"] >= 1
        assert r["gflops"] == pytest.approx(r["gflop"] / (r["median_ms"] / 1e3), rel=0.02, abs=0.02)
        assert (r["shape"], r["in_hw"], r["out_hw"]) == ("5x7->10x13", [5, 7], [10, 13])
        json.loads(json.dumps(r))  # JSON-serialisable
    # the fwd+bwd flop count is 3x the forward's
    by = {(r["op"], r["backend"], r["mode"]): r for r in timed}
    assert by[("sapa", "cpu", "fwd+bwd")]["gflop"] == pytest.approx(3 * by[("sapa", "cpu", "fwd")]["gflop"])


def test_speedups_are_ratios_of_the_same_run(records):
    ref = {(r["op"], r["mode"]): r for r in records if r["backend"] == "reference"}
    for r in records:
        if r["backend"] == "cpu":
            base = ref[(r["op"], r["mode"])]
            assert r["speedup_vs_reference"] == pytest.approx(base["median_ms"] / r["median_ms"], rel=0.01)
        if r["backend"] == "reference":
            assert r["speedup_vs_reference"] == 1.0


def test_unavailable_backend_is_a_skipped_record(records):
    skipped = [r for r in records if r["backend"] == "triton"]
    assert len(skipped) == 4 and all("skipped" in r and "median_ms" not in r for r in skipped)
    assert "triton" in skipped[0]["skipped"]


def test_summary_table_lists_every_case(records):
    table = summary_table(records).splitlines()
    assert len(table) == 2 + len(records)
    assert any("skipped" in line for line in table)


def test_peak_memory_sees_an_allocation():
    pm = PeakMemory()
    if not pm.available:
        pytest.skip("needs /proc/self/clear_refs")
    keep = torch.ones(4 << 20)  # allocated before: not counted
    with PeakMemory() as a:
        x = torch.ones(8 << 20)  # 32 MB, touched
        del x
    with PeakMemory() as b:
        pass
    assert 30e6 < a.peak_bytes < 40e6, a.peak_bytes
    assert b.peak_bytes < 2e6, b.peak_bytes
    del keep


def test_shape_sets_are_the_papers_placements():
    seg = shape_set("segformer-b1")
    assert [(p.channels, p.in_hw, p.out_hw) for p in seg] == [
        (256, (16, 16), (32, 32)), (256, (32, 32), (64, 64)), (256, (64, 64), (128, 128))]
    assert all(p.channels == 512 for p in shape_set("upernet"))
    fpn = shape_set("fpn")
    assert fpn[0].in_hw == (25, 42) and fpn[1].out_hw == (100, 167)  # 1333 / 8 rounds up: ceil mode
    for name in SHAPE_SETS:
        for pl in shape_set(name):
            (h, w), (hq, wq) = pl.in_hw, pl.out_hw
            assert 2 * h - 2 < hq <= 2 * h and 2 * w - 2 < wq <= 2 * w
    with pytest.raises(KeyError, match="segformer-b1"):
        shape_set("nope")


@pytest.mark.parametrize("op", OPS)
def test_inputs_run_on_every_op(op):
    import sapa.functional as Fn

    args, kw = make_inputs(op, shape_set("tiny")[0])
    out = getattr(Fn, op)(*args, backend="reference", **kw)
    assert out.shape[0] == 1 and math.isfinite(out.sum().item())


def test_bad_arguments():
    with pytest.raises(KeyError, match="unknown op"):
        run_bench(ops=["nope"], shapes=["tiny"])
    with pytest.raises(KeyError, match="unknown backend"):
        run_bench(ops=["sapa"], backends=["gpu"], shapes=["tiny"])
    with pytest.raises(ValueError, match="unknown mode"):
        run_bench(ops=["sapa"], modes=["bwd"], shapes=["tiny"])


def test_cli_writes_json_lines(tmp_path, capsys):
    path = tmp_path / "bench.jsonl"
    rc = main(["bench", "--ops", "reassemble", "--shapes", "tiny", "--repeats", "1", "--no-memory",
               "--json", str(path)])
    assert rc == 0
    lines = path.read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    assert len(recs) == 4 and {r["backend"] for r in recs} == {"reference", "cpu"}
    assert all("peak_mem_bytes" not in r for r in recs)
    out = capsys.readouterr().out
    assert "reassemble" in out and "x ref" in out and "matmul" in out and "copy" in out


def test_cli_rejects_unknown_choices():
    with pytest.raises(SystemExit):
        main(["bench", "--shapes", "nope"])


def test_quick_keeps_explicit_repeats():
    """--quick picks the largest placement; it used to cap --repeats at 3 silently."""
    recs = run_bench(ops=["sapa"], shapes=["tiny"], modes=["fwd"], backends=["cpu"], repeats=4, quick=True,
                     memory=False)
    assert [r["repeats"] for r in recs] == [4]
    recs = run_bench(ops=["sapa"], shapes=["tiny"], modes=["fwd"], backends=["cpu"], quick=True, memory=False)
    assert [r["repeats"] for r in recs] == [3]


# ---- the CUDA path's record building, on CPU: a probe with an injected clock


class _FakeProbe:
    """Stands in for CudaProbe: CPU tensors, a scripted clock (ms per op), fixed bandwidth and memory."""

    device = torch.device("cpu")
    timing = "fake-clock"
    mem_method = "fake"

    def __init__(self, ms: dict):
        self.ms, self.calls = ms, []

    def time(self, run, repeats):
        run()  # the case must really run
        self.calls.append(run)
        t = self.ms[len(self.calls) - 1] / 1e3
        return t, 0.9 * t, 1.1 * t, repeats

    def peak_bytes(self, run):
        return 1 << 20  # (the case already ran in time(); the reference at this shape is slow on CPU)

    def copy_bandwidth(self):
        return 100e9  # 100 GB/s

    def matmul_gflops(self):
        return 1.0

    def info(self):
        return {"device": "cuda", "machine": {"cpu": "x", "cores": 1, "threads": 1},
                "gpu": {"name": "Fake H200", "driver": "999.1", "cuda": "13.0"}}


def test_bytes_moved_by_hand():
    from sapa.bench.traffic import bytes_moved

    q, k, v, out = (1, 32, 240, 240), (1, 32, 120, 120), (1, 256, 120, 120), (1, 256, 240, 240)
    fwd = bytes_moved([q, k, v], out, "fwd", 2)
    assert fwd == 2 * (32 * 240 * 240 + 32 * 120 * 120 + 256 * 120 * 120 + 256 * 240 * 240) == 41_472_000
    # backward: grad_out read, q k v read again, dq dk dv written
    ins = 32 * 240 * 240 + 32 * 120 * 120 + 256 * 120 * 120
    assert bytes_moved([q, k, v], out, "fwd+bwd", 2) == fwd + 2 * (256 * 240 * 240 + 2 * ins)
    assert bytes_moved([q, k], out, "fwd+bwd", 4, differentiable=[True, False]) == \
        4 * (2 * (32 * 240 * 240 + 32 * 120 * 120) + 2 * 256 * 240 * 240 + 32 * 240 * 240)
    with pytest.raises(ValueError, match="mode"):
        bytes_moved([q], out, "bwd", 2)


def test_cuda_records_from_an_injected_clock():
    # case order: sapa/reference fwd, sapa/triton fwd (skipped: no GPU, interpreter off), floor fwd
    probe = _FakeProbe({0: 8.0, 1: 2.0})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        recs = run_bench(ops=["sapa"], backends=["reference", "triton"], shapes=["authors"], modes=["fwd"],
                         memory=True, probe=probe, floor=True, dtype=torch.bfloat16)
    by = {(r["op"], r["backend"]): r for r in recs}
    assert set(by) == {("sapa", "reference"), ("sapa", "triton"), ("bilinear", "torch")}
    assert "skipped" in by[("sapa", "triton")]
    ref, fl = by[("sapa", "reference")], by[("bilinear", "torch")]
    for r in (ref, fl):
        assert r["gpu"]["name"] == "Fake H200" and r["gpu"]["driver"] == "999.1" and r["timing"] == "fake-clock"
        assert r["copy_gbs"] == 100.0 and r["peak_mem_bytes"] == 1 << 20 and r["mem_method"] == "fake"
        assert r["dtype"] == "bfloat16" and "triton" in r and "git_commit" in r
    assert ref["median_ms"] == 8.0 and fl["median_ms"] == 2.0
    assert ref["bytes_moved"] == 41_472_000  # q, k, v in, out written, bf16
    assert fl["bytes_moved"] == 2 * (256 * 120 * 120 + 256 * 240 * 240)  # v in, out written
    assert ref["achieved_gbs"] == pytest.approx(41.472e6 / 8e-3 / 1e9, rel=1e-3)
    assert ref["frac_copy_bw"] == pytest.approx(41.472e6 / 8e-3 / 100e9, rel=1e-3)
    assert ref["vs_bilinear"] == pytest.approx(4.0) and fl["vs_bilinear"] == pytest.approx(1.0)
    assert ref["speedup_vs_reference"] == 1.0
    assert fl["gflops"] == pytest.approx(2 * 4 * 256 * 240 * 240 / 2e-3 / 1e9, rel=1e-3)
    assert "/bilin" in summary_table(recs)


def test_device_cuda_without_a_gpu_is_one_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    from sapa.bench.device import CudaProbe, make_probe

    with pytest.raises(ValueError, match="torch.cuda.is_available"):
        CudaProbe()
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        make_probe("tpu")
    assert main(["bench", "--device", "cuda", "--shapes", "authors"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device cuda" in err[0] and "Traceback" not in err[0]
