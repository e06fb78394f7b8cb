"""``sapa complexity``: FLOPs (multiply-accumulates, the papers' convention) and parameters of a
host network with each upsampler, beside the papers' numbers. The baseline row (bilinear for the
segmentation hosts, nearest for Faster R-CNN) gives absolute values; the other rows give deltas.
Models are built on the ``meta`` device: nothing is allocated or computed, nothing downloaded."""
from __future__ import annotations

import json


HELP = 'GFLOPs (MACs) and params of a host network with each upsampler'  # `sapa --help` lists it without importing the command


def register(sub) -> None:
    from ..complexity import HOSTS

    p = sub.add_parser("complexity", help=HELP,
                       description=__doc__)
    p.add_argument("--host", choices=list(HOSTS), default="segformer-b1", help="host network (default segformer-b1)")
    p.add_argument("--size", default="512", help="input size: N (square) or HxW, e.g. 800x1333 (default 512)")
    p.add_argument("--upsamplers", nargs="+", default=None, metavar="NAME",
                   help="upsamplers to compare (names or comma lists; default: every registered one)")
    p.add_argument("--sampling-macs", type=int, default=4,
                   help="MACs per bilinearly sampled scalar in SAPA-D / grid_sample (default 4; 8 "
                        "reproduces the papers' SAPA-D +5.3 G)")
    p.add_argument("--device", default="meta", help="device to build and count on (default meta)")
    p.add_argument("--json", action="store_true", help="print a JSON list of rows instead of a table")
    p.set_defaults(func=run)


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("*", "x").split("x")
    try:
        hw = [int(p) for p in parts]
    except ValueError:
        hw = []
    if len(hw) == 1:
        hw = hw * 2
    if len(hw) != 2 or min(hw) < 32:
        raise ValueError(f"--size must be N or HxW with sides >= 32, got {text!r}")
    return hw[0], hw[1]


def _fmt(v, spec: str, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+{spec}}" if signed else f"{v:{spec}}"


def run(args) -> int:
    from ..complexity import HOSTS, host_rows
    from ..registry import get_upsampler_class

    size = _size(args.size)
    names = None
    if args.upsamplers:
        names = [n for item in args.upsamplers for n in item.split(",") if n]
        for n in names:
            get_upsampler_class(n)  # KeyError listing the valid names
    rows = host_rows(args.host, names, size, sampling_macs=args.sampling_macs, device=args.device)
    if args.json:
        print(json.dumps(rows))
        return 0
    h = HOSTS[args.host]
    print(f"# {args.host} at {size[0]}x{size[1]}: GFLOPs = GMACs of the {h.flops_note}; params of the whole "
          f"model. Baseline absolute, others as deltas. Paper: {h.paper_source}.")
    print(f"# built as: the published configuration the host builds for the name (sapa list --host "
          f"{h.preset_host}); basis released / inferred / ours")
    print(f"{'upsampler':<14}{'GFLOPs':>10}{'paper':>8}{'Params(M)':>12}{'paper':>8}  built as")
    for i, r in enumerate(rows):
        if i == 0:
            g, p = _fmt(r["gflops"], ".2f"), _fmt(r["params_m"], ".2f")
            pg, pp = _fmt(r["paper_gflops"], ".2f"), _fmt(r["paper_params_m"], ".2f")
        else:
            g, p = _fmt(r["d_gflops"], ".2f", True), _fmt(r["d_params_m"], ".3f", True)
            pg, pp = _fmt(r["paper_gflops"], ".2f", True), _fmt(r["paper_params_m"], ".2f", True)
        print(f"{r['upsampler']:<14}{g:>10}{pg:>8}{p:>12}{pp:>8}  {r['config']}")
    return 0
