#!/usr/bin/env bash
# The prepared device check: benchmarks/gpu/check.sh [--dry-run] OUTDIR
#
# On a CUDA machine with its own torch and triton (nothing installed, no network): the real-size
# kernel tests, `sapa bench --device cuda` (authors' shape, SegFormer-B1 / UPerNet / FPN placements),
# SegFormer-B1 training steps (bilinear, SAPA-B triton, SAPA-B reference) and a one-process torchrun
# (nccl, DDP, SyncBatchNorm, bf16) plus an fp16 GradScaler run; every record and summary.md go to
# OUTDIR. Under 8 minutes on one H200 (each step has its own limit, benchmarks/gpu/check.py).
# --dry-run: the same steps on a CPU at tiny sizes with TRITON_INTERPRET=1 (measures nothing).
# The Python used is $PYTHON, else python3 on PATH; src/ goes on PYTHONPATH.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
dry=()
if [[ "${1:-}" == "--dry-run" ]]; then dry=(--dry-run); shift; fi
if [[ $# -ne 1 ]]; then
  echo "usage: $0 [--dry-run] OUTDIR" >&2
  exit 2
fi
py="${PYTHON:-python3}"
if ! command -v "$py" >/dev/null 2>&1; then
  echo "check.sh: no Python: $py is not on PATH (set PYTHON=/path/to/python)" >&2
  exit 2
fi
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"
exec "$py" "$here/check.py" "${dry[@]}" "$1"
