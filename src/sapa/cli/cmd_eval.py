"""``sapa eval CHECKPOINT``: evaluate a checkpoint (last.pt or best.pt of ``sapa train``) on the
validation split of its config's dataset: mIoU / aAcc / mAcc / bIoU for segmentation, COCO box AP
for detection. Under ``torchrun`` the set is sharded and the metrics reduced across ranks (same
numbers as one process)."""
from __future__ import annotations

import json


HELP = 'evaluate a checkpoint on its validation set'  # `sapa --help` lists it without importing the command


def register(sub) -> None:
    p = sub.add_parser("eval", help=HELP, description=__doc__)
    p.add_argument("checkpoint", help="a checkpoint written by sapa train")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set data.root=/data/ADEChallengeData2016")
    p.add_argument("--dilation", type=float, default=0.02,
                   help="boundary IoU band: ratio of the image diagonal if < 1, else pixels (default 0.02)")
    p.add_argument("--json", metavar="PATH", help="also write the metrics as JSON ('-': JSON on stdout only)")
    p.add_argument("--per-class", action="store_true", help="include per-class IoU / bIoU")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..engine.distributed import cleanup, init_distributed
    from ..engine.evaluate import evaluate_checkpoint

    from ..metrics.segmentation import dilation_pixels
    dilation = args.dilation
    if dilation >= 1 and float(dilation).is_integer():
        dilation = int(dilation)  # a pixel count (2.5 stays a float and is refused, never truncated)
    try:
        dilation_pixels(1, 1, dilation)
    except ValueError as err:
        raise ValueError(f"--dilation: {err}") from None
    info = None
    ok = False
    try:
        from ..engine.checkpoint import load_checkpoint
        from ..engine.config import Config
        cfg = Config.from_dict(load_checkpoint(args.checkpoint)["config"])
        info = init_distributed(cfg.train.device)
        res = evaluate_checkpoint(args.checkpoint, args.overrides, info, dilation=dilation)
        ok = True
    finally:
        if info is not None:
            cleanup(info, ok)
    if not info.is_main:
        return 0
    if not args.per_class:
        res = {k: v for k, v in res.items() if not isinstance(v, list)}
    if args.json and args.json != "-":
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    if args.json == "-":
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k:<16}{v:.4f}" if isinstance(v, float) else f"{k:<16}{v}")
    return 0
