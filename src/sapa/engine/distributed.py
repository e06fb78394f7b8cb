"""Process-group set-up under ``torchrun`` (gloo on CPU, nccl on CUDA) and rank helpers.

With ``SAPA_DDP_ALWAYS=1`` a single torchrun process still joins a process group (nccl on CUDA) and
the trainer wraps the model in DDP (and converts BatchNorm with ``model.sync_bn``): the one-GPU check
of the multi-GPU code path (``benchmarks/gpu/check.sh``)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False
    group: bool = False
    """a process group is joined (always when world_size > 1; with SAPA_DDP_ALWAYS=1 also for one process)"""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.group

    @property
    def backend(self) -> str | None:
        """The process group's backend ("nccl", "gloo") or None without a group."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        return dist.get_backend()


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is available")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``); a single process without those runs alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    from .. import flags

    always = flags.ddp_always()
    if world <= 1 and not always:
        return DistInfo(0, 1, 0, dev, False)
    if always and world <= 1 and "MASTER_ADDR" not in os.environ:
        raise ValueError("SAPA_DDP_ALWAYS=1 needs torchrun's environment (MASTER_ADDR, MASTER_PORT): run "
                         "`torchrun --nproc_per_node 1 -m sapa train ...`, or unset SAPA_DDP_ALWAYS")
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, False, True)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend=process_group_backend(dev), rank=rank, world_size=world)
    return DistInfo(rank, world, local_rank, dev, True, True)


def process_group_backend(device: torch.device) -> str:
    """nccl for CUDA devices, gloo for CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def cleanup(info: DistInfo, ok: bool = True, timeout: float = 60.0) -> None:
    """Leave the process group joined by :func:`init_distributed`.

    After a successful run (``ok``) every rank meets at a barrier first, then destroys the group.
    ``destroy_process_group`` can hang now and then when ranks reach it at different times
    (pytorch/pytorch#75097); so it runs on a helper thread, and if it has not returned after
    ``timeout`` seconds this process says so on stderr and exits at once with status 0: every
    output file is complete by then (checkpoints are written atomically, logs are closed).
    After a failure (``ok=False``) the group is left alone: another rank may still wait in a
    collective, destroying would deadlock, and torchrun tears the workers down anyway."""
    if not (info.initialized_here and dist.is_initialized()):
        return
    if not ok:
        return
    import sys
    import threading

    dist.barrier()
    done = threading.Event()

    def _destroy():
        dist.destroy_process_group()
        done.set()

    threading.Thread(target=_destroy, name="sapa-destroy-pg", daemon=True).start()
    if not done.wait(timeout):
        print(f"sapa: rank {info.rank}: destroy_process_group did not return within {timeout:.0f} s; "
              f"the run is complete, exiting without it", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
