"""Benchmarks of the custom ops: ``from sapa.bench import run_bench`` (the runner behind ``sapa bench``).

    >>> from sapa.bench import run_bench
    >>> records = run_bench(ops=["sapa"], shapes=["tiny"], modes=["fwd"], repeats=1, memory=False)
    >>> {r["backend"] for r in records} == {"reference", "cpu"}
    True

See :mod:`sapa.bench.runner` for what is measured and how, :mod:`sapa.bench.shapes` for the named
shape sets (SegFormer-B1, UPerNet, FPN placements, the authors' timing shape),
:mod:`sapa.bench.device` for CPU / CUDA timing and :mod:`sapa.bench.traffic` for bytes moved.
"""
from .runner import MODES, PeakMemory, machine_info, matmul_gflops, run_bench, summary_table
from .shapes import OP_SETTINGS, OPS, SHAPE_SETS, Placement, make_inputs, shape_set
from .traffic import bytes_moved

__all__ = ["run_bench", "summary_table", "PeakMemory", "machine_info", "matmul_gflops", "MODES", "OPS",
           "OP_SETTINGS", "SHAPE_SETS", "Placement", "make_inputs", "shape_set", "bytes_moved"]
