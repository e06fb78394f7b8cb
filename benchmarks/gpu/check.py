"""The prepared device check behind ``benchmarks/gpu/check.sh [--dry-run] OUTDIR``.

Steps (each a subprocess with its own time limit, its output in ``OUTDIR/<step>.log``):

1. ``env``: torch / triton / CUDA / driver / GPU, optional packages present (``env.json``);
2. ``tests``: the real-size kernel tests, ``tests/gpu/test_kernels_cuda.py`` (every Triton kernel vs
   the reference, forward and every gradient, fp32 / bf16 / fp16, odd and ceil-mode sizes, int64
   indices), run by the module's own loop, so pytest is optional (``tests.jsonl``), with
   ``SAPA_TRITON_AUTOTUNE=0`` (one compile per kernel) plus every autotune config of both fused
   forwards at the authors' shape;
3. ``bench-*``: ``sapa bench --device cuda`` in bf16 at the authors' shape, then the SegFormer-B1,
   UPerNet and FPN placements, and fp32 ``sapa`` at the authors' shape (``bench-*.jsonl``);
4. ``train``: ``benchmarks/gpu/train_check.py``: 200 iterations of SegFormer-B1 at 512x512, batch 8,
   bf16 autocast, bilinear / SAPA-B triton / SAPA-B reference (``train.jsonl``);
5. ``ddp``: ``torchrun --nproc_per_node 1 -m sapa train`` on the synthetic preset with
   ``SAPA_DDP_ALWAYS=1`` (nccl group, DDP, SyncBatchNorm), bf16, pinned-memory loading; then
   ``amp``: the same preset with fp16 autocast and the GradScaler.

Then ``summary.md`` (the numbers the issue asks for, read from the records) and ``summary.json``.
``--dry-run``: the same steps on a CPU at tiny sizes, triton under TRITON_INTERPRET=1, gloo instead
of nccl: it checks that the script runs end to end, it measures nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# seconds per step on the GPU; the sum stays under 8 minutes with the start-up of each process
# (kernel compiles are cached on disk by triton, so later steps reuse what earlier ones compiled)
# Compiles: one kernel takes 2.5-6.5 s for sm_90 on a 2-core CPU (triton.compile, measured without a
# GPU); the kernel tests compile ~12 kernels for 5 (dtype, K, s) sets with one config each.
LIMITS = {"env": 15, "tests": 150, "bench-authors": 70, "bench-segformer-b1": 30, "bench-upernet": 30,
          "bench-fpn": 30, "bench-fp32": 25, "train": 80, "ddp": 30, "amp": 20}
DRY_LIMITS = {k: 400 for k in LIMITS}  # the dry run checks that the steps work, not their time


def _env(dry: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("SAPA_LOG_LEVEL", "WARNING")
    if dry:
        env["TRITON_INTERPRET"] = "1"
        env["SAPA_GPU_CHECK_DRY"] = "1"
        env.setdefault("OMP_NUM_THREADS", "1")
    else:
        env.pop("TRITON_INTERPRET", None)
        env.pop("SAPA_GPU_CHECK_DRY", None)
    return env


def _skipped() -> set[str]:
    """SAPA_CHECK_SKIP=step,step: steps to leave out (the default test suite's dry run skips 'train',
    a minute of triton interpreter time)."""
    return {s.strip() for s in os.environ.get("SAPA_CHECK_SKIP", "").split(",") if s.strip()}


def _run(name: str, cmd: list[str], out: Path, limit: float, env: dict, status: dict) -> int | None:
    if name in _skipped():
        status[name] = {"rc": 0, "seconds": 0.0, "log": "", "result": "skipped (SAPA_CHECK_SKIP)"}
        print(f"[check] {name:<17} skipped", flush=True)
        return 0
    log = out / f"{name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            rc = None
    dt = time.perf_counter() - t0
    status[name] = {"rc": rc, "seconds": round(dt, 1), "log": log.name,
                    "result": "ok" if rc == 0 else ("timeout" if rc is None else f"failed (rc {rc})")}
    print(f"[check] {name:<17} {status[name]['result']:<14} {dt:6.1f} s", flush=True)
    return rc


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    recs = []
    for line in path.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return recs


def _find(recs, **kw):
    for r in recs:
        if all(r.get(k) == v for k, v in kw.items()) and "median_ms" in r:
            return r
    return None


def summarise(out: Path, status: dict, dry: bool) -> str:
    """summary.md: the issue's numbers, each with the record it comes from (or why it is missing)."""
    lines = ["# Device check summary", ""]
    env = json.loads((out / "env.json").read_text()) if (out / "env.json").exists() else {}
    gpu = env.get("gpu") or {}
    lines.append(f"{'DRY RUN on CPU (nothing here is a GPU measurement)' if dry else 'GPU run'}: "
                 f"{gpu.get('name', 'no GPU')} driver {gpu.get('driver')}, torch {env.get('torch')}, "
                 f"triton {env.get('triton')}, commit {env.get('git_commit')}")
    lines += ["", "| step | result | seconds |", "|---|---|---|"]
    lines += [f"| {k} | {v['result']} | {v['seconds']} |" for k, v in status.items()]
    tests = _read_jsonl(out / "tests.jsonl")
    if tests:
        bad = [t for t in tests if t.get("outcome") == "failed"]
        lines += ["", f"Kernel tests: {sum(t.get('outcome') == 'passed' for t in tests)} passed, {len(bad)} failed, "
                      f"{sum(t.get('outcome') == 'skipped' for t in tests)} skipped."]
        lines += [f"* FAILED {t['name']}: {t.get('message', '')[:300]}" for t in bad[:20]]
    bench = _read_jsonl(out / "bench-authors.jsonl")
    lines += ["", "## Targets at the authors' shape (bf16; B=1, C=256, 120x120 -> 240x240, K=5, d=32)", ""]
    checks = []

    def target(what, value, goal, ok):
        checks.append(ok)
        lines.append(f"* {what}: {value} (goal {goal}) -> {'MET' if ok else 'NOT MET'}")

    sf = _find(bench, op="sapa", backend="triton", mode="fwd")
    if sf:
        target("fused sapa fwd / bilinear", f"{sf.get('vs_bilinear')}x ({sf['median_ms']} ms)", "<= 3x",
               sf.get("vs_bilinear", 1e9) <= 3)
        target("fused sapa fwd, fraction of copy bandwidth", f"{sf.get('frac_copy_bw')} "
               f"({sf.get('achieved_gbs')} of {sf.get('copy_gbs')} GB/s)", ">= 0.40", sf.get("frac_copy_bw", 0) >= 0.4)
    else:
        lines.append("* fused sapa fwd: no record")
    for op in ("sapa", "sapa_deform"):
        r = _find(bench, op=op, backend="triton", mode="fwd+bwd")
        if r:
            target(f"{op} fwd+bwd speed-up vs reference", f"{r.get('speedup_vs_reference')}x ({r['median_ms']} ms)",
                   ">= 10x", r.get("speedup_vs_reference", 0) >= 10)
        else:
            lines.append(f"* {op} fwd+bwd: no record")
    fpn = [r for r in _read_jsonl(out / "bench-placements.jsonl")
           if r.get("shape_set") == "fpn" and r.get("backend") == "triton" and "vs_bilinear" in r]
    if fpn:
        worst = max(fpn, key=lambda r: r["vs_bilinear"])
        target("FPN 800x1333: slowest triton op / bilinear", f"{worst['vs_bilinear']}x ({worst['op']} "
               f"{worst['shape']} {worst['mode']})", "<= 3x", worst["vs_bilinear"] <= 3)
    else:
        lines.append("* FPN placements: no triton records")
    train = _read_jsonl(out / "train.jsonl")
    summ = next((r for r in train if r.get("type") == "train-check"), None)
    lines += ["", "## SegFormer-B1 training (200 iterations, 512x512, batch 8, bf16 autocast)", ""]
    if summ and "skipped" in summ:
        lines.append(f"* skipped: {summ['skipped']}")
    elif summ:
        for r in train:
            if r.get("type") == "train-run":
                lines.append(f"* {r['upsampler']} / {r['backend']}: step {r['step_ms_median']} ms, peak "
                             f"{(r.get('peak_mem_bytes') or 0) / 2**20:.0f} MiB, loss {r['losses'][0]} -> {r['losses'][-1]}")
        target("SAPA-B step / bilinear", summ.get("step_ratio_sapa_b_vs_bilinear"), "<= 1.3",
               (summ.get("step_ratio_sapa_b_vs_bilinear") or 1e9) <= 1.3)
        if "mem_ratio_sapa_b_vs_bilinear" in summ:
            target("SAPA-B peak memory / bilinear", summ["mem_ratio_sapa_b_vs_bilinear"], "<= 1.2",
                   summ["mem_ratio_sapa_b_vs_bilinear"] <= 1.2)
        target("triton vs reference loss curves", f"first {summ['first_rel_diff']}, windows max "
               f"{summ['window_rel_diff_max']}", f"<= {summ['first_tol']} / <= {summ['window_tol']}", summ["agree"])
    else:
        lines.append("* no training records")
    if dry:
        lines += ["", "(dry run: the MET / NOT MET lines above are CPU interpreter timings and mean nothing)"]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"dry_run": dry, "steps": status, "env": env}, indent=2))
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output folder (created)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, TRITON_INTERPRET=1")
    args = ap.parse_args(argv)
    dry = args.dry_run
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    env = _env(dry)
    limits = DRY_LIMITS if dry else LIMITS
    status: dict = {}
    t_start = time.perf_counter()

    _run("env", [py, str(ROOT / "benchmarks/gpu/env_info.py"), str(out / "env.json")], out, limits["env"], env,
         status)
    # first config only: each autotune config is one more compile per kernel, dtype and K / s
    _run("tests", [py, str(ROOT / "tests/gpu/test_kernels_cuda.py"), str(out / "tests.jsonl")], out,
         limits["tests"], dict(env, SAPA_TRITON_AUTOTUNE="0"), status)
    device = "cpu" if dry else "cuda"
    bench = [py, "-m", "sapa", "bench", "--device", device, "--backends", "reference", "triton", "--floor"]
    if dry:
        _run("bench-authors", bench + ["--shapes", "tiny", "--dtype", "bfloat16", "--repeats", "1", "--ops", "sapa",
                                       "--modes", "fwd+bwd", "--json", str(out / "bench-authors.jsonl")],
             out, limits["bench-authors"], env, status)
    else:
        _run("bench-authors", bench + ["--shapes", "authors", "--dtype", "bfloat16", "--json",
                                       str(out / "bench-authors.jsonl")], out, limits["bench-authors"], env, status)
        for shapes in ("segformer-b1", "upernet", "fpn"):  # one process each: a timeout loses one set only
            _run(f"bench-{shapes}", bench + ["--shapes", shapes, "--dtype", "bfloat16", "--json",
                                             str(out / "bench-placements.jsonl")],
                 out, limits[f"bench-{shapes}"], env, status)
        _run("bench-fp32", bench + ["--shapes", "authors", "--dtype", "float32", "--ops", "sapa",
                                    "--json", str(out / "bench-fp32.jsonl")],
             out, limits["bench-fp32"], env, status)
    train = [py, str(ROOT / "benchmarks/gpu/train_check.py"), str(out / "train.jsonl")]
    train += ["--dry-run", "--iters", "1", "--size", "32", "--batch", "2"] if dry else ["--iters", "200"]
    _run("train", train, out, limits["train"], env, status)
    tiny = ["--set", "data.image_size=32", "--set", "data.train_samples=8", "--set", "data.val_samples=4",
            "--set", "data.batch_size=4", "--set", "model.widths=(8, 8, 16, 16)", "--set", "model.embed_dim=32",
            "--set", "train.max_iters=2"] if dry else ["--set", "train.max_iters=60"]
    common = [py, "-m", "sapa", "train", "--preset", "synthetic", "--set", "train.amp=true", "--set",
              "train.progress=False", "--set", "train.eval_interval=0", "--set",
              f"train.device={'cpu' if dry else 'cuda'}", "--set", "train.log_interval=10", *tiny]
    ddp_env = dict(env, SAPA_DDP_ALWAYS="1")
    workers = "0" if dry else "2"
    _run("ddp", [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *common[1:],
                 "--set", "train.amp_dtype='bfloat16'", "--set", "model.sync_bn=true", "--set",
                 f"data.num_workers={workers}", "--output", str(out / "ddp-run")], out, limits["ddp"], ddp_env, status)
    _run("amp", [*common, "--set", "train.amp_dtype='float16'", "--set", "data.num_workers=0", "--output",
                 str(out / "amp-run")], out, limits["amp"], env, status)
    status["total"] = {"rc": 0, "seconds": round(time.perf_counter() - t_start, 1), "log": "", "result": "-"}
    print(summarise(out, status, dry), flush=True)
    failed = [k for k, v in status.items() if k != "total" and v["rc"] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
