"""``sapa list``: the registered upsamplers, with parameter counts (registered defaults) and, per host
network, the configuration that host builds for the name (the published row, see
``sapa.models.presets``); ``--host NAME`` prints that host's rows in full (module arguments, init,
source); ``--run`` also times a forward and backward pass of each on a random feature pair (C=256,
32x32 -> 64x64 by default)."""
from __future__ import annotations

import json
import sys
import time


HELP = 'list registered upsamplers (and optionally run each once)'  # `sapa --help` lists it without importing the command


def register(sub) -> None:
    p = sub.add_parser("list", help=HELP,
                       description=__doc__)
    p.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern, e.g. 'sapa*' (default: all)")
    p.add_argument("--run", action="store_true", help="run forward+backward of each on random features")
    p.add_argument("--channels", type=int, default=256, help="feature channels C (default 256)")
    p.add_argument("--size", type=int, default=32, help="low-res side H=W (default 32 -> 64)")
    p.add_argument("--batch", type=int, default=2, help="batch size for --run (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions for --run (median kept)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p.add_argument("--host", choices=["segformer", "upernet", "fpn"], default=None,
                   help="print what this host builds for each name: module arguments, init, basis, source")
    p.set_defaults(func=run)


def _time_one(up, x, guide, repeats: int) -> float:
    import torch
    times = []
    for _ in range(repeats + 1):  # first call warms up (kernel compilation, caches)
        xs = x.detach().requires_grad_(True)
        t0 = time.perf_counter()
        out = up(xs, guide)
        out.square().mean().backward()
        times.append(time.perf_counter() - t0)
        if not torch.isfinite(out).all():
            raise ValueError(f"{up.name}: non-finite output")
    return sorted(times[1:])[len(times[1:]) // 2]


_BASIS_MARK = {"released": "", "inferred": " *", "ours": " +"}


def _host_rows(host: str, names, as_json: bool) -> int:
    from ..models.presets import PRESET_HOSTS, get_preset

    rows = []
    for name in names:
        p = get_preset(host, name)
        rows.append({"host": host, "upsampler": name, "config": dict(p.config) if p else None,
                     "label": p.label if p else "registered defaults (no published row)",
                     "init": p.init if p else None, "basis": p.basis if p else None,
                     "source": p.source if p else None, "why": (p.why or None) if p else None})
    if as_json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print(f"# {host}: {PRESET_HOSTS[host]}; what it builds for each name (keys you pass win; a class is built "
          f"with its own defaults)")
    for r in rows:
        if r["config"] is None:
            print(f"{r['upsampler']:<14}{r['label']}")
            continue
        cfg = ", ".join(f"{k}={v!r}" for k, v in r["config"].items()) or "-"
        print(f"{r['upsampler']:<14}{r['label']} [{r['basis']}]: {cfg}")
        if r["init"]:
            print(f"{'':<14}init: {r['init']}")
        print(f"{'':<14}source: {r['source']}" + (f"; why: {r['why']}" if r["why"] else ""))
    return 0


def run(args) -> int:
    import torch

    from ..models.presets import PRESET_HOSTS, get_preset
    from ..registry import build_upsampler, get_upsampler_class, list_upsamplers

    names = list_upsamplers(args.pattern)
    if not names:
        raise KeyError(f"no upsampler matches {args.pattern!r}; registered: {', '.join(list_upsamplers())}")
    if args.host is not None:
        return _host_rows(args.host, names, args.json)
    rows = []
    torch.manual_seed(0)
    C, H = args.channels, args.size
    x = torch.randn(args.batch, C, H, H)
    guide = torch.randn(args.batch, C, 2 * H, 2 * H)
    for i, name in enumerate(names, 1):
        if args.run:  # progress on stderr: the first runs also compile the CPU kernels (see `sapa warmup`)
            print(f"sapa list: [{i}/{len(names)}] {name} ...", file=sys.stderr, flush=True)
        cls = get_upsampler_class(name)
        up = build_upsampler(name, C)
        row = {"upsampler": name, "guided": cls.needs_guide,
               "params": sum(p.numel() for p in up.parameters()), "hosts": {}}
        for h in PRESET_HOSTS:
            pr = get_preset(h, name)
            row["hosts"][h] = None if pr is None else {"label": pr.label, "basis": pr.basis, "config": dict(pr.config)}
        if args.run:
            row["fwd_bwd_ms"] = round(1e3 * _time_one(up, x, guide, args.repeats), 2)
        rows.append(row)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    header = f"{'upsampler':<14}{'guided':>8}{'params':>12}"
    if args.run:
        header += f"{'fwd+bwd ms':>13}"
        print(f"# forward+backward, B={args.batch}, C={C}, {H}x{H} -> {2 * H}x{2 * H}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"# params: registered defaults at C={C}. Host columns: the published configuration each host builds "
          f"for the name (* inferred, + our choice, - no published row: registered defaults); "
          f"details: sapa list --host NAME")
    header += "".join(f"  {h:<24}" for h in PRESET_HOSTS)
    print(header)
    for r in rows:
        line = f"{r['upsampler']:<14}{'yes' if r['guided'] else 'no':>8}{r['params']:>12,}"
        if args.run:
            line += f"{r['fwd_bwd_ms']:>13.2f}"
        for h in PRESET_HOSTS:
            pr = r["hosts"][h]
            line += f"  {'-' if pr is None else pr['label'] + _BASIS_MARK[pr['basis']]:<24}"
        print(line.rstrip())
    return 0
