"""The plain-PyTorch training loop: iteration based, DDP-aware, resumable to the same continuation.

Run folder (``train.output``): ``config.json``, ``log.jsonl`` (one JSON record per log step /
evaluation), ``curves.png`` (loss and metrics), ``last.pt`` (everything needed to continue:
model, optimizer, schedule, GradScaler, RNG states of every rank for torch / CUDA / numpy /
python, iteration, best-so-far) and ``best.pt`` (the weights of the best periodic evaluation —
the papers report the best of their periodic evaluations, SPEC §6.1).

Exact resumption: data order and augmentation are functions of (seed, epoch, position) through
:class:`sapa.data.ResumableSampler`; the loaders own their generators, so nothing but the model's
own randomness (dropout) touches the global RNGs, and those are checkpointed per rank. Resuming
``last.pt`` written at iteration k and training to N gives the same weights as an uninterrupted
run to N (tested). A run folder that already holds ``last.pt`` is never started afresh over it:
pass ``resume`` to continue it, or choose another folder.
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
from .checkpoint import FORMAT, CheckpointError, load_checkpoint, save_checkpoint
from .config import Config, validate
from .distributed import DistInfo, init_distributed
from .evaluate import evaluate_detection, evaluate_segmentation
from .precision import convert_sync_bn, pin_memory, resolve_precision
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
        t = cfg.train
        self.out = Path(t.output) if t.output else None
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
        self.val_set = val_set
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
        self.best = {"metric": t.best_metric, "value": None, "iteration": None}
        torch.manual_seed(t.seed + self.info.rank)  # per-rank randomness (dropout) from here on
        random.seed(t.seed + self.info.rank)
        np.random.seed((t.seed + self.info.rank) % 2 ** 32)
        if ckpt is not None:
            self._restore(ckpt, resume)
        self.log = RunLog(self.out / "log.jsonl" if (self.out and self.info.is_main) else None,
                          append=ckpt is not None)
        if self.out is not None and self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        from ..metrics._dist import all_gather_objects
        return {"format": FORMAT, "version": 1, "config": self.cfg.to_dict(), "iteration": self.iteration,
                "epoch": self.iteration // self.iters_per_epoch, "world_size": self.info.world_size,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": all_gather_objects(_rng_state()), "best": dict(self.best)}

    def _restore(self, ckpt: dict, path) -> None:
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"checkpoint {path} does not match this model / optimizer: {err}") from err
        self.schedule.load_state_dict(ckpt["schedule"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration = int(ckpt["iteration"])
        self.best = dict(ckpt["best"])
        rng = ckpt["rng"]
        if len(rng) == self.info.world_size:
            _set_rng_state(rng[self.info.rank])
        else:
            self.say(f"note: {path} was written by {len(rng)} process(es), resuming with {self.info.world_size}: "
                     f"RNG states are not restored, the continuation is not bit-identical")
        self.say(f"resumed from {path} at iteration {self.iteration}")

    def save(self, name: str, state: dict | None = None) -> Path | None:
        state = state if state is not None else self.state_dict()  # collective: every rank calls
        if self.out is None or not self.info.is_main:
            return None
        return save_checkpoint(state, self.out / name)

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
        if self.val_set is None:
            self.val_set = build_dataset(self.cfg, "val")
        d, t = self.cfg.data, self.cfg.train
        if self.cfg.task == "segmentation":
            res = evaluate_segmentation(self.model, self.val_set, self.info, d.eval_batch_size, d.num_workers,
                                        t.amp, progress=t.progress, num_classes=self.num_classes)
        else:
            res = evaluate_detection(self.model, self.val_set, self.info, d.eval_batch_size, d.num_workers,
                                     t.amp, progress=t.progress)
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
        batches = self._batches()
        loss_sum, n_sum, t0 = 0.0, 0, time.perf_counter()
        last_eval, stopped = None, False
        try:
            while self.iteration < self.max_iters:
                if t.stop_at is not None and self.iteration >= t.stop_at:
                    stopped = True
                    break
                batch = next(batches)
                self.schedule.set_iteration(self.iteration)
                loss, parts = self._loss(batch)
                if not torch.isfinite(loss):
                    if not self.use_scaler:
                        raise FloatingPointError(f"non-finite loss {float(loss.detach())} at iteration {self.iteration}")
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
                    last_eval = self._periodic_eval()
                if (t.ckpt_interval and self.iteration % t.ckpt_interval == 0) or (done and self.out is not None):
                    self.save("last.pt")
        finally:
            if bar is not None:
                bar.close()
        self._plot()
        return {"iteration": self.iteration, "stopped": stopped, "last_eval": last_eval, "best": dict(self.best)}

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
