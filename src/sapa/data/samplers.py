"""Samplers that make data order and augmentation a pure function of (seed, epoch, position).

:class:`ResumableSampler` partitions an epoch across ranks exactly like
``torch.utils.data.DistributedSampler`` (``torch.randperm`` seeded with ``seed + epoch``, padded by
wrapping around to a multiple of the world size, rank ``r`` takes every ``world_size``-th index
from ``r``) and adds two things the trainer needs for exact resumption:

* ``set_epoch(epoch, start=k)`` skips the first ``k`` samples of this rank's share, so a run
  resumed mid-epoch sees the same remaining samples as the uninterrupted run;
* it yields ``(index, aug_seed)`` keys: every dataset in :mod:`sapa.data` draws its random
  augmentation from ``aug_seed`` instead of a global RNG, so augmentations do not depend on the
  number of DataLoader workers, on their seeding, or on where a run was resumed.

:class:`ShardSampler` is for evaluation: rank ``r`` takes indices ``r, r + W, ...`` with **no
padding**, so summing per-rank metric counts over ranks counts every sample exactly once.
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler):
    def __init__(self, num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if num_samples < 1:
            raise ValueError(f"ResumableSampler: num_samples must be >= 1, got {num_samples}")
        if not 0 <= rank < world_size:
            raise ValueError(f"ResumableSampler: rank {rank} not in [0, {world_size})")
        self.n, self.seed, self.rank, self.world_size, self.shuffle = num_samples, int(seed), rank, world_size, shuffle
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(num_samples / world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def indices(self) -> list[int]:
        """This rank's share of the current epoch (before skipping ``start``)."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        total = self.per_rank * self.world_size
        while len(idx) < total:
            idx += idx[:total - len(idx)]
        return idx[self.rank:total:self.world_size]

    def __iter__(self):
        for pos, i in enumerate(self.indices()):
            if pos >= self.start:
                # the global position makes the augmentation seed unique per (epoch, sample slot)
                yield i, (self.seed, self.epoch, pos * self.world_size + self.rank)

    def __len__(self) -> int:
        return max(self.per_rank - self.start, 0)


class ShardSampler(Sampler):
    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1):
        self.n, self.rank, self.world_size = num_samples, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))
