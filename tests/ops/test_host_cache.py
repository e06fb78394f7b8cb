"""The cpu kernels' host cache (sapa.ops.window.op._HostCache): large outputs and buffers reuse freed
memory, never memory a live tensor still uses."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sapa import functional as Fn
from sapa.ops.window import op as wop

BIG = (1, 64, 128, 128)  # 4 MiB in float32: cached


@pytest.fixture()
def cache():
    c = wop._HostCache()
    c._limit = 64 << 20
    return c


def test_freed_block_is_reused_and_live_one_is_not(cache):
    a = cache.empty(BIG, torch.float32)
    a.fill_(1)
    b = cache.empty(BIG, torch.float32)  # a is alive: another block
    assert b.data_ptr() != a.data_ptr()
    pa = a.data_ptr()
    del a
    c = cache.empty(BIG, torch.float32)  # a's block is free again
    assert c.data_ptr() == pa


def test_a_view_keeps_the_block_in_use(cache):
    a = cache.empty(BIG, torch.float32)
    pa = a.data_ptr()
    view = a[0, :3]
    del a
    b = cache.empty(BIG, torch.float32)
    assert b.data_ptr() != pa
    view.fill_(7)  # still valid memory, not shared with b
    b.fill_(0)
    assert bool((view == 7).all())


def test_sizes_match_within_a_factor_two(cache):
    a = cache.empty((4 << 20,), torch.float32)  # 16 MiB
    pa = a.data_ptr()
    del a
    small = cache.empty((1 << 20,), torch.float32)  # 4 MiB: too small for the 16 MiB block
    assert small.data_ptr() != pa
    del small
    close = cache.empty((3 << 20,), torch.float32)  # 12 MiB: fits the free 16 MiB block
    assert close.data_ptr() == pa


def test_free_blocks_beyond_the_limit_are_released(cache):
    cache._limit = 8 << 20
    ts = [cache.empty(BIG, torch.float32) for _ in range(4)]  # 16 MiB in use: the limit is on free ones
    assert len(cache._blocks) == 4
    del ts  # freed: at most 8 MiB of free blocks stay
    assert len(cache._blocks) == 2
    kept = cache.empty(BIG, torch.float32)
    cache.clear()
    assert len(cache._blocks) == 1 and not cache._free(cache._blocks[0]) and kept.numel() > 0


def test_other_dtypes_and_disabled_cache_fall_back(cache):
    assert cache.empty(BIG, torch.bfloat16) is None
    cache._limit = 0
    assert cache.empty(BIG, torch.float32) is None


def test_bad_limit_is_refused(monkeypatch):
    c = wop._HostCache()
    monkeypatch.setenv("SAPA_CPU_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="SAPA_CPU_CACHE_MB"):
        c.limit()
    monkeypatch.setenv("SAPA_CPU_CACHE_MB", "-1")
    with pytest.raises(ValueError, match="SAPA_CPU_CACHE_MB"):
        wop._HostCache().limit()


def test_outputs_of_consecutive_calls_do_not_share_memory():
    """Two SAPA-D outputs kept alive at once (two layers, or a list of outputs) are distinct memory,
    and an output freed by the caller is reused by the next call."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 64, 64, 64, generator=g), torch.randn(1, 64, 32, 32, generator=g), \
        torch.randn(1, 256, 32, 32, generator=g)
    off = torch.randn(1, 72, 64, 64, generator=g)
    first = Fn.sapa_deform(q, k, v, off, 9, 4, 2, backend="cpu")
    keep = first.clone()
    second = Fn.sapa_deform(q, k, v * 2, off, 9, 4, 2, backend="cpu")
    assert first.data_ptr() != second.data_ptr()
    torch.testing.assert_close(first, keep, rtol=0, atol=0)  # untouched by the second call
    torch.testing.assert_close(second, 2 * keep, rtol=1e-5, atol=1e-5)
    p = second.data_ptr()
    del second
    third = Fn.sapa_deform(q, k, v, off, 9, 4, 2, backend="cpu")
    assert third.data_ptr() == p
    torch.testing.assert_close(third, keep, rtol=0, atol=0)


def test_disabled_by_environment():
    code = ("import torch; from sapa.ops.window import op; "
            "t = op.new_tensor((1 << 21,), torch.float32); assert op._CACHE._blocks == []; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "SAPA_CPU_CACHE_MB": "0"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_outputs_alive_at_exit_leave_no_error():
    code = ("import torch; from sapa.ops.window import op; "
            "keep = [op.new_tensor((1 << 21,), torch.float32) for _ in range(3)]; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout and "Exception ignored" not in out.stderr, out.stderr
