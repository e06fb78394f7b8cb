"""``sapa train``: train a host network from a preset (docs/SEMANTICS.md §6 protocols or the synthetic demo),
with ``--set section.field=value`` overrides. Under ``torchrun --nproc_per_node N`` it runs
distributed (gloo on CPU, nccl on GPU); ``data.batch_size`` is the total over all processes.
The run folder receives config.json, log.jsonl, curves.png, last.pt and best.pt."""
from __future__ import annotations


HELP = "train a model from a preset"  # `sapa --help` lists it without importing the command


def register(sub) -> None:
    from ..engine.config import PRESETS
    p = sub.add_parser("train", help=HELP + " (presets: " + ", ".join(PRESETS) + ")", description=__doc__)
    p.add_argument("--preset", default="synthetic", choices=list(PRESETS), help="starting configuration")
    p.add_argument("--config", metavar="JSON", help="start from a config.json of an earlier run instead of a preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=1e-3 --set model.upsampler=sapa_b "
                        "(repeatable; see --print-config for the keys)")
    p.add_argument("--output", metavar="DIR",
                   help="run folder (same as --set train.output=DIR; default runs/<preset>-<upsampler>)")
    p.add_argument("--resume", nargs="?", const="auto", metavar="CKPT",
                   help="continue from CKPT (default: OUTPUT/last.pt) with its config; --set applies on top "
                        "(train.stop_at of the interrupted run is cleared)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run)


def resolve_config(args):
    import json
    from pathlib import Path

    from ..engine.checkpoint import load_checkpoint
    from ..engine.config import Config, apply_overrides, get_preset

    overrides = list(args.overrides)
    if args.output:
        overrides.append(f"train.output={args.output!r}")
    resume = None
    if args.resume:
        if args.resume == "auto":
            out = args.output
            if out is None:
                raise ValueError("--resume without a checkpoint path needs --output DIR (resumes DIR/last.pt)")
            resume = Path(out) / "last.pt"
        else:
            resume = Path(args.resume)
        ckpt = load_checkpoint(resume)
        cfg = Config.from_dict(ckpt["config"])
        cfg.train.stop_at = None
        if not args.output:
            overrides.append(f"train.output={str(resume.parent)!r}")
    elif args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config {path}: file not found")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"--config {path} is not valid JSON: {err}") from None
        try:
            cfg = Config.from_dict(data)
        except (KeyError, TypeError, ValueError) as err:
            msg = err.args[0] if isinstance(err, KeyError) and err.args else err
            raise type(err)(f"--config {path}: {msg}") from None
    else:
        cfg = get_preset(args.preset)
    cfg = apply_overrides(cfg, overrides)
    if cfg.train.output is None:
        cfg.train.output = f"runs/{cfg.preset}-{cfg.model.upsampler}"
    return cfg, resume


def run(args) -> int:
    from ..engine.config import format_config
    from ..engine.distributed import cleanup, init_distributed
    from ..engine.trainer import Trainer

    cfg, resume = resolve_config(args)
    if args.print_config:
        print(format_config(cfg))
        return 0
    info = init_distributed(cfg.train.device)
    ok = False
    try:
        trainer = Trainer(cfg, resume=resume, dist=info)
        out = trainer.fit()
        if info.is_main:
            ev = out["last_eval"] or {}
            shown = ", ".join(f"{k} {v:.4f}" for k, v in ev.items() if isinstance(v, float))
            best = out["best"]
            msg = f"iteration {out['iteration']}" + (" (stopped early)" if out["stopped"] else "")
            if shown:
                msg += f"; last eval: {shown}"
            if best.get("value") is not None:
                msg += f"; best {best['metric']} {best['value']:.4f} at {best['iteration']}"
            print(msg, flush=True)
        ok = True
    finally:
        cleanup(info, ok)
    return 0
