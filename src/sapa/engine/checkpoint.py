"""Checkpoints that are written atomically and verified when read.

File format: the bytes of ``torch.save(obj)`` followed by a 48-byte trailer
``b"SAPACKPT" + sha256(payload) (32 bytes) + len(payload) (8 bytes, little endian)``. Zip readers
ignore trailing bytes, so ``torch.load(path)`` still opens the file; :func:`load_checkpoint` checks
the trailer first and refuses a truncated or corrupted file with a :class:`CheckpointError` that
names it.

Writing (:func:`save_checkpoint`): serialise to memory, write to a temporary file in the same
folder, flush + fsync, read it back and verify, then ``os.replace`` it over the destination and
fsync the folder. A crash at any point leaves either the old file or the new one, never a mix, and
a good checkpoint is only ever replaced by another verified one.
"""
from __future__ import annotations

import hashlib
import io
import os
import struct
from pathlib import Path

import torch

MAGIC = b"SAPACKPT"
_TRAILER = len(MAGIC) + 32 + 8
FORMAT = "sapa-checkpoint"


class CheckpointError(ValueError):
    """A checkpoint file is missing its trailer, truncated, corrupted or not a sapa checkpoint."""


def _encode(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    return payload + MAGIC + hashlib.sha256(payload).digest() + struct.pack("<Q", len(payload))


def _verify(path: Path, data: bytes) -> bytes:
    if len(data) < _TRAILER or data[-_TRAILER:-40] != MAGIC:
        raise CheckpointError(f"checkpoint {path} is truncated or not a sapa checkpoint (no valid trailer; "
                              f"{len(data)} bytes); refusing to load it")
    digest, (length,) = data[-40:-8], struct.unpack("<Q", data[-8:])
    payload = data[:-_TRAILER]
    if length != len(payload):
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: trailer says {length} payload bytes, "
                              f"file has {len(payload)}; refusing to load it")
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt (sha256 mismatch); refusing to load it")
    return payload


def nonfinite_entries(obj, prefix: str = "", limit: int = 5) -> list[str]:
    """Names (``model.bn.running_var``, ``optimizer.state.3.exp_avg``, ...) of floating tensors in
    a nested dict / list holding NaN or inf; at most ``limit``."""
    out: list[str] = []

    def walk(x, name):
        if len(out) >= limit:
            return
        if isinstance(x, torch.Tensor):
            if x.is_floating_point() and x.numel() and not bool(torch.isfinite(x).all()):
                out.append(name)
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{name}.{i}" if name else str(i))

    walk(obj, prefix)
    return out


def save_checkpoint(obj: dict, path: str | os.PathLike) -> Path:
    """Atomically write ``obj`` to ``path`` (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _encode(obj)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with open(tmp, "rb") as f:
            _verify(tmp, f.read())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover  (some filesystems refuse fsync on folders)
        pass
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read and verify a checkpoint written by :func:`save_checkpoint`; raise
    :class:`CheckpointError` (naming the file) if it is truncated, corrupt or foreign."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    payload = _verify(path, path.read_bytes())
    try:
        obj = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} cannot be unpickled: {err}") from err
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {FORMAT} (missing 'format' key)")
    return obj
