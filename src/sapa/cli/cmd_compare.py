"""``sapa compare``: train a small SegFormer-style host with each upsampler on the built-in
synthetic segmentation set (128x128, the upsamplers' published SegFormer configurations, head
dropout 0.1, last checkpoint for every method) and print the papers' table (upsampler, GFLOPs,
params, mIoU, bIoU, latency) with each upsampler's paired difference to bilinear (same seed, same
data order); a difference smaller than the measured seed-to-seed spread is printed "within noise".
Text, JSON and a PNG of predictions and boundary errors on the same images. The default finishes in
about 5 minutes on 2 CPU cores; the same seeds give the same mIoU / bIoU on the same machine."""
from __future__ import annotations

import json


HELP = 'train + evaluate a small host with each upsampler (synthetic data, CPU)'  # `sapa --help` lists it without importing the command


def register(sub) -> None:
    from ..engine.compare import DEFAULT_UPSAMPLERS, DEMO_OVERRIDES
    p = sub.add_parser("compare", help=HELP,
                       description=__doc__)
    p.add_argument("--upsamplers", nargs="+", default=list(DEFAULT_UPSAMPLERS), metavar="NAME",
                   help=f"upsamplers to compare, or 'all' (default: {' '.join(DEFAULT_UPSAMPLERS)}); bilinear, the "
                        f"reference of the paired differences, is always run")
    p.add_argument("--seeds", type=int, default=1,
                   help="seeds per upsampler, 0..N-1; >1 reports mean ± std and measures the seed spread")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH ('-': print JSON to stdout)")
    p.add_argument("--output", default="runs/compare", metavar="DIR",
                   help="folder for compare.txt / compare.json / runs.json / runs.jsonl / compare.png "
                        "(default runs/compare)")
    p.add_argument("--jobs", type=int, default=None,
                   help="parallel training processes, one thread each (default: min(2, CPUs)); results do not "
                        "depend on it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override on top of the demo settings, e.g. --set train.max_iters=300 "
                        f"(demo settings: {' '.join(DEMO_OVERRIDES)})")
    p.add_argument("--no-figure", action="store_true", help="skip the PNG figure")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..engine.compare import format_table, run_compare

    to_stdout = args.json == "-"
    res = run_compare(args.upsamplers, seeds=args.seeds, overrides=args.overrides, jobs=args.jobs,
                      output=args.output, json_path=None if to_stdout else args.json,
                      progress=not args.no_progress, figure=not args.no_figure)
    if to_stdout:
        print(json.dumps(res.rows, indent=2))
        return 0
    print(format_table(res))
    print(f"# wall time {res.wall_s:.1f} s, {res.settings['jobs']} job(s)")
    for k, v in res.files.items():
        print(f"# {k}: {v}")
    return 0
