"""The run folder's lock: one training per folder at a time, across threads, ComfyUI queues
and processes (flock on ``<folder>/.lock``, released with its process)."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

LOCK = ".lock"


class RunBusy(RuntimeError):
    """The run folder is being used by another training (another queue, process or node); ``folder``
    and ``holder`` (which process, since when) let a caller word its own advice."""

    def __init__(self, folder: Path, holder: str):
        self.folder, self.holder = Path(folder), holder
        super().__init__(f"run folder {folder} is in use by another training ({holder}); "
                         "wait for it to finish or cancel it, or choose another run name")


class RunLock:
    """An exclusive, non-blocking flock on ``<folder>/.lock``.

    flock belongs to the open file, so a second holder in the same process (another
    thread, a second ComfyUI queue) is refused just like another process; the lock dies
    with its process, so a crash never leaves a stale lock behind.
    """

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        from .distributed import rank

        if rank() != 0:  # N processes of one run share its folder: rank 0 holds the lock for all of them
            return self

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunBusy(self.path.parent, _holder(self.path)) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return f"process {info.get('pid', '?')} since {info.get('since', '?')}"
    except (OSError, ValueError):
        return "unknown holder"


def check_free(folder: str | os.PathLike) -> None:
    """Raise RunBusy if ``folder`` is locked by a training now; creates nothing in a folder never locked."""
    if (Path(folder) / LOCK).exists():
        RunLock(folder).acquire().release()


def run_busy(folder: str | os.PathLike) -> str | None:
    """The refusal message if ``folder`` is locked by a training now, else None."""
    try:
        check_free(folder)
    except RunBusy as e:
        return str(e)
    return None


__all__ = ["LOCK", "RunBusy", "RunLock", "check_free", "run_busy"]
