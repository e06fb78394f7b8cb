"""Write the check's environment as JSON: versions, GPU, driver, commit, which optional packages import.

    python benchmarks/gpu/env_info.py OUT.json
"""
from __future__ import annotations

import importlib
import json
import sys

import torch


def main(path: str) -> int:
    from sapa.bench.runner import git_commit, versions

    info = {**versions(), "git_commit": git_commit(), "cuda_available": torch.cuda.is_available(),
            "torch_cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        from sapa.bench.device import CudaProbe

        info.update(CudaProbe().info())
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
    optional = {}
    for mod in ("transformers", "torchvision", "pycocotools", "pytest", "numba", "tqdm", "matplotlib"):
        try:
            m = importlib.import_module(mod)
            optional[mod] = getattr(m, "__version__", "present")
        except Exception as err:  # noqa: BLE001 - any import failure means "not usable here"
            optional[mod] = f"missing ({type(err).__name__})"
    info["optional"] = optional
    with open(path, "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
