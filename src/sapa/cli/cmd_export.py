"""``sapa export``: write an upsampler or a host network as plain-operator ONNX (docs/DEPLOY.md).

    sapa export --upsampler sapa_b --channels 256 [--guide-channels 256] [--size 64 64] -o sapa_b.onnx
    sapa export --host segformer-b1 --size 512 512 -o segformer.onnx

The module is randomly initialised (``--weights`` loads a state_dict file first). Batch and spatial
dims stay dynamic unless ``--static``; ``--size`` is the example's (low-res, for an upsampler) size.
``--check`` runs the file in onnxruntime against PyTorch at a size that was not used for the export.
"""
from __future__ import annotations

import json
import sys


HELP = 'export an upsampler or host network to ONNX'  # `sapa --help` lists it without importing the command


def register(sub) -> None:
    p = sub.add_parser("export", help=HELP, description=__doc__,
                       formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--upsampler", metavar="NAME", help="a registered upsampler (sapa list)")
    what.add_argument("--host", metavar="NAME", help="segformer-b1 | upernet-r50 | faster-rcnn-r50")
    p.add_argument("--channels", type=int, default=256, help="upsampler in_channels C (default 256)")
    p.add_argument("--guide-channels", type=int, default=None, help="guide channels Cg (default: C)")
    p.add_argument("--scale-factor", type=int, default=2, help="upsampler scale factor (default 2)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="example size: the low-res input of an upsampler (default 16 16), the image of a "
                        "host (default 256 256)")
    p.add_argument("--batch", type=int, default=1, help="example batch size (default 1)")
    p.add_argument("--host-upsampler", metavar="NAME", default=None,
                   help="with --host: the upsampler the host uses (default: the host's own default)")
    p.add_argument("--weights", metavar="FILE", default=None, help="state_dict file to load before exporting")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default and minimum 18)")
    p.add_argument("--static", action="store_true", help="fix batch and spatial sizes to the example's")
    p.add_argument("--check", action="store_true", help="compare onnxruntime with PyTorch at an unseen size")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the .onnx file to write")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def _inputs(args, module):
    import torch

    B = args.batch
    if args.host:
        H, W = args.size or (256, 256)
        return (torch.randn(B, 3, H, W),), lambda: (torch.randn(B + 1, 3, H + 32, W - 32 if W > 64 else W + 32),)
    H, W = args.size or (16, 16)
    s = args.scale_factor
    cg = module.guide_channels

    def make(b, h, w, ceil):
        x = torch.randn(b, module.in_channels, h, w)
        if not module.needs_guide:
            return (x,)
        return x, torch.randn(b, cg, s * h - ceil, s * w - ceil)

    return make(B, H, W, 0), lambda: make(B + 1, H + 1, W + 2, 1 if s > 1 else 0)


def run(args) -> int:
    import torch

    from .. import export as E
    from ..registry import build_upsampler

    try:
        if args.host:
            module = E.build_host(args.host, upsampler=args.host_upsampler)
        else:
            module = build_upsampler(args.upsampler, args.channels, guide_channels=args.guide_channels,
                                     scale_factor=args.scale_factor).eval()
        if args.weights:
            module.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
        example, unseen = _inputs(args, module)
        model = E.export_onnx(module, example, args.output, opset=args.opset or E.MIN_OPSET,
                              dynamic=not args.static)
        info = {"file": args.output, "what": args.host or args.upsampler, "opset": model.opset_import[0].version,
                "nodes": len(model.graph.node), "dynamic": not args.static,
                "example": [list(t.shape) for t in example]}
        if args.check:
            import numpy as np

            inputs = unseen() if not args.static else example
            with torch.no_grad():
                ref = module(*inputs)
            refs = ref if isinstance(ref, tuple) else (ref,)
            outs = E.run_onnx(E.onnx_session(model), inputs)
            info["checked_at"] = [list(t.shape) for t in inputs]
            info["max_rel_error"] = max(float(np.abs(o - r.numpy()).max() / max(np.abs(r.numpy()).max(), 1e-30))
                                        for o, r in zip(outs, refs))
    except OSError as err:  # an unwritable path; ValueError/TypeError/KeyError are reported by sapa.cli
        print(f"sapa export: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info))
    else:
        print(", ".join(f"{k}={v}" for k, v in info.items()))
    return 0
