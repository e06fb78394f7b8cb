"""``sapa compare``: which upsampler is better for this host, at what cost — end to end on a CPU.

For every chosen upsampler and seed, a small SegFormer-style host (``TinyEncoder`` at strides
4/8/16/32 + the real ``SegFormerHead`` with six upsamplers, embed dim 64) is trained from scratch on
the built-in synthetic segmentation set (64x64 scenes with discs, boxes, triangles, thin rings
and bars on a textured, noisy background; pixel-exact labels) and evaluated on its validation
split. The result is a table in the papers' shape: upsampler, GFLOPs, params, mIoU, bIoU,
latency.

Units: ``gflops`` are multiply-accumulates (the papers' "FLOPs", counted by
:func:`sapa.complexity.count_complexity`) of one forward pass at 1x3x64x64 (the demo's input,
not 512x512); ``params_m`` millions of parameters of the whole model; ``miou`` / ``biou`` in
percent (boundary IoU at d = 2% of the diagonal = 2 px, see :mod:`sapa.metrics.segmentation`);
``latency_ms`` the median forward time at batch 1 on one CPU thread (not deterministic; a
property of the machine).

Determinism: every run uses one torch thread (and one Numba thread) in its own process, seeded
data, seeded initialisation and a fixed data order, so the same seed gives the same mIoU / bIoU on
the same machine whatever ``jobs`` is. Runs are spread over ``jobs`` processes, longest first.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

DEFAULT_UPSAMPLERS = ("bilinear", "carafe", "fade", "sapa_b", "sapa_d")
# The demo's settings on top of the ``synthetic`` preset. Embed dim 64, not 32: with 32 channels the
# journal SAPA-B's GroupNorm(32, C) normalises every channel on its own over a 2x2 map at stride 32,
# which cripples it (measured: SAPA-B 74.9 vs bilinear 77.7 mIoU at E=32, 79.1 vs 78.7 at E=64).
DEMO_OVERRIDES = ("model.embed_dim=64", "train.max_iters=600", "data.train_samples=2048", "data.val_samples=128",
                  "data.image_size=64", "data.batch_size=8", "train.eval_interval=0", "train.ckpt_interval=0")
FIGURE_IMAGES = (0, 1, 2, 3)


@dataclass
class CompareResult:
    rows: list[dict]
    runs: list[dict]
    settings: dict
    wall_s: float
    files: dict = field(default_factory=dict)


def build_config(upsampler: str, seed: int, overrides=()):
    from .config import apply_overrides, get_preset
    return apply_overrides(get_preset("synthetic"), [*DEMO_OVERRIDES, *overrides, f"model.upsampler={upsampler!r}",
                                                      f"train.seed={seed}", "train.progress=False",
                                                      "train.output=None"])


def _single_thread():
    torch.set_num_threads(1)
    os.environ["NUMBA_NUM_THREADS"] = "1"
    try:
        import sys
        if "numba" in sys.modules:
            sys.modules["numba"].set_num_threads(1)
    except Exception:  # pragma: no cover
        pass


def train_one(upsampler: str, seed: int, overrides=(), figure_images=FIGURE_IMAGES) -> dict:
    """Train and evaluate one (upsampler, seed); returns metrics (fractions) and, for
    ``figure_images``, the predicted label maps."""
    _single_thread()
    from .distributed import DistInfo
    from .tiny import resize_logits
    from .trainer import Trainer

    cfg = build_config(upsampler, seed, overrides)
    t0 = time.perf_counter()
    tr = Trainer(cfg, dist=DistInfo(), log=lambda *a, **k: None)
    out = tr.fit()
    ev = out["last_eval"]
    preds = []
    model = tr.model.eval()
    with torch.no_grad():
        for i in figure_images:
            if i < len(tr.val_set):
                s = tr.val_set[i]
                logits = resize_logits(model(s["image"][None]).float(), s["label"].shape)
                preds.append(logits.argmax(1)[0].to(torch.uint8).numpy())
    return {"upsampler": upsampler, "seed": seed, "miou": ev["miou"], "biou": ev["biou"], "aacc": ev["aacc"],
            "iou_per_class": ev["iou_per_class"], "biou_per_class": ev["biou_per_class"],
            "train_s": round(time.perf_counter() - t0, 2), "preds": preds}


def _train_one_star(args):
    return train_one(*args)


def complexity_of(upsampler: str, overrides=(), repeats: int = 30) -> dict:
    """GMACs, params (M) and median batch-1 forward latency (ms, one thread) of the demo model."""
    from .builders import build_model
    cfg = build_config(upsampler, 0, overrides)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    size = cfg.data.image_size
    x = torch.randn(1, 3, size, size)
    gmacs, params = _count(model, x)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        with torch.no_grad():
            for i in range(repeats + 5):
                t = time.perf_counter()
                model(x)
                if i >= 5:
                    times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(prev)
    return {"gflops": gmacs, "params_m": params / 1e6, "latency_ms": 1e3 * statistics.median(times)}


def _count(model, x) -> tuple[float, int]:
    try:
        from ..complexity import count_complexity
    except ImportError:  # pragma: no cover  (sapa.complexity missing: aten-level count, custom ops = 0)
        from torch.utils.flop_counter import FlopCounterMode
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(x)
        return fc.get_total_flops() / 2 / 1e9, sum(p.numel() for p in model.parameters())
    c = count_complexity(model, x)
    return c.gmacs, c.params


def _mean_std(vals):
    vals = [v for v in vals if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def run_compare(upsamplers=DEFAULT_UPSAMPLERS, seeds: int = 1, overrides=(), jobs: int | None = None,
                output: str | os.PathLike | None = None, json_path: str | os.PathLike | None = None,
                progress: bool = True, figure: bool = True, log=print) -> CompareResult:
    """Train every (upsampler, seed) pair and summarise (see the module docstring)."""
    from ..registry import list_upsamplers
    valid = list_upsamplers()
    names = list(valid) if list(upsamplers) == ["all"] else list(dict.fromkeys(upsamplers))
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise KeyError(f"unknown upsampler(s) {', '.join(unknown)}; registered: {', '.join(valid)}")
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    jobs = max(1, min(jobs or min(2, os.cpu_count() or 1), len(names) * seeds))
    build_config(names[0], 0, overrides)  # validate overrides before any work
    t0 = time.perf_counter()

    costs = {n: complexity_of(n, overrides) for n in names}
    tasks = sorted(((n, s, tuple(overrides), FIGURE_IMAGES if s == 0 else ()) for n in names for s in range(seeds)),
                   key=lambda t: -costs[t[0]]["latency_ms"])  # longest first: shortest makespan
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(tasks), desc="compare", unit="run", dynamic_ncols=True)
    runs = []

    def done(r):
        runs.append(r)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{r['upsampler']} seed {r['seed']}: mIoU {100 * r['miou']:.2f} "
                                f"bIoU {100 * r['biou']:.2f}")

    try:
        if jobs == 1:
            prev = torch.get_num_threads()
            try:
                for t in tasks:
                    done(train_one(*t))
            finally:
                torch.set_num_threads(prev)
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed
            os.environ["NUMBA_NUM_THREADS"] = "1"  # inherited by the workers
            with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
                futures = [pool.submit(_train_one_star, t) for t in tasks]
                for f in as_completed(futures):
                    done(f.result())
    finally:
        if bar is not None:
            bar.close()

    rows = []
    for n in names:
        rs = sorted((r for r in runs if r["upsampler"] == n), key=lambda r: r["seed"])
        miou, miou_sd = _mean_std([100 * r["miou"] for r in rs])
        biou, biou_sd = _mean_std([100 * r["biou"] for r in rs])
        c = costs[n]
        rows.append({"upsampler": n, "gflops": round(c["gflops"], 4), "params_m": round(c["params_m"], 4),
                     "miou": round(miou, 2), "biou": round(biou, 2), "latency_ms": round(c["latency_ms"], 3),
                     "miou_std": round(miou_sd, 2), "biou_std": round(biou_sd, 2), "seeds": [r["seed"] for r in rs],
                     "miou_runs": [round(100 * r["miou"], 2) for r in rs],
                     "biou_runs": [round(100 * r["biou"], 2) for r in rs]})
    cfg = build_config(names[0], 0, overrides)
    settings = {"host": f"TinyEncoder{tuple(cfg.model.widths)} + SegFormerHead(E={cfg.model.embed_dim})",
                "image_size": cfg.data.image_size, "iters": cfg.train.max_iters, "batch_size": cfg.data.batch_size,
                "train_samples": cfg.data.train_samples, "val_samples": cfg.data.val_samples,
                "seeds": seeds, "jobs": jobs, "overrides": list(overrides), "torch": torch.__version__}
    result = CompareResult(rows, runs, settings, time.perf_counter() - t0)
    if output is not None:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.txt").write_text(format_table(result) + "\n")
        result.files["table"] = str(out / "compare.txt")
        (out / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")
        result.files["json"] = str(out / "compare.json")
        (out / "runs.json").write_text(json.dumps({"settings": settings, "wall_s": result.wall_s,
                                                   "runs": [{k: v for k, v in r.items() if k != "preds"}
                                                            for r in runs]}, indent=2) + "\n")
        if figure:
            result.files["figure"] = str(plot_predictions(result, cfg, out / "compare.png"))
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(rows, indent=2) + "\n")
        result.files["json_path"] = str(json_path)
    return result


def format_table(result: CompareResult) -> str:
    s = result.settings
    multi = s["seeds"] > 1
    lines = [f"# sapa compare: {s['host']}, synthetic {s['image_size']}x{s['image_size']}, {s['iters']} iters x "
             f"batch {s['batch_size']}, {s['val_samples']} val images, seeds {s['seeds']}; GFLOPs = GMACs at "
             f"1x3x{s['image_size']}x{s['image_size']}; latency = batch-1 forward, 1 CPU thread",
             f"{'upsampler':<13}{'GFLOPs':>9}{'Params(M)':>11}{'mIoU':>{16 if multi else 8}}"
             f"{'bIoU':>{16 if multi else 8}}{'latency(ms)':>13}"]
    for r in result.rows:
        if multi:
            m = f"{r['miou']:.2f} ± {r['miou_std']:.2f}"
            b = f"{r['biou']:.2f} ± {r['biou_std']:.2f}"
            w = 16
        else:
            m, b, w = f"{r['miou']:.2f}", f"{r['biou']:.2f}", 8
        lines.append(f"{r['upsampler']:<13}{r['gflops']:>9.4f}{r['params_m']:>11.4f}{m:>{w}}{b:>{w}}"
                     f"{r['latency_ms']:>13.2f}")
    return "\n".join(lines)


def _colorize(label: np.ndarray) -> np.ndarray:
    palette = np.array([[40, 40, 40], [220, 60, 60], [60, 120, 230], [210, 210, 60], [40, 220, 200],
                        [250, 250, 250]] + [[128, 128, 128]] * 250, dtype=np.uint8)
    return palette[label]


def _boundary_error_map(pred: np.ndarray, gt: np.ndarray, num_classes: int, d: int) -> tuple[np.ndarray, float]:
    """RGB map of the class boundary bands: green where prediction and ground truth agree, red for
    prediction-only band pixels, blue for missed ground-truth band pixels; and the image's bIoU."""
    from ..metrics.segmentation import BoundaryIoU, boundary_band
    p, g = torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(gt.astype(np.int64))
    cls = torch.arange(num_classes)[:, None, None]
    pb = boundary_band(p[None] == cls, d)
    gb = boundary_band(g[None] == cls, d)
    both = (pb & gb).any(0).numpy()
    ponly = (pb & ~gb).any(0).numpy() & ~both
    gonly = (gb & ~pb).any(0).numpy() & ~both
    img = np.full(pred.shape + (3,), 255, dtype=np.uint8)
    img[both] = (60, 170, 60)
    img[ponly] = (220, 40, 40)
    img[gonly] = (40, 80, 230)
    m = BoundaryIoU(num_classes, dilation=d)
    m.update(p, g)
    return img, m.compute()["biou"]


