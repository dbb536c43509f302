"""Moving model bytes: the streamed upload body, download memory, and the choice of compression.

This module owns what makes a round trip fast and nothing about what the bytes mean: the
``multipart/form-data`` body produced while it is sent (:class:`MultipartBody`), memory kept
from one download to the next (:class:`DownloadBuffer`) and fresh memory mapped in one call
(:func:`new_memory`), reading a streamed response into a file or a buffer, hashing a file for
the integrity headers, and whether a host is near enough that compressing costs more than it
saves (:func:`is_local_host`). The HTTP calls themselves live in :mod:`.http`, the protocol in
:mod:`.client`, the archive format in :mod:`.wire`.

Example:
    >>> body = MultipartBody('{"leaf_name": "a"}', "weights.npz", lambda: [b"npz"], 3)
    >>> len(b"".join(body)) == len(body)
    True
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import mmap
import os
import secrets
from typing import BinaryIO, Callable, Iterable, Iterator, Union

import numpy as np
import requests

from . import wire
from .errors import ProtocolError, TransportError

CHUNK = 1024 * 1024
Buffer = Union[bytes, memoryview]
AUTO = "auto"


def is_local_host(hostname: str) -> bool:
    """Loopback or private-network hosts: links fast enough that compressing costs more than it saves."""
    if hostname == "localhost" or hostname.endswith((".localhost", ".local")):
        return True
    try:
        address = ipaddress.ip_address(hostname)
    except ValueError:
        return False
    return address.is_loopback or address.is_private or address.is_link_local


def upload_compression(compression: str, hostname: str) -> str:
    """Resolve ``"auto"`` for an upload to ``hostname``; check any other choice.

    Deflate saves ~7.5 % of the bytes of float weights; with isal on 2 cores it pays off below
    ~50 MB/s (~400 Mbit/s) of upload bandwidth, with plain zlib only below ~4 MB/s. So "auto"
    stores on local links, and deflates elsewhere only when isal is installed.
    """
    if compression not in (AUTO, *wire.COMPRESSIONS):
        raise ValueError(f"Expected compression in ('auto', 'deflate', 'none'). Received: compression={compression!r}")
    if compression != AUTO:
        return compression
    return "deflate" if wire.FAST_DEFLATE and not is_local_host(hostname) else "none"


def file_chunks(path: str | os.PathLike) -> Iterator[bytes]:
    """The bytes of a file in 1 MiB chunks, read as they are sent."""
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def size_and_digest(f: BinaryIO) -> tuple[int, str]:
    """Size and base64 SHA-256 of an open file (the ``x-bk-file-*`` headers); rewinds it."""
    sha, size = hashlib.sha256(), 0
    for chunk in iter(lambda: f.read(CHUNK), b""):
        sha.update(chunk)
        size += len(chunk)
    f.seek(0)
    return size, base64.b64encode(sha.digest()).decode()


def new_memory(size: int) -> np.ndarray:
    """``size`` bytes of anonymous memory, its pages mapped in one call where the OS can (Linux).

    Measured at 376 MB: pages faulted in one by one as a ``bytearray`` is filled cost ~0.3 s;
    NumPy's huge pages cost 0.05 s or, when memory is fragmented, up to 1 s of compaction;
    ``MAP_POPULATE`` costs 0.15-0.2 s, every time.
    """
    populate = getattr(mmap, "MAP_POPULATE", None)
    if populate is None or size == 0:
        return np.empty(size, dtype=np.uint8)
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
    return np.frombuffer(region, dtype=np.uint8)  # the array keeps the mapping alive


class DownloadBuffer:
    """Memory for downloads that is kept from one round to the next.

    Writing into fresh memory is slow: 376 MB cost 0.2 s more here to download into new memory
    than into memory already written once. Pass one buffer to :meth:`Client.download_aggregate`
    round after round (:class:`~branchkey_integrations.core.federation.Federation` does): the
    arrays of each aggregate are views of it, valid until the next download into it, so copy
    what you keep.

    Example:
        >>> buffer = DownloadBuffer()
        >>> len(buffer.take(10)), buffer.nbytes
        (10, 10)
        >>> len(buffer.take(4)), buffer.nbytes  # smaller: the same memory again
        (4, 10)
    """

    def __init__(self) -> None:
        self._array: np.ndarray | None = None

    def take(self, size: int) -> memoryview:
        """``size`` writable bytes: the kept memory when it is large enough, else new memory (kept)."""
        if self._array is None or self._array.nbytes < size:
            self._array = None  # never hold the old and the new buffer at once
            self._array = new_memory(size)
        return memoryview(self._array)[:size]

    @property
    def nbytes(self) -> int:
        return 0 if self._array is None else self._array.nbytes


class MultipartBody:
    """The upload's ``multipart/form-data`` body, produced while it is sent.

    It yields the preamble (part ``data``, then the headers of part ``file``), the archive's
    bytes straight from ``payload()`` (views of the arrays, or a file read in 1 MiB chunks),
    and the epilogue. ``len()`` is known in advance, so ``requests`` sends a Content-Length
    rather than chunked encoding; every ``iter()`` starts over, so a retried request sends
    the whole body again.
    """

    def __init__(self, data: str, filename: str, payload: Callable[[], Iterable[Buffer]], size: int) -> None:
        boundary = secrets.token_hex(16)
        self.content_type = f"multipart/form-data; boundary={boundary}"
        self._preamble = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="data"\r\n\r\n{data}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        self._epilogue = f"\r\n--{boundary}--\r\n".encode()
        self._payload = payload
        self._size = size

    def __len__(self) -> int:
        return len(self._preamble) + self._size + len(self._epilogue)

    def __iter__(self) -> Iterator[Buffer]:
        yield self._preamble
        yield from self._payload()
        yield self._epilogue


def read_to_file(response: requests.Response, sink: BinaryIO) -> int:
    """Write a streamed body to ``sink`` in 1 MiB chunks; return the byte count."""
    size = 0
    for chunk in response.iter_content(CHUNK):
        sink.write(chunk)
        size += len(chunk)
    if size == 0:
        raise ProtocolError("download: file not received (empty body)")
    return size


def read_to_buffer(response: requests.Response, buffer: DownloadBuffer) -> memoryview:
    """Read a streamed body into ``buffer``, sized from its Content-Length; return the filled view.

    Without a usable Content-Length (absent, or the body is content-encoded) the body grows in
    new memory instead. A short body means the connection was cut: :class:`TransportError`.
    """
    declared = response.headers.get("Content-Length", "")
    if not declared.isdigit() or "Content-Encoding" in response.headers:
        grown = bytearray()
        for chunk in response.iter_content(CHUNK):
            grown += chunk
        view, size = memoryview(grown), len(grown)
    else:
        view = buffer.take(int(declared))
        size = 0
        for chunk in response.iter_content(CHUNK):
            if size + len(chunk) > len(view):
                raise ProtocolError(f"download: more bytes than the declared {declared}")
            view[size:size + len(chunk)] = chunk
            size += len(chunk)
    if size == 0:
        raise ProtocolError("download: file not received (empty body)")
    if size != len(view):
        raise TransportError(f"download: received {size} of {declared} bytes; the connection was cut")
    return view


__all__ = [
    "CHUNK", "DownloadBuffer", "MultipartBody", "file_chunks", "is_local_host", "new_memory", "read_to_buffer",
    "read_to_file", "size_and_digest", "upload_compression",
]
