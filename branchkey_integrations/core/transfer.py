"""Moving model bytes: the streamed upload body, download memory, and the choice of compression.

This module owns what makes a round trip fast and nothing about what the bytes mean: the
``multipart/form-data`` body produced while it is sent (:class:`MultipartBody`), memory kept
from one download to the next (:class:`DownloadBuffer`) and fresh memory mapped in one call
(:func:`new_memory`), reading a streamed response into a file or a buffer, hashing a file for
the integrity headers, and whether a host is near enough that compressing costs more than it
saves (:func:`is_local_host`).

A download trusts nothing the server says about its size or pace (:class:`DownloadLimits`): a
declared length over the limit is refused before any memory is taken, a body without one (chunked,
or content-encoded, inflated here in bounded steps) is refused once it passes the limit, and the
whole body must arrive by a deadline, however slowly its bytes trickle in. The HTTP calls themselves live in :mod:`.http`, the protocol in
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
import time
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable, Iterator, Union

import numpy as np
import requests

from . import wire
from .tensor_codecs import FAST_DEFLATE, codec_names
from .errors import ArchiveTooLargeError, DownloadTimeoutError, ProtocolError, TransportError

CHUNK = 1024 * 1024
Buffer = Union[bytes, memoryview]
AUTO = "auto"
#: an aggregate may be this many times the size of what the leaf uploaded (its layers in a wider dtype, say)...
AGGREGATE_SIZE_FACTOR = 4
#: ... plus this much (the archive's own headers, for a tiny model)
AGGREGATE_SIZE_SLACK = 1024 * 1024
#: what a compressed body is inflated by at a time (zlib's max_length), so no piece exceeds the limit by much
_INFLATE_STEP = 256 * 1024


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
    choices = (AUTO, *codec_names())
    if compression not in choices:
        raise ValueError(f"Expected compression in {choices}. Received: compression={compression!r}")
    if compression != AUTO:
        return compression
    return "deflate" if FAST_DEFLATE and not is_local_host(hostname) else "none"


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
        """``size`` writable bytes: the kept memory when it is large enough, else new memory (kept).

        Raises:
            ArchiveTooLargeError: this machine cannot provide ``size`` bytes.
        """
        if self._array is None or self._array.nbytes < size:
            self._array = None  # never hold the old and the new buffer at once
            try:
                self._array = new_memory(size)
            except (OSError, MemoryError, ValueError) as exc:
                raise ArchiveTooLargeError(f"download: {size} bytes of memory are not available here ({exc}).") from exc
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


def aggregate_limit(nbytes: int) -> int:
    """The most an aggregate may hold, decoded, for a model of ``nbytes`` (what a leaf uploaded or expects).

    Example:
        >>> aggregate_limit(10 * 1024**2) // 1024**2
        41
    """
    return AGGREGATE_SIZE_FACTOR * nbytes + AGGREGATE_SIZE_SLACK


@dataclass(frozen=True)
class DownloadLimits:
    """What one download may cost.

    Attributes:
        max_bytes: the most the body may hold (decoded), and the archive once inflated.
        deadline: ``time.monotonic()`` by which the whole body must have arrived.
        max_compression_ratio: an archive inflating beyond this many times its size (past
            :data:`~.wire.COMPRESSION_RATIO_FLOOR_BYTES`) is refused, as the server refuses such an upload.
    """

    max_bytes: int
    deadline: float
    max_compression_ratio: float = wire.DEFAULT_MAX_COMPRESSION_RATIO

    @classmethod
    def within(cls, max_bytes: int, seconds: float) -> "DownloadLimits":
        """Limits for a download that starts now and may take ``seconds``."""
        return cls(max_bytes, time.monotonic() + seconds)

    def decode(self, view: memoryview) -> wire.Archive:
        """Decode a downloaded archive under these limits (:func:`~.wire.decode`)."""
        return wire.decode(view, max_total_bytes=self.max_bytes, max_compression_ratio=self.max_compression_ratio)


def body_pieces(response: requests.Response, limits: DownloadLimits) -> Iterator[bytes]:
    """The body of a streamed response as it arrives, decoded, within ``limits``.

    Each read returns what the socket has (``read1``), so a body that trickles in is stopped at the
    deadline (:class:`DownloadTimeoutError`); past ``limits.max_bytes`` it is stopped at once
    (:class:`ArchiveTooLargeError`). A ``gzip`` or ``deflate`` body (sent although the client asked for
    none) is inflated here in steps of at most 256 KiB; any other encoding is a :class:`ProtocolError`.
    """
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip", "x-gzip", "deflate"):
        raise ProtocolError(f"download: Content-Encoding {encoding[:40]!r} is not supported; expected the stored "
                            "bytes (identity), gzip or deflate.")
    inflater = None if encoding == "identity" else zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib header
    size = 0
    while True:
        if time.monotonic() > limits.deadline:
            raise DownloadTimeoutError(f"download: {size} bytes received when its deadline passed; the server "
                                       "sends too slowly. Try again, or allow the round (or download) more time.")
        raw = response.raw.read1(CHUNK, decode_content=False)
        pieces = [raw] if inflater is None else _inflate(inflater, raw, limits.max_bytes - size + 1)
        for piece in pieces:
            size += len(piece)
            if size > limits.max_bytes:
                raise ArchiveTooLargeError(f"download: the body holds more than {limits.max_bytes} bytes, the limit "
                                           "for this download. Raise max_download_bytes if the model is that large.")
            yield piece
        if not raw:
            return


def _inflate(inflater: "zlib._Decompress", data: bytes, most: int) -> Iterator[bytes]:
    try:
        piece = inflater.decompress(data, min(most, _INFLATE_STEP)) if data else inflater.flush()
        while piece:
            yield piece
            most -= len(piece)
            if not inflater.unconsumed_tail or most <= 0:
                return
            piece = inflater.decompress(inflater.unconsumed_tail, min(most, _INFLATE_STEP))
    except zlib.error as exc:
        raise ProtocolError(f"download: the encoded body does not inflate: {exc}") from exc


def check_declared_size(response: requests.Response, limits: DownloadLimits) -> int | None:
    """The body's Content-Length when it says what will be stored (no encoding), refused over the limit
    before any byte is read; None when the length is not known in advance."""
    declared = response.headers.get("Content-Length", "").strip()
    if not (declared.isascii() and declared.isdigit()) or "Content-Encoding" in response.headers:
        return None
    if len(declared) > 18 or int(declared) > limits.max_bytes:
        raise ArchiveTooLargeError(f"download: the server declares {declared[:24]} bytes; the limit for this download "
                                   f"is {limits.max_bytes}. Raise max_download_bytes if the model is that large.")
    return int(declared)


def read_to_file(response: requests.Response, sink: BinaryIO, limits: DownloadLimits) -> int:
    """Write a streamed body to ``sink`` as it arrives, within ``limits``; return the byte count."""
    declared = check_declared_size(response, limits)
    size = 0
    for piece in body_pieces(response, limits):
        sink.write(piece)
        size += len(piece)
    _check_received(size, declared)
    return size


def read_to_buffer(response: requests.Response, buffer: DownloadBuffer, limits: DownloadLimits) -> memoryview:
    """Read a streamed body into ``buffer``, sized from its Content-Length; return the filled view.

    Without a usable Content-Length (absent, or the body is content-encoded) the body grows in
    new memory instead, never past ``limits.max_bytes``. A short body means the connection was cut:
    :class:`TransportError`.
    """
    declared = check_declared_size(response, limits)
    if declared is None:
        grown = bytearray()
        for piece in body_pieces(response, limits):
            grown += piece
        view, size = memoryview(grown), len(grown)
    else:
        view = buffer.take(declared)
        size = 0
        for piece in body_pieces(response, limits):
            if size + len(piece) > declared:
                raise ProtocolError(f"download: more bytes than the declared {declared}")
            view[size:size + len(piece)] = piece
            size += len(piece)
    _check_received(size, declared)
    return view[:size]


def _check_received(size: int, declared: int | None) -> None:
    if size == 0:
        raise ProtocolError("download: file not received (empty body)")
    if declared is not None and size != declared:
        raise TransportError(f"download: received {size} of {declared} bytes; the connection was cut")


__all__ = [
    "AGGREGATE_SIZE_FACTOR", "CHUNK", "DownloadBuffer", "DownloadLimits", "MultipartBody", "aggregate_limit",
    "body_pieces", "check_declared_size", "file_chunks", "is_local_host", "new_memory", "read_to_buffer",
    "read_to_file", "size_and_digest", "upload_compression",
]
