"""``sapa compare``: which upsampler is better for this host, at what cost — end to end on a CPU.

For every chosen upsampler and seed, a small SegFormer-style host (``TinyEncoder`` at strides
4/8/16/32 + the real ``SegFormerHead`` with six upsamplers, embed dim 64) is trained from scratch on
the built-in synthetic segmentation set (128x128 scenes with discs, boxes, triangles, thin rings
and bars on a textured, noisy background; pixel-exact labels) and evaluated on its validation
split. The result is a table in the papers' shape: upsampler, GFLOPs, params, mIoU, bIoU,
latency, plus each upsampler's paired difference to bilinear.

A fair miniature: the settings are chosen for the scale structure of the papers' setting, not for
any method's result.

* 128x128 input: the maps at 1/32 and 1/16 are 4x4 and 8x8. At 64x64 they are 2x2 and 4x4, where a
  5x5 window is 84% / 51% zero padding (14% / 7% at the papers' 512x512), a regime the papers never
  see (docs/RESULTS.md has the measurements).
* The faithful modules: the host builds each upsampler's published SegFormer configuration
  (:mod:`sapa.models.presets`; SAPA-B is the NeurIPS LayerNorm + Linear module with d = 32, FADE is
  gated).
* The papers' head dropout (0.1) before the classifier.
* One evaluation rule for every method: the last checkpoint (evaluated once, after the last
  iteration).
* 450 iterations at batch 8: the budget that fits the default run (5 upsamplers x 1 seed) in
  under 5 minutes on 2 cores (600 iterations took 301-318 s there); chosen for time, not on a result.
* Embed dim 64 is a width at which every module's published configuration is meaningful (CARAFE and
  FADE compress to 64 channels, A2U needs a multiple of 32, SAPA-B/G project to d = 32 < E as in the
  papers); it is not tuned on any result.

Paired differences: every run of an upsampler is compared with the bilinear run of the same seed
(same initialisation of the shared layers' RNG stream, same data order); bilinear is always run as
the reference. Noise: a difference smaller than the seed-to-seed spread of such differences is
printed "within noise". The spread is the sample standard deviation over seeds of one seed's
paired difference, pooled over the upsamplers; a multi-seed run measures it itself, a one-seed run
of the default settings uses :data:`MEASURED_SPREAD` (recorded with its command), and a one-seed
run of other settings has none (run ``--seeds 3``).

Units: ``gflops`` are multiply-accumulates (the papers' "FLOPs", counted by
:func:`sapa.complexity.count_complexity`) of one forward pass at 1x3x128x128 (the demo's input,
not 512x512); ``params_m`` millions of parameters of the whole model; ``miou`` / ``biou`` in
percent (boundary IoU at d = 2% of the diagonal, see :mod:`sapa.metrics.segmentation`);
``latency_ms`` the median forward time at batch 1 on one CPU thread (not deterministic; a
property of the machine). ``runs.json`` also records, per run, the gradient norm during training
and, for the window SAPA variants, the share of softmax weight on zero-padded window taps per
stage.

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
REFERENCE = "bilinear"
# The demo's settings on top of the ``synthetic`` preset (the module docstring says why each).
DEMO_OVERRIDES = ("model.embed_dim=64", "model.dropout=0.1", "train.max_iters=450", "data.train_samples=2048",
                  "data.val_samples=128", "data.image_size=128", "data.batch_size=8", "train.eval_interval=0",
                  "train.ckpt_interval=0")
EVAL_RULE = "last"
#: Seed-to-seed spread (sample std over seeds of one seed's paired difference to bilinear, pooled
#: over the upsamplers) of the default settings, measured by ``command``; used to label one-seed
#: runs of the default settings (docs/RESULTS.md, "The 128x128 table", has the run).
MEASURED_SPREAD: dict | None = {
    "miou": 0.91, "biou": 1.17,
    "command": "`sapa compare --upsamplers all --seeds 3` at commit 8235b38 (13 upsamplers x 3 seeds, "
               "pooled over the 12 paired differences)"}
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
    import sys
    torch.set_num_threads(1)
    if "numba" not in sys.modules:
        os.environ["NUMBA_NUM_THREADS"] = "1"
        return
    # numba already read NUMBA_NUM_THREADS: changing the variable now makes its next compile raise
    # ("Cannot set NUMBA_NUM_THREADS to a different value once the threads have been launched");
    # set_num_threads lowers the count in use instead.
    try:
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
    t0, c0 = time.perf_counter(), time.process_time()
    tr = Trainer(cfg, dist=DistInfo(), log=lambda *a, **k: None)
    norms: list[float] = []
    params = [p for p in tr.model.parameters() if p.requires_grad]

    def grad_norm(_opt, _args, _kwargs):  # before every optimizer step: the global gradient norm
        grads = [p.grad for p in params if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))) if grads else 0.0)

    handle = tr.optimizer.register_step_pre_hook(grad_norm)
    try:
        out = tr.fit()
    finally:
        handle.remove()
    ev = out["last_eval"]
    preds = []
    model = tr.model.eval()
    with torch.no_grad():
        for i in figure_images:
            if i < len(tr.val_set):
                s = tr.val_set[i]
                logits = resize_logits(model(s["image"][None]).float(), s["label"].shape)
                preds.append(logits.argmax(1)[0].to(torch.uint8).numpy())
    tail = norms[-100:]
    return {"upsampler": upsampler, "seed": seed, "miou": ev["miou"], "biou": ev["biou"], "aacc": ev["aacc"],
            "iou_per_class": ev["iou_per_class"], "biou_per_class": ev["biou_per_class"],
            "train_s": round(time.perf_counter() - t0, 2), "cpu_s": round(time.process_time() - c0, 2),
            "preds": preds,
            "grad_norm": {"mean": _round(statistics.fmean(norms)) if norms else None,
                          "max": _round(max(norms)) if norms else None,
                          "last100_mean": _round(statistics.fmean(tail)) if tail else None},
            "padding_share": padding_share(model, tr.val_set)}


def _round(v: float, nd: int = 4) -> float:
    return round(float(v), nd)


def geometric_padding_share(h: int, w: int, kernel_size: int = 5) -> float:
    """Share of the K x K window taps of a low-res ``h x w`` map that fall outside it (zero padding),
    averaged over the map: what a uniform kernel puts on padding. 2x2: 0.84, 4x4: 0.51 at K = 5."""
    r = kernel_size // 2

    def inside(n):
        return [min(i, r) + min(n - 1 - i, r) + 1 for i in range(n)]
    return 1.0 - statistics.fmean(inside(h)) * statistics.fmean(inside(w)) / kernel_size ** 2


def padding_share(model: torch.nn.Module, dataset, n_images: int = 32) -> dict | None:
    """For a SegFormer head whose upsamplers call :func:`sapa.functional.sapa` (SAPA-I/B/G): the
    mean softmax weight on zero-padded window taps, per stage (the low-res map's stride, e.g.
    ``"1/32 (4x4)"``), over the first ``n_images`` of ``dataset``, with the uniform-kernel share
    beside it. ``None`` for other upsamplers."""
    from .. import functional as Fn
    head = getattr(model, "decode_head", None)
    ups = list(getattr(head, "upsamplers", []))
    if not ups:
        return None
    orig = Fn.sapa
    current: list[int] = [-1]
    acc: dict[int, list[float]] = {}
    sizes: dict[int, tuple[int, int]] = {}

    def recording(q, k, v, kernel_size=5, scale_factor=2, *args, **kwargs):
        idx = current[0]
        logits = Fn.window_similarity(q, k, kernel_size, scale_factor)
        w = torch.softmax(logits.float(), dim=1)
        H, W = k.shape[-2:]
        inside = Fn.window_similarity(torch.ones_like(q[:, :1]), torch.ones_like(k[:, :1]), kernel_size,
                                      scale_factor) != 0  # 1 on in-range taps (<1, 1> = 1), 0 on padding
        pad = (w * (~inside)).sum(1).mean()
        a = acc.setdefault(idx, [0.0, 0])
        a[0] += float(pad) * q.shape[0]
        a[1] += q.shape[0]
        sizes[idx] = (int(H), int(W))
        return orig(q, k, v, kernel_size, scale_factor, *args, **kwargs)

    hooks = [u.register_forward_pre_hook(lambda m, inp, i=i: current.__setitem__(0, i)) for i, u in enumerate(ups)]
    Fn.sapa = recording
    try:
        with torch.no_grad():
            for i in range(min(n_images, len(dataset))):
                model(dataset[i]["image"][None])
    finally:
        Fn.sapa = orig
        for h in hooks:
            h.remove()
    if not acc:
        return None
    full = min(min(hw) for hw in sizes.values())
    stages: dict[str, list] = {}
    for idx, (tot, n) in sorted(acc.items()):
        H, W = sizes[idx]
        stride = 32 // (2 ** (int(round(math.log2(H / full)))))
        key = f"1/{stride} ({H}x{W})"
        stages.setdefault(key, []).append(tot / n)
    return {key: {"softmax": _round(statistics.fmean(v)),
                  "uniform": _round(geometric_padding_share(*map(int, key.split("(")[1][:-1].split("x"))))}
            for key, v in stages.items()}


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
    if REFERENCE not in names:  # the paired differences need the reference's runs
        names.insert(0, REFERENCE)
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    jobs = max(1, min(jobs or min(2, os.cpu_count() or 1), len(names) * seeds))
    build_config(names[0], 0, overrides)  # validate overrides before any work
    t0 = time.perf_counter()

    prev_threads = torch.get_num_threads()
    if jobs == 1:
        # One thread from the start: an OpenMP pool created by a 2-thread op here (the complexity
        # count) keeps oneDNN's reorders parallel afterwards, and its second thread spun: a 64 px
        # run took over 4x its CPU time on a loaded machine (py-spy: GOMP_parallel in conv backward).
        torch.set_num_threads(1)
    try:
        costs = {n: complexity_of(n, overrides) for n in names}
    except BaseException:
        torch.set_num_threads(prev_threads)
        raise
    # Seed by seed, the reference first, then longest first: a short makespan within each seed, and
    # an interrupted multi-seed run (runs.jsonl) holds whole seeds with their reference runs.
    tasks = sorted(((n, s, tuple(overrides), FIGURE_IMAGES if s == 0 else ()) for n in names for s in range(seeds)),
                   key=lambda t: (t[1], t[0] != REFERENCE, -costs[t[0]]["latency_ms"]))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(tasks), desc="compare", unit="run", dynamic_ncols=True)
    runs = []
    partial = None
    if output is not None:  # one line per finished run, so an interrupted long run keeps what it did
        Path(output).mkdir(parents=True, exist_ok=True)
        partial = Path(output) / "runs.jsonl"
        partial.write_text("")

    def done(r):
        runs.append(r)
        if partial is not None:
            with partial.open("a") as f:
                f.write(json.dumps({k: v for k, v in r.items() if k != "preds"}) + "\n")
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{r['upsampler']} seed {r['seed']}: mIoU {100 * r['miou']:.2f} "
                                f"bIoU {100 * r['biou']:.2f}")

    try:
        if jobs == 1:
            for t in tasks:
                done(train_one(*t))
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed
            # One numba and one OpenMP thread from the workers' start (inherited from os.environ at
            # spawn): torch.set_num_threads(1) covers only the calling thread, and an op run before it
            # or from another thread gets a 2-thread team whose barrier spin-waits cost a loaded
            # machine several times the CPU time. The parent's values come back afterwards: numba
            # re-reads the variable at every compile and refuses a change once its threads run.
            saved = {k: os.environ.get(k) for k in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS")}
            os.environ["NUMBA_NUM_THREADS"] = "1"
            os.environ.setdefault("OMP_NUM_THREADS", "1")
            try:
                with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
                    futures = [pool.submit(_train_one_star, t) for t in tasks]
                    for f in as_completed(futures):
                        done(f.result())
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
    finally:
        torch.set_num_threads(prev_threads)
        if bar is not None:
            bar.close()

    rows, spread = summarise(runs, names, costs, seeds, default_settings=not list(overrides))
    cfg = build_config(names[0], 0, overrides)
    settings = {"host": f"TinyEncoder{tuple(cfg.model.widths)} + SegFormerHead(E={cfg.model.embed_dim})",
                "image_size": cfg.data.image_size, "iters": cfg.train.max_iters, "batch_size": cfg.data.batch_size,
                "train_samples": cfg.data.train_samples, "val_samples": cfg.data.val_samples,
                "dropout": cfg.model.dropout, "eval_rule": EVAL_RULE, "modules": "published SegFormer configurations",
                "seeds": seeds, "jobs": jobs, "overrides": list(overrides), "torch": torch.__version__,
                "spread": spread}
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


def _pooled_sd(diffs_by_name: dict[str, list[float]]) -> float | None:
    """sqrt(mean over upsamplers of the sample variance over seeds): the std of one seed's paired
    difference, pooled (needs >= 2 seeds)."""
    var = [statistics.variance(v) for v in diffs_by_name.values() if len(v) > 1]
    return math.sqrt(statistics.fmean(var)) if var else None


def summarise(runs: list[dict], names: list[str], costs: dict, seeds: int, default_settings: bool = False):
    """Rows of the table and the spread used to label them (see the module docstring). Each row:
    mean (± std over seeds) mIoU / bIoU, per-seed values, the paired difference to the reference
    (``d_miou``/``d_biou``: mean over seeds of ``metric(upsampler, seed) - metric(bilinear, seed)``,
    with per-seed values and std), and ``miou_within_noise``/``biou_within_noise``:
    ``|d| < spread`` (``None`` where no spread is known, and for the reference itself)."""
    by = {(r["upsampler"], r["seed"]): r for r in runs}
    ref = {s: by[(REFERENCE, s)] for s in range(seeds) if (REFERENCE, s) in by}
    diffs = {m: {} for m in ("miou", "biou")}
    for n in names:
        if n == REFERENCE:
            continue
        for m in diffs:
            diffs[m][n] = [round(100 * (by[(n, s)][m] - ref[s][m]), 2) for s in range(seeds)
                           if (n, s) in by and s in ref]
    if seeds > 1:
        spread = {m: _pooled_sd(diffs[m]) for m in diffs}
        spread = {m: (round(v, 2) if v is not None else None) for m, v in spread.items()}
        spread["source"] = f"this run ({seeds} seeds)"
    elif default_settings and MEASURED_SPREAD is not None:
        spread = {"miou": MEASURED_SPREAD["miou"], "biou": MEASURED_SPREAD["biou"],
                  "source": MEASURED_SPREAD["command"]}
    else:
        spread = {"miou": None, "biou": None, "source": None}
    rows = []
    for n in names:
        rs = sorted((r for r in runs if r["upsampler"] == n), key=lambda r: r["seed"])
        miou, miou_sd = _mean_std([100 * r["miou"] for r in rs])
        biou, biou_sd = _mean_std([100 * r["biou"] for r in rs])
        c = costs[n]
        row = {"upsampler": n, "gflops": round(c["gflops"], 4), "params_m": round(c["params_m"], 4),
               "miou": round(miou, 2), "biou": round(biou, 2), "latency_ms": round(c["latency_ms"], 3),
               "miou_std": round(miou_sd, 2), "biou_std": round(biou_sd, 2), "seeds": [r["seed"] for r in rs],
               "miou_runs": [round(100 * r["miou"], 2) for r in rs],
               "biou_runs": [round(100 * r["biou"], 2) for r in rs]}
        for m in ("miou", "biou"):
            d = diffs[m].get(n)
            if n == REFERENCE or not d:
                row.update({f"d_{m}": 0.0 if n == REFERENCE else None, f"d_{m}_runs": [], f"d_{m}_std": None,
                            f"{m}_within_noise": None})
                continue
            mean, sd = _mean_std(d)
            row.update({f"d_{m}": round(mean, 2), f"d_{m}_runs": d, f"d_{m}_std": round(sd, 2) if len(d) > 1 else None,
                        f"{m}_within_noise": None if spread[m] is None else bool(abs(mean) < spread[m])})
        pads = [r["padding_share"] for r in rs if r.get("padding_share")]
        if pads:
            row["padding_share"] = {k: {"softmax": round(statistics.fmean(p[k]["softmax"] for p in pads), 4),
                                        "uniform": pads[0][k]["uniform"]} for k in pads[0]}
        rows.append(row)
    return rows, spread


def _delta(r: dict, m: str, multi: bool) -> str:
    d = r.get(f"d_{m}")
    if d is None:
        return "-"
    if r["upsampler"] == REFERENCE:
        return "(reference)"
    text = f"{d:+.2f}" + (f" ± {r[f'd_{m}_std']:.2f}" if multi and r.get(f"d_{m}_std") is not None else "")
    return text + (" within noise" if r.get(f"{m}_within_noise") else "")


def format_table(result: CompareResult) -> str:
    s = result.settings
    multi = s["seeds"] > 1
    w = 16 if multi else 8
    dw = 28 if multi else 21
    lines = [f"# sapa compare: {s['host']}, synthetic {s['image_size']}x{s['image_size']}, {s['iters']} iters x "
             f"batch {s['batch_size']}, dropout {s.get('dropout')}, {s['val_samples']} val images, eval: "
             f"{s.get('eval_rule', EVAL_RULE)} checkpoint, seeds {s['seeds']}; GFLOPs = GMACs at "
             f"1x3x{s['image_size']}x{s['image_size']}; latency = batch-1 forward, 1 CPU thread",
             f"# d = paired difference to {REFERENCE} (same seed, same data order)",
             f"{'upsampler':<13}{'GFLOPs':>9}{'Params(M)':>11}{'mIoU':>{w}}{'d mIoU':>{dw}}"
             f"{'bIoU':>{w}}{'d bIoU':>{dw}}{'latency(ms)':>13}"]
    for r in result.rows:
        if multi:
            m, b = f"{r['miou']:.2f} ± {r['miou_std']:.2f}", f"{r['biou']:.2f} ± {r['biou_std']:.2f}"
        else:
            m, b = f"{r['miou']:.2f}", f"{r['biou']:.2f}"
        lines.append(f"{r['upsampler']:<13}{r['gflops']:>9.4f}{r['params_m']:>11.4f}{m:>{w}}{_delta(r, 'miou', multi):>{dw}}"
                     f"{b:>{w}}{_delta(r, 'biou', multi):>{dw}}{r['latency_ms']:>13.2f}")
    sp = s.get("spread") or {}
    if sp.get("miou") is not None:
        lines.append(f"# within noise: |d| < the seed-to-seed spread of d (std over seeds, pooled over upsamplers): "
                     f"mIoU {sp['miou']:.2f}, bIoU {sp['biou']:.2f}; measured by {sp['source']}")
    else:
        lines.append("# no seed spread is known for these settings: run with --seeds 3 (or more) to measure it "
                     "before reading a difference as real")
    pads = [(r["upsampler"], r["padding_share"]) for r in result.rows if r.get("padding_share")]
    for n, p in pads:
        lines.append(f"# {n}: softmax weight on zero-padded window taps per stage (uniform kernel): "
                     + ", ".join(f"{k} {100 * v['softmax']:.0f}% ({100 * v['uniform']:.0f}%)" for k, v in p.items()))
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