def plot_predictions(result: CompareResult, cfg, path) -> Path:
    """For each figure image: the image and its ground truth, then per upsampler (seed 0) the
    prediction (top) and its boundary errors (bottom)."""
    from .._optional import optional_import

    with optional_import("matplotlib", "the comparison figure"):
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

    from ..data import SyntheticSegmentation
    from ..metrics.segmentation import dilation_pixels

    ds = SyntheticSegmentation(cfg.data.val_samples, cfg.data.image_size, cfg.data.seed, "val")
    runs = {r["upsampler"]: r for r in result.runs if r["seed"] == 0}
    names = [r["upsampler"] for r in result.rows]
    imgs = [i for i in FIGURE_IMAGES if i < len(ds)]
    ncol = 1 + len(names)
    fig, axes = plt.subplots(2 * len(imgs), ncol, figsize=(1.7 * ncol, 3.4 * len(imgs)), squeeze=False)
    d = dilation_pixels(cfg.data.image_size, cfg.data.image_size, 0.02)
    for row, i in enumerate(imgs):
        img, gt = ds.raw(i)
        a, b = axes[2 * row], axes[2 * row + 1]
        a[0].imshow(img)
        a[0].set_title(f"val #{i}", fontsize=8)
        b[0].imshow(_colorize(gt))
        b[0].set_title("ground truth", fontsize=8)
        for k, n in enumerate(names, start=1):
            pred = runs[n]["preds"][row]
            a[k].imshow(_colorize(pred))
            err, bi = _boundary_error_map(pred, gt, ds.num_classes, d)
            b[k].imshow(err)
            if row == 0:
                a[k].set_title(n, fontsize=9)
            b[k].set_title(f"bIoU {100 * bi:.1f}", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("predictions (odd rows) and boundary bands (even rows: green = agree, red = predicted only, "
                 "blue = missed)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
