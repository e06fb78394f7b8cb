"""onnxruntime CPU latency of exported upsamplers beside the ``cpu`` backend's eager forward, in the
same run, at the SegFormer-B1 placement (B=1, C=256, 64x64 -> 128x128). One JSON line per upsampler:

    PYTHONPATH=src python benchmarks/onnx_latency.py [NAME ...] [--repeats 10] [--threads N]
                                            [--preset segformer|upernet|fpn|none] > out.jsonl

Each module is the one the SegFormer host builds at that placement (its published configuration,
``sapa.models.presets``: the NeurIPS SAPA-B, gated FADE, ...) unless ``--preset`` names another host
or ``none`` (the registry's defaults, e.g. the journal SAPA-B).

Fields: name, module (what was built), opset, nodes (ONNX node count; the same at any H, W: the graph's sizes are symbolic),
ops ({op_type: count}), max_rel_error (max |ort - torch| / max |torch| at 64x64 and at an unseen
33x47 with a ceil-mode guide), ort_ms / cpu_ms (medians), ratio = ort_ms / cpu_ms, threads, onnxruntime,
torch / numba / numpy / sapa versions, machine, git_commit, loadavg_1m.
"""
from __future__ import annotations

import argparse
import io
import json
import os

import torch

import sapa
from sapa import export as E
from sapa.bench.runner import git_commit, machine_info, versions
from sapa.registry import get_upsampler_class


def case(name: str, repeats: int, threads: int, preset: str = "segformer") -> dict:
    import onnxruntime

    from sapa.models.presets import describe, resolve_spec

    up = sapa.build_upsampler(name if preset == "none" else resolve_spec(preset, name), 256).eval()
    module = "registered defaults" if preset == "none" else f"{preset}: {describe(preset, name)}"
    needs = get_upsampler_class(name).needs_guide

    def make(B, H, W, ceil=0):
        x = torch.randn(B, 256, H, W)
        return (x, torch.randn(B, 256, 2 * H - ceil, 2 * W - ceil)) if needs else (x,)

    args = make(1, 64, 64)
    model = E.export_onnx(up, make(1, 16, 16), io.BytesIO())
    sess = E.onnx_session(model, threads)
    err = 0.0
    for a in (args, make(1, 33, 47, 1)):
        with torch.no_grad():
            ref = up(*a)
        (out,) = E.run_onnx(sess, a)
        err = max(err, float((torch.from_numpy(out) - ref).abs().max() / ref.abs().max()))
    ort_ms = E.onnx_latency(sess, args, repeats)
    cpu_ms = E.torch_latency(up, args, repeats, backend="cpu")
    return {"name": name, "module": module, "opset": model.opset_import[0].version, "nodes": len(model.graph.node),
            "ops": E.count_nodes(model), "max_rel_error": err, "ort_ms": round(ort_ms, 2),
            "cpu_ms": round(cpu_ms, 2), "ratio": round(ort_ms / cpu_ms, 2), "threads": threads,
            "onnxruntime": onnxruntime.__version__, **versions(), "machine": machine_info(),
            "git_commit": git_commit(), "loadavg_1m": os.getloadavg()[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", default=None, help="upsamplers (default: all registered)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--preset", default="segformer", choices=("segformer", "upernet", "fpn", "none"),
                   help="whose published configuration to build (default: segformer, the placement measured)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for name in args.names or sapa.list_upsamplers():
        print(json.dumps(case(name, args.repeats, args.threads, args.preset)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
