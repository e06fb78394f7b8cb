"""Run-folder hygiene: one training process per folder, no stale temporary files.

* :class:`RunFolderLock` takes an exclusive ``fcntl.flock`` on ``<folder>/.lock`` (non-blocking).
  A second ``sapa train`` on the same folder fails at once with :class:`RunFolderBusy` instead of
  interleaving its log and checkpoints with the first one's. The kernel drops the lock when the
  holder exits, killed or not, so a crash never leaves the folder locked.
* :func:`clean_stale_temp` removes the ``.<name>.tmp-<pid>`` files a killed checkpoint / plot / log
  write leaves behind; it runs with the lock held, so no live writer owns them.
"""
from __future__ import annotations

import os
from pathlib import Path

LOCK_NAME = ".lock"


class RunFolderBusy(OSError):
    """Another process holds the run folder's lock."""


class RunFolderLock:
    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunFolderLock":
        import fcntl
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise RunFolderBusy(f"run folder {self.folder} is in use by another training process (pid {holder}, "
                                f"lock {self.path}); wait for it to finish or choose another train.output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor drops the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __del__(self):  # pragma: no cover  (a Trainer that is never fit and then collected)
        self.release()


def clean_stale_temp(folder: str | os.PathLike) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>[...]`` files in ``folder`` (call with the folder's lock held);
    returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if p.name.startswith(".") and ".tmp-" in p.name and p.is_file():
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:  # pragma: no cover
                pass
    return removed
