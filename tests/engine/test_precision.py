"""sapa.engine.precision and the distributed switches: autocast dtype / GradScaler per device,
SyncBatchNorm conversion, pinned memory, the scaler's state in checkpoints (fp16 on CPU), and the
one-process process group of SAPA_DDP_ALWAYS."""
from __future__ import annotations

import socket

import pytest
import torch

from sapa.engine import Trainer, apply_overrides, get_preset, load_checkpoint
from sapa.engine.distributed import DistInfo, init_distributed, process_group_backend
from sapa.engine.precision import convert_sync_bn, pin_memory, resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize("device,amp,name,dtype,scaler", [
    (CPU, False, "auto", None, False),
    (CPU, True, "auto", torch.bfloat16, False),
    (CPU, True, "float16", torch.float16, True),
    (CUDA, True, "auto", torch.float16, True),
    (CUDA, True, "float16", torch.float16, True),
    (CUDA, True, "bfloat16", torch.bfloat16, False),
    (CUDA, False, "bfloat16", None, False),
], ids=["cpu-off", "cpu-auto", "cpu-fp16", "cuda-auto", "cuda-fp16", "cuda-bf16", "cuda-off"])
def test_precision_table(device, amp, name, dtype, scaler):
    p = resolve_precision(device, amp, name, bf16_supported=lambda: True)
    assert (p.dtype, p.use_scaler, p.enabled) == (dtype, scaler, dtype is not None)


def test_bf16_on_an_old_gpu_and_bad_names_are_refused():
    with pytest.raises(ValueError, match="no bfloat16 support"):
        resolve_precision(CUDA, True, "bfloat16", bf16_supported=lambda: False)
    with pytest.raises(ValueError, match="amp_dtype must be one of auto, float16, bfloat16, got 'fp8'"):
        resolve_precision(CPU, True, "fp8")
    with pytest.raises(ValueError, match="train.amp_dtype"):
        apply_overrides(get_preset("synthetic"), ["train.amp_dtype=fp8"])


def test_autocast_context_casts_matmuls():
    p = resolve_precision(CPU, True, "bfloat16")
    with p.autocast():
        y = torch.ones(4, 4) @ torch.ones(4, 4)
    assert y.dtype == torch.bfloat16
    with resolve_precision(CPU, False).autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def _net():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.ReLU())


def _has_sync_bn(m):
    return any(isinstance(x, torch.nn.SyncBatchNorm) for x in m.modules())


def test_sync_bn_conversion_only_when_requested_and_distributed_on_cuda():
    notes = []
    assert _has_sync_bn(convert_sync_bn(_net(), True, DistInfo(world_size=2, device=CUDA)))
    assert _has_sync_bn(convert_sync_bn(_net(), True, DistInfo(world_size=1, device=CUDA, group=True)))
    assert not _has_sync_bn(convert_sync_bn(_net(), True, DistInfo(world_size=1, device=CUDA)))
    assert not _has_sync_bn(convert_sync_bn(_net(), False, DistInfo(world_size=2, device=CUDA)))
    assert not _has_sync_bn(convert_sync_bn(_net(), True, DistInfo(world_size=2, device=CPU), notes.append))
    assert notes and "GPU-only" in notes[0]


def test_pinned_memory_and_group_backend_follow_the_device():
    assert pin_memory(CUDA) and not pin_memory(CPU)
    assert process_group_backend(CUDA) == "nccl" and process_group_backend(CPU) == "gloo"


def test_fp16_scaler_state_is_checkpointed_and_restored(tmp_path, tiny_config, quiet):
    cfg = tiny_config("train.amp=true", "train.amp_dtype='float16'", "train.max_iters=2", "train.ckpt_interval=2",
                      f"train.output={str(tmp_path / 'run')!r}")
    tr = Trainer(cfg, dist=DistInfo(), log=quiet)
    assert tr.scaler.is_enabled()
    tr.fit()
    saved = load_checkpoint(tmp_path / "run" / "last.pt")["scaler"]
    assert saved["scale"] == tr.scaler.get_scale() and saved["_growth_tracker"] == tr.scaler._get_growth_tracker()
    cfg2 = apply_overrides(cfg, ["train.max_iters=3"])
    back = Trainer(cfg2, resume=tmp_path / "run" / "last.pt", dist=DistInfo(), log=quiet)
    assert back.scaler.get_scale() == saved["scale"]
    assert back.scaler._get_growth_tracker() == saved["_growth_tracker"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_always_joins_a_one_process_group(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("SAPA_DDP_ALWAYS", "1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        init_distributed("cpu")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    info = init_distributed("cpu")
    try:
        assert info.distributed and info.group and info.world_size == 1 and info.backend == "gloo"
    finally:
        dist.destroy_process_group()
    monkeypatch.setenv("SAPA_DDP_ALWAYS", "0")
    assert not init_distributed("cpu").distributed


def test_evaluation_autocasts_in_the_training_dtype():
    """The trainer passes its resolved amp dtype to evaluation: a float16 run evaluates in float16, not in
    the old fixed choice (bf16 on CPU / fp16 on CUDA)."""
    from sapa.engine.evaluate import autocast_context

    cpu = torch.device("cpu")
    with autocast_context(cpu, torch.float16):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16
    with autocast_context(cpu, True):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast_context(cpu, False):
        assert not torch.is_autocast_enabled("cpu")
