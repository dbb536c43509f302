"""Downloading an aggregate: its signed URL, then its body under limits, to a file or into memory.

This module owns what a leaf accepts from the server when it downloads, so that a hostile or broken
server costs it an error, not its memory or its round: the file id (a plain token, checked before
anything touches the network or the disk), the size (by default a multiple of what the leaf uploaded,
:func:`~.transfer.aggregate_limit`, as the server limits an upload; refused before any memory is taken
when the server declares more), the time (the whole body by a deadline, however slowly it trickles),
and the archive (members, inflated size and compression ratio, checked from the zip directory before
anything is inflated, with the server's own rule, :func:`~.wire.check_compression_ratio`). Moving the
bytes is :mod:`.transfer`; HTTP is :mod:`.http`; :class:`~.client.Client` exposes these calls.

Example:
    >>> downloads = Downloads(HttpSession("http://127.0.0.1:8080", {}), Path("out"), max_bytes=None, timeout_s=600)
    >>> downloads.record_upload(10 * 1024**2)
    >>> downloads.limits().max_bytes // 1024**2
    41
    >>> downloads.limits(expected_bytes=1024**2).max_bytes // 1024**2
    5
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import ContextManager

import requests

from . import wire
from .errors import DownloadTimeoutError, ProtocolError
from .http import HttpSession
from .protocol import DOWNLOAD_PATH, is_file_id
from .transfer import DownloadBuffer, DownloadLimits, aggregate_limit, read_to_buffer, read_to_file

logger = logging.getLogger(__name__)

def checked_file_id(file_id: str) -> str:
    """``file_id`` when it is a plain token (see :data:`~.protocol.FILE_ID_PATTERN`); ValueError otherwise."""
    if not is_file_id(file_id):
        raise ValueError(f"Invalid file_id {file_id!r}: expected letters, digits, '.', '_' or '-' only "
                         "(no path separators or '..').")
    return file_id


class Downloads:
    """The downloads of one leaf, each within :class:`~.transfer.DownloadLimits`.

    Args:
        http: the leaf's session (the download call; the signed URL is fetched without credentials).
        output_dir: where :meth:`to_file` writes ``{file_id}.npz``.
        max_bytes: the most an aggregate may hold, always; None: :func:`~.transfer.aggregate_limit` of the
            model size the caller expects, else of what this leaf last uploaded, else (neither known)
            :data:`~.wire.DEFAULT_MAX_TOTAL_BYTES`, the server's own limit for one archive.
        timeout_s: seconds a whole download may take when the call gives no deadline.
    """

    def __init__(self, http: HttpSession, output_dir: Path, *, max_bytes: int | None, timeout_s: float) -> None:
        self._http = http
        self.output_dir = output_dir
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._uploaded: int | None = None

    def record_upload(self, size: int) -> None:
        """Remember the size of what this leaf uploaded: an aggregate is sized after it."""
        self._uploaded = size

    def limits(self, *, expected_bytes: int | None = None, timeout: float | None = None) -> DownloadLimits:
        """The limits of a download that starts now: ``expected_bytes``, the model's size as the caller knows
        it (see ``max_bytes`` above); ``timeout``, seconds for the whole download (default ``timeout_s``)."""
        basis = expected_bytes if expected_bytes is not None else self._uploaded
        max_bytes = self.max_bytes if self.max_bytes is not None else (
            wire.DEFAULT_MAX_TOTAL_BYTES if basis is None else aggregate_limit(basis))
        return DownloadLimits.within(max_bytes, self.timeout_s if timeout is None else timeout)

    def url(self, file_id: str, codec: str | None = None) -> str:
        """The signed URL of ``file_id`` (``GET`` :data:`~.protocol.DOWNLOAD_PATH`); ``codec``: of the aggregate
        encoded with that codec (one the branch advertises; branchkey-local only)."""
        answer = self._http.request_data("GET", DOWNLOAD_PATH.format(file_id=checked_file_id(file_id)), "download",
                                         accept="*/*", params={"codec": codec} if codec else None)
        url = answer.get("download_url")
        if not isinstance(url, str) or not url:
            raise ProtocolError(f"download: no download_url in {answer!r}")
        return url

    def to_file(self, file_id: str, limits: DownloadLimits) -> Path:
        """Download ``file_id`` to ``{output_dir}/{file_id}.npz``, atomically; return that path."""
        url = self.url(file_id)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        target = self.output_dir / f"{file_id}.npz"
        fd, tmp = tempfile.mkstemp(dir=self.output_dir, prefix=".download-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as sink, self._blob(url, limits) as response:
                size = read_to_file(response, sink, limits)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        logger.info("Downloaded %s (%.2f MB) to %s", file_id, size / 1e6, target)
        return target

    def archive(self, file_id: str, limits: DownloadLimits, buffer: DownloadBuffer | None = None,
                codec: str | None = None) -> wire.Archive:
        """Download ``file_id`` (encoded with ``codec``, when given) into ``buffer`` (or new memory) and decode it
        under ``limits``."""
        url = self.url(file_id, codec)
        with self._blob(url, limits) as response:
            view = read_to_buffer(response, buffer or DownloadBuffer(), limits)
        return limits.decode(view)

    def _blob(self, url: str, limits: DownloadLimits) -> ContextManager[requests.Response]:
        if time.monotonic() >= limits.deadline:
            raise DownloadTimeoutError("download: its deadline passed before the body was asked for. Try again, or "
                                       "allow the round (or download) more time.")
        return self._http.get_blob(url, deadline=limits.deadline)


__all__ = ["Downloads", "checked_file_id"]
