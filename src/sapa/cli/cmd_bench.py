"""``sapa bench``: time the custom ops (window_similarity, reassemble, sapa, deform_similarity,
deform_reassemble, sapa_deform) per backend at the papers' upsampling placements, forward and
forward+backward, with peak memory and the speed-up against the reference backend measured in the
same run. Records are JSON lines tagged with machine, versions and git commit (``--json PATH``);
curated ones live in benchmarks/results/. What is measured and how: ``sapa.bench.runner``."""
from __future__ import annotations

import json
import sys


HELP = 'benchmark the custom ops per backend (speed-up vs the reference, peak memory)'  # `sapa --help` lists it without importing the command


def register(sub) -> None:
    from ..bench.runner import MODES
    from ..bench.shapes import OPS, SHAPE_SETS

    p = sub.add_parser("bench", help=HELP, description=__doc__)
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS), metavar="OP",
                   help=f"ops to time (default: all): {', '.join(OPS)}")
    p.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                   help="backends (default: reference cpu; on cuda reference triton); keep 'reference' "
                        "for the speed-up ratios")
    p.add_argument("--shapes", nargs="+", default=["segformer-b1"], choices=list(SHAPE_SETS), metavar="SET",
                   help=f"named shape sets (default segformer-b1): {', '.join(SHAPE_SETS)}")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES),
                   help="fwd and/or fwd+bwd (default both)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per case after one warm-up (default 5; 3 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="only the largest placement of each shape set, 3 repeats unless --repeats is given")
    p.add_argument("--threads", type=int, default=None, help="torch (and kernel) threads (default: torch's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the inputs live (default cpu); cuda: triton.testing.do_bench timing, "
                        "torch.cuda.max_memory_allocated, the GPU's name / driver in every record")
    p.add_argument("--floor", dest="floor", action="store_true", default=None,
                   help="also time F.interpolate(mode='bilinear') to the same output (default on cuda)")
    p.add_argument("--no-floor", dest="floor", action="store_false", help="do not time the bilinear floor")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="append the records as JSON lines to PATH ('-' prints them instead of the table)")
    p.set_defaults(func=run)


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is in the [train] extra; plain lines otherwise
        def plain(msg: str) -> None:
            print(f"  {msg}", file=sys.stderr, flush=True)
        return plain, lambda: None
    bar = tqdm(total=total, desc="bench", unit="case", dynamic_ncols=True, file=sys.stderr)

    def update(msg: str) -> None:
        bar.set_postfix_str(msg, refresh=False)
        bar.update(1)
    return update, bar.close


def run(args) -> int:
    import torch

    from ..bench.runner import run_bench, summary_table
    from ..bench.shapes import shape_set

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    from ..bench.device import make_probe

    probe = make_probe(args.device)  # one clear error (ValueError) where the device cannot be used
    backends = args.backends or (["reference", "triton"] if args.device == "cuda" else ["reference", "cpu"])
    floor = args.floor if args.floor is not None else args.device == "cuda"
    n_pl = sum(1 if args.quick else len(shape_set(s)) for s in args.shapes)
    total = (len(args.ops) * len(backends) + floor) * n_pl * len(args.modes) * (1 if args.no_memory else 2)
    update, close = _progress(total)
    try:
        records = run_bench(ops=args.ops, backends=backends, shapes=args.shapes, modes=args.modes,
                            repeats=args.repeats, quick=args.quick, dtype=getattr(torch, args.dtype),
                            memory=not args.no_memory, progress=update, floor=floor, probe=probe)
    finally:
        close()
    if args.json == "-":
        for r in records:
            print(json.dumps(r))
        return 0
    if args.json:
        with open(args.json, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    r0 = records[0] if records else {}
    m = r0.get("machine", {})
    gpu = r0.get("gpu")
    where = (f"{gpu['name']} (driver {gpu['driver']}, CUDA {gpu['cuda']})" if gpu else
             f"{m.get('cpu')} ({m.get('cores')} cores, {m.get('threads')} threads)")
    print(f"# {where}, torch {r0.get('torch')}, triton {r0.get('triton')}, numba {r0.get('numba')}, "
          f"commit {r0.get('git_commit')}, {r0.get('dtype')}, matmul: {r0.get('matmul_gflops')} GFLOP/s, "
          f"copy: {r0.get('copy_gbs')} GB/s, timing: {r0.get('timing')}")
    print(summary_table(records))
    if args.json:
        print(f"# {len(records)} records appended to {args.json}")
    return 0
