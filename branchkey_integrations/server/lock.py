"""One server per data directory: an operating-system lock on a file, on Linux, macOS and Windows.

Two servers on one data directory would both aggregate and clean up each other's files, so
``branchkey-local serve`` holds :class:`FileLock` on ``DIR/server.lock`` while it runs. The lock is
the operating system's (``fcntl.flock`` on Linux and macOS, ``msvcrt.locking`` on Windows), so it
ends with the process: a server killed with ``kill -9`` leaves no stale lock behind.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import BinaryIO


class FileLock:
    """A non-blocking, exclusive, process-wide lock on ``path`` (created if missing)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._handle: BinaryIO | None = None

    def acquire(self) -> bool:
        """Take the lock; False (at once, without waiting) when another process holds it."""
        if self._handle is not None:
            raise RuntimeError(f"{self.path} is already locked by this FileLock")
        handle = open(self.path, "a+b")
        if not _try_lock(handle.fileno()):
            handle.close()
            return False
        self._handle = handle
        return True

    def release(self) -> None:
        if self._handle is not None:
            _unlock(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "FileLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


if sys.platform == "win32":
    import msvcrt

    def _try_lock(fd: int) -> bool:
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # one byte at offset 0 serves as the mutex
        except OSError:
            return False
        return True

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        except OSError:
            pass

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
