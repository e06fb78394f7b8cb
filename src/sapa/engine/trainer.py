"""The plain-PyTorch training loop: iteration based, DDP-aware, resumable to the same continuation.

Run folder (``train.output``): ``config.json``, ``log.jsonl`` (one JSON record per log step /
evaluation), ``curves.png`` (loss and metrics), ``last.pt`` (everything needed to continue:
model, optimizer, schedule, GradScaler, RNG states of every rank for torch / CUDA / numpy /
python, iteration, best-so-far) and ``best.pt`` (the weights of the best periodic evaluation —
the papers report the best of their periodic evaluations, docs/SEMANTICS.md §6.1).

Exact resumption: data order and augmentation are functions of (seed, epoch, position) through
:class:`sapa.data.ResumableSampler`; the loaders own their generators, so nothing but the model's
own randomness (dropout) touches the global RNGs, and those are checkpointed per rank. Resuming
``last.pt`` written at iteration k and training to N gives the same weights as an uninterrupted
run to N (tested). A run folder that already holds ``last.pt`` is never started afresh over it:
pass ``resume`` to continue it, or choose another folder.

Reliability: the run folder is locked (one process per folder, see :mod:`sapa.engine.rundir`) and
stale temporary files of a killed write are removed on start; the validation set and the
evaluation settings are checked before the first iteration; ``last.pt`` is written *before* each
periodic evaluation (with ``eval_pending``, so a run killed by a failing evaluation resumes by
redoing just that evaluation) and again after it; a state holding NaN / inf is never written over a
good checkpoint (:class:`NonFiniteStateError`, the last good one stays); on resume, records of
``log.jsonl`` written after the checkpoint are dropped (they are written again), and changed
optimizer / schedule hyper-parameters are applied and listed (a change of optimizer or of its
parameter groups is refused).
"""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..data.samplers import ResumableSampler
from .builders import build_dataset, build_model, build_optimizer, dataset_num_classes
from .checkpoint import FORMAT, CheckpointError, load_checkpoint, nonfinite_entries, save_checkpoint
from .config import Config, metric_names, validate
from .distributed import DistInfo, init_distributed
from .evaluate import evaluate_detection, evaluate_segmentation
from .precision import convert_sync_bn, pin_memory, resolve_precision
from .rundir import RunFolderLock, clean_stale_temp
from .runlog import RunLog, plot_curves
from .schedule import IterLRSchedule
from .tiny import resize_logits


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                       int(np_state[3]), float(np_state[4])],
             "python": _py_state_to_lists(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _py_state_to_lists(s):
    return [s[0], list(s[1]), s[2]]


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class _SegTrainModule(torch.nn.Module):
    """What DDP wraps for segmentation: ``(main logits, aux logits or None)``; models with
    ``forward_with_aux`` (UPerNet) give their auxiliary head's logits while training."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, img):
        if self.training and hasattr(self.model, "forward_with_aux"):
            return self.model.forward_with_aux(img)
        return self.model(img), None


class NonFiniteStateError(FloatingPointError):
    """The training state (weights, buffers, optimizer) holds NaN / inf, or the loss is non-finite."""


# resume: these optimizer settings decide the optimizer's state layout and cannot change mid-run
_RESUME_FIXED = ("optim.name", "optim.head_keys", "optim.no_decay_keys")
# these are re-applied from the (possibly overridden) config after the optimizer state is loaded
_GROUP_KEYS = ("initial_lr", "lr", "weight_decay", "betas", "momentum")


def _config_changes(old: dict, cfg: Config, sections=("optim", "schedule")) -> list[tuple[str, object, object]]:
    new = cfg.to_dict()
    out = []
    for sec in sections:
        for k, v in new[sec].items():
            ov = old.get(sec, {}).get(k, v)
            if (list(ov) if isinstance(ov, (list, tuple)) else ov) != (list(v) if isinstance(v, (list, tuple)) else v):
                out.append((f"{sec}.{k}", ov, v))
    return out


def _seg_collate(batch):
    return torch.utils.data.default_collate([{"image": b["image"], "label": b["label"]} for b in batch])


class Trainer:
    """Train ``cfg`` (see :mod:`sapa.engine.config`).

    Args:
        cfg: the configuration.
        resume: path of a ``last.pt`` to continue from (its weights, optimizer, schedule, RNG and
            data position); ``None`` starts afresh.
        dist: process-group info; default: :func:`init_distributed` (torchrun environment).
        model, train_set, val_set: optional pre-built objects (otherwise built from ``cfg``).
        log: callable for human-readable messages on rank 0 (default: print).
    """

    def __init__(self, cfg: Config, resume: str | Path | None = None, dist: DistInfo | None = None,
                 model=None, train_set=None, val_set=None, log=print):
        validate(cfg)
        self.cfg = cfg
        self.info = dist or init_distributed(cfg.train.device)
        self.device = self.info.device
        self.say = log if self.info.is_main else (lambda *a, **k: None)
        self.out = Path(cfg.train.output) if cfg.train.output else None
        self._lock = None
        if self.out is not None and self.info.is_main:
            self._lock = RunFolderLock(self.out).acquire()
        try:
            self._setup(cfg, resume, model, train_set, val_set)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run folder (done at the end of :meth:`fit`; a later ``fit`` takes it again)."""
        if self._lock is not None:
            self._lock.release()

    def _setup(self, cfg, resume, model, train_set, val_set) -> None:
        t = cfg.train
        if self.out is not None and self.info.is_main:
            for p in clean_stale_temp(self.out):
                self.say(f"note: removed {p.name}, left by an interrupted write")
        if self.out is not None and resume is None and (self.out / "last.pt").exists():
            raise ValueError(f"{self.out / 'last.pt'} already exists: pass resume (sapa train --resume) to continue "
                             f"that run, or choose another output folder; refusing to start over it")
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        ckpt = load_checkpoint(resume) if resume is not None else None

        seed_everything(t.seed)  # same initial weights on every rank
        self.num_classes = dataset_num_classes(cfg) if train_set is None else train_set.num_classes
        self.model = (model if model is not None else build_model(cfg, self.num_classes)).to(self.device)
        self.model = convert_sync_bn(self.model, cfg.model.sync_bn, self.info, self.say)
        self.train_set = train_set if train_set is not None else build_dataset(cfg, "train")
        self.val_set = val_set if val_set is not None else build_dataset(cfg, "val")
        self._check_eval_setup()
        ws = self.info.world_size
        if cfg.data.batch_size % ws:
            raise ValueError(f"data.batch_size={cfg.data.batch_size} (total) is not divisible by the world size {ws}")
        self.batch = cfg.data.batch_size // ws
        self.sampler = ResumableSampler(len(self.train_set), seed=t.seed, rank=self.info.rank, world_size=ws)
        self.iters_per_epoch = len(self.sampler) // self.batch
        if self.iters_per_epoch < 1:
            raise ValueError(f"training set of {len(self.train_set)} samples is smaller than one batch per rank "
                             f"({self.batch})")
        self.max_iters = t.max_iters if t.epochs is None else t.epochs * self.iters_per_epoch
        milestones = cfg.schedule.milestones
        if t.epochs is not None:
            milestones = [m * self.iters_per_epoch for m in milestones]
        self.optimizer = build_optimizer(cfg, self.model)
        self.schedule = IterLRSchedule(self.optimizer, self.max_iters, cfg.schedule.policy, cfg.schedule.power,
                                       cfg.schedule.min_lr, milestones, cfg.schedule.gamma,
                                       cfg.schedule.warmup_iters, cfg.schedule.warmup_ratio)
        self.precision = resolve_precision(self.device, t.amp, t.amp_dtype)
        self.use_scaler = self.precision.use_scaler
        self.scaler = self.precision.scaler()
        self.ddp = _SegTrainModule(self.model) if cfg.task == "segmentation" else self.model
        if self.info.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.ddp = DDP(self.ddp, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                           find_unused_parameters=cfg.task == "detection")
        self.iteration = 0
        self.eval_pending = False
        self.best = {"metric": t.best_metric, "value": None, "iteration": None}
        torch.manual_seed(t.seed + self.info.rank)  # per-rank randomness (dropout) from here on
        random.seed(t.seed + self.info.rank)
        np.random.seed((t.seed + self.info.rank) % 2 ** 32)
        if ckpt is not None:
            self._restore(ckpt, resume)
        k, pending = self.iteration, self.eval_pending
        self.log = RunLog(self.out / "log.jsonl" if (self.out and self.info.is_main) else None,
                          append=ckpt is not None,
                          keep=lambda r: r.get("iter", 0) < k or (r.get("iter", 0) == k and not
                                                                   (pending and r.get("type") == "eval")))
        if self.out is not None and self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    def _check_eval_setup(self) -> None:
        """Fail before the first iteration, not at the first evaluation, on an empty or unreadable
        validation set (its first sample is loaded) or a best_metric evaluation cannot give."""
        key, valid = self.cfg.train.best_metric, metric_names(self.cfg.task)
        if key not in valid:
            raise KeyError(f"train.best_metric={key!r} is not a {self.cfg.task} metric; valid: {', '.join(valid)}")
        if len(self.val_set) == 0:
            raise ValueError(f"the validation set ({self.cfg.data.dataset}) is empty: nothing to evaluate")
        self.val_set[0]  # raises naming the file if the data cannot be read

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        from ..metrics._dist import all_gather_objects
        return {"format": FORMAT, "version": 1, "config": self.cfg.to_dict(), "iteration": self.iteration,
                "epoch": self.iteration // self.iters_per_epoch, "world_size": self.info.world_size,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": all_gather_objects(_rng_state()), "best": dict(self.best),
                "eval_pending": self.eval_pending}

    def _restore(self, ckpt: dict, path) -> None:
        changes = _config_changes(ckpt.get("config", {}), self.cfg)
        fixed = [c for c in changes if c[0] in _RESUME_FIXED]
        if fixed:
            listing = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, a, b in fixed)
            raise ValueError(f"cannot resume {path} with a different {', '.join(k for k, _, _ in fixed)} ({listing}): "
                             f"the optimizer state does not carry over; keep the checkpoint's value or start a new "
                             f"run (no --resume) from its weights")
        fresh = [{k: g[k] for k in _GROUP_KEYS if k in g} for g in self.optimizer.param_groups]
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"checkpoint {path} does not match this model / optimizer: {err}") from err
        # the loaded groups carry the checkpoint's lr / betas / ...: put this config's values back,
        # so an override such as --set optim.lr=0.5 takes effect (identical values when unchanged)
        for g, f in zip(self.optimizer.param_groups, fresh):
            g.update(f)
        if changes:
            self.say("resume: applying changed settings " + ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changes))
        self.schedule.load_state_dict(ckpt["schedule"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration = int(ckpt["iteration"])
        self.best = dict(ckpt["best"])
        self.eval_pending = bool(ckpt.get("eval_pending", False))
        rng = ckpt["rng"]
        if len(rng) == self.info.world_size:
            _set_rng_state(rng[self.info.rank])
        else:
            self.say(f"note: {path} was written by {len(rng)} process(es), resuming with {self.info.world_size}: "
                     f"RNG states are not restored, the continuation is not bit-identical")
        self.say(f"resumed from {path} at iteration {self.iteration}")

    def save(self, name: str, state: dict | None = None) -> Path | None:
        state = state if state is not None else self.state_dict()  # collective: every rank calls
        if self.out is None:
            return None
        bad = nonfinite_entries({"model": state.get("model"), "optimizer": state.get("optimizer")})
        if self._any_rank(bool(bad)):
            kept = self.out / name
            raise NonFiniteStateError(
                f"training diverged: non-finite values at iteration {self.iteration} in "
                f"{', '.join(bad) or 'another rank'}; not written, {kept} "
                + ("keeps the last good state" if kept.exists() else "was never written")
                + " (lower optim.lr, set optim.grad_clip, or resume from it)")
        if not self.info.is_main:
            return None
        return save_checkpoint(state, self.out / name)

    def _any_rank(self, flag: bool) -> bool:
        if not self.info.distributed:
            return flag
        from ..metrics._dist import all_reduce_sum
        return bool(all_reduce_sum(torch.tensor([int(flag)], dtype=torch.int64))[0] > 0)

    # ------------------------------------------------------------------ data
    def _batches(self):
        g = torch.Generator()
        g.manual_seed(self.cfg.train.seed)
        seg = self.cfg.task == "segmentation"
        if seg:
            collate = _seg_collate
        else:
            from ..data.coco import detection_collate as collate
        loader = DataLoader(self.train_set, batch_size=self.batch, sampler=self.sampler, drop_last=True,
                            num_workers=self.cfg.data.num_workers, collate_fn=collate, generator=g,
                            pin_memory=pin_memory(self.device),
                            persistent_workers=self.cfg.data.num_workers > 0)
        epoch, k = divmod(self.iteration, self.iters_per_epoch)
        while True:
            self.sampler.set_epoch(epoch, start=k * self.batch)
            yield from loader
            epoch, k = epoch + 1, 0

    # ------------------------------------------------------------------ steps
    def _loss(self, batch):
        with self.precision.autocast():
            if self.cfg.task == "segmentation":
                images = batch["image"].to(self.device, non_blocking=True)
                labels = batch["label"].to(self.device, non_blocking=True)
                logits, aux = self.ddp(images)
                loss = F.cross_entropy(resize_logits(logits.float(), labels.shape[-2:]), labels, ignore_index=255)
                if aux is None:
                    return loss, {}
                aux_loss = F.cross_entropy(resize_logits(aux.float(), labels.shape[-2:]), labels, ignore_index=255)
                return loss + self.cfg.model.aux_weight * aux_loss, {"loss_main": float(loss.detach()),
                                                                      "loss_aux": float(aux_loss.detach())}
            images, targets = batch
            images = [im.to(self.device) for im in images]
            targets = [{k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
            losses = self.ddp(images, targets)
            total = sum(losses.values())
            return total, {k: float(v.detach()) for k, v in losses.items()}

    def _sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics drift apart in the last
        forward of each rank), so that a sharded evaluation equals evaluating the checkpoint."""
        if self.info.distributed:
            import torch.distributed as dist
            for b in self.model.buffers():
                dist.broadcast(b.data, src=0)

    def evaluate(self) -> dict:
        self._sync_buffers()
        d, t = self.cfg.data, self.cfg.train
        if self.cfg.task == "segmentation":
            res = evaluate_segmentation(self.model, self.val_set, self.info, d.eval_batch_size, d.num_workers,
                                        self.precision.dtype or False, progress=t.progress,
                                        num_classes=self.num_classes)
        else:
            res = evaluate_detection(self.model, self.val_set, self.info, d.eval_batch_size, d.num_workers,
                                     self.precision.dtype or False, progress=t.progress)
        return res

    def _mean_over_ranks(self, value: float) -> float:
        if not self.info.distributed:
            return value
        from ..metrics._dist import all_reduce_sum
        return float(all_reduce_sum(torch.tensor([value], dtype=torch.float64))[0]) / self.info.world_size

    def fit(self) -> dict:
        """Train to ``max_iters`` (or ``train.stop_at``); returns ``{"iteration", "stopped",
        "last_eval", "best"}``."""
        t = self.cfg.train
        self.ddp.train()
        bar = None
        if t.progress and self.info.is_main:
            from tqdm import tqdm
            bar = tqdm(total=self.max_iters, initial=self.iteration, desc="train", dynamic_ncols=True)
        if self._lock is not None and not self._lock.held:
            self._lock.acquire()
        batches = self._batches()
        loss_sum, n_sum, t0 = 0.0, 0, time.perf_counter()
        last_eval, stopped = None, False
        saved_at = None
        try:
            if self.eval_pending:  # resumed from a checkpoint written just before an evaluation
                last_eval = self._eval_and_save()
                saved_at = self.iteration
            while self.iteration < self.max_iters:
                if t.stop_at is not None and self.iteration >= t.stop_at:
                    stopped = True
                    if self.out is not None and saved_at != self.iteration:
                        self.save("last.pt")  # as documented: an early stop leaves a checkpoint to resume
                    break
                batch = next(batches)
                self.schedule.set_iteration(self.iteration)
                loss, parts = self._loss(batch)
                if not torch.isfinite(loss):
                    if not self.use_scaler:
                        kept = f"; {self.out / 'last.pt'} keeps the last good state" if (
                            self.out is not None and (self.out / "last.pt").exists()) else ""
                        raise NonFiniteStateError(f"training diverged: non-finite loss {float(loss.detach())} at "
                                                  f"iteration {self.iteration}{kept} (lower optim.lr or set "
                                                  f"optim.grad_clip)")
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                if self.cfg.optim.grad_clip:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.iteration += 1
                loss_sum += float(loss.detach())
                n_sum += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(loss.detach()):.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
                done = self.iteration == self.max_iters
                if self.iteration % max(t.log_interval, 1) == 0 or done:
                    avg = self._mean_over_ranks(loss_sum / n_sum)
                    rec = {"type": "train", "iter": self.iteration, "epoch": self.iteration // self.iters_per_epoch,
                           "loss": avg, "lr": self.optimizer.param_groups[0]["lr"],
                           "time_s": round(time.perf_counter() - t0, 3), **parts}
                    if self.info.is_main:
                        self.log.write(rec)
                    loss_sum, n_sum = 0.0, 0
                if (t.eval_interval and self.iteration % t.eval_interval == 0) or done:
                    if self.out is not None:  # first secure the work, then evaluate (which may fail)
                        self.eval_pending = True
                        self.save("last.pt")
                    last_eval = self._eval_and_save()
                    saved_at = self.iteration
                elif t.ckpt_interval and self.iteration % t.ckpt_interval == 0:
                    self.save("last.pt")
                    saved_at = self.iteration
        except BaseException:
            self.close()
            raise
        finally:
            self.eval_pending = False
            if bar is not None:
                bar.close()
        self._plot()
        self.close()
        return {"iteration": self.iteration, "stopped": stopped, "last_eval": last_eval, "best": dict(self.best)}

    def _eval_and_save(self) -> dict:
        res = self._periodic_eval()
        self.eval_pending = False
        if self.out is not None:
            self.save("last.pt")
        return res

    def _periodic_eval(self) -> dict:
        res = self.evaluate()
        scalars = {k: v for k, v in res.items() if isinstance(v, float)}
        rec = {"type": "eval", "iter": self.iteration, "epoch": self.iteration // self.iters_per_epoch, **scalars}
        key = self.cfg.train.best_metric
        if key not in res:
            raise KeyError(f"train.best_metric={key!r} is not an evaluation metric; valid: {', '.join(scalars)}")
        value = res[key]
        improved = not math.isnan(value) and (self.best["value"] is None or value > self.best["value"])
        if improved:
            self.best = {"metric": key, "value": value, "iteration": self.iteration}
            state = {"format": FORMAT, "version": 1, "config": self.cfg.to_dict(), "iteration": self.iteration,
                     "model": self.model.state_dict(), "metrics": scalars, "best": dict(self.best)}
            self.save("best.pt", state)
        if self.info.is_main:
            self.log.write(rec)
            shown = ", ".join(f"{k} {v:.4f}" for k, v in scalars.items())
            self.say(f"[eval @ {self.iteration}] {shown}" + ("  (best)" if improved else ""))
            self._plot()
        return res

    def _plot(self) -> None:
        if self.out is not None and self.info.is_main:
            plot_curves(self.log.records, self.out / "curves.png",
                        title=f"{self.cfg.preset}: {self.cfg.model.name} + {self.cfg.model.upsampler}")
