"""Receipt of an upload body: stream it to disk, check its integrity, decode and validate it.

The upload call is multipart (PROTOCOL.md): part ``file`` holds the NPZ bytes (tens to hundreds
of MB), part ``data`` a small JSON text. Part ``file`` is streamed to a temporary file in the
store's files directory, hashed and written by two worker threads at once while the next chunk
arrives; the 3.x client's ``x-bk-file-size`` and ``x-bk-file-digest`` headers are checked
against what arrived; the archive is then checked (:func:`wire.scan`: structure, CRCs, finite
values, a compression bomb refused before anything inflates) streaming through one 1 MiB buffer
off the event loop, within the server's member, size and compression-ratio limits, so an upload
costs the server a fixed amount of memory however large it is.

A refusal is a domain error, like everywhere below the HTTP handlers: a malformed body is an
:class:`InvalidValueError` (400), one over a limit an :class:`ArchiveTooLargeError` (413). The
texts name what was received and what was expected. A full disk is a :class:`StorageFullError`
(507, which the client does not retry); a body that stops arriving (the client went away, or
sent nothing for ``idle_timeout_s``) is an :class:`UploadInterruptedError`, logged at INFO: it
is the client's network, not a server error. Either way the caller removes the temporary file.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import hmac
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from aiohttp import BodyPartReader, ClientPayloadError, web
from aiohttp.http_exceptions import HttpProcessingError

from ..core import wire
from ..core.errors import (
    ArchiveError,
    ArchiveTooLargeError,
    InvalidValueError,
    StorageFullError,
    UploadInterruptedError,
)
from ..core.delta import DELTA_BASE_KEY
from ..core.protocol import FILE_DIGEST_HEADER, FILE_SIZE_HEADER
from .budget import ByteBudget
from .durable import start_writeback
from .httpio import body_error_text, check_unicode, is_decimal
from .records import ModelSizeLimit
from .workers import Workers

_CHUNK = 4 << 20
#: a batch below this is hashed and written by one worker, one after the other (:func:`_hash_beside_write`)
_SMALL_BATCH = 1 << 20
#: bytes of an upload checked at a time: up to one such buffer per worker thread (8) when many uploads arrive at once
_SCAN_PIECE = 1 << 20
_READ_CHUNK = 1 << 20
_DRAIN_LIMIT = 256 * 1024**2
_DATA_PART_LIMIT = 1 << 20
#: uploads that read 1 MiB at a time; beyond them an upload reads ``SMALL_READ`` at a time, because aiohttp
#: buffers twice the read size per connection before it stops reading the socket (a fixed allowance per connection)
FAST_UPLOADS = 4
#: the read size of the uploads after those, up to ``_MANY_UPLOADS`` at once
_MEDIUM_READ = 64 << 10
#: the read size of the uploads beyond that, and aiohttp's ``read_bufsize`` (app.py): what one connection
#: may buffer (twice it) when a thousand leaves upload at once (1,000 x 1 MB: +302 MB of server RSS with
#: 32 KiB, +275 MB with 16 KiB reads and socket reads)
SMALL_READ = 16 << 10
#: connections (uploads) at once beyond which a new one's socket is read ``SMALL_RECV`` bytes at a time
#: (asyncio reads 256 KiB; see :func:`small_socket_reads`): per-connection memory matters only with many
MANY_CONNECTIONS = 64
_MANY_UPLOADS = 16
SMALL_RECV = 16 << 10
_FULL = (errno.ENOSPC, errno.EDQUOT)
DEFAULT_UPLOAD_IDLE_TIMEOUT_S = 60.0

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UploadLimits:
    """How large an upload may be: bytes on the wire, archive members, and decoded bytes."""

    max_upload_bytes: int
    max_members: int
    max_total_bytes: int
    max_compression_ratio: float | None = None  # None: no compression-bomb check (wire.check_compression_ratio)


@dataclass
class ReceivedUpload:
    """An upload body on disk: the file, its size and SHA-256, and the metadata of part ``data`` (with, for a delta
    upload, the aggregate it is a difference from: :mod:`~branchkey_integrations.core.delta`)."""

    path: Path
    size: int
    sha256: bytes
    metadata: str | None = None
    delta_base: str | None = None


async def receive_upload(request: web.Request, temp: Path, limits: UploadLimits, workers: Workers, *,
                         idle_timeout_s: float = DEFAULT_UPLOAD_IDLE_TIMEOUT_S) -> ReceivedUpload:
    """Stream the multipart body's part ``file`` to ``temp`` and check it against the integrity headers.

    Raises:
        InvalidValueError: the body is malformed or does not match its headers.
        ArchiveTooLargeError: the body is larger than ``limits.max_upload_bytes``.
        StorageFullError: the disk is full.
        UploadInterruptedError: the client went away, or sent nothing for ``idle_timeout_s``.
    """
    declared_size, declared_digest = parse_integrity_headers(request, limits.max_upload_bytes)
    try:
        upload, data_text = await receive_multipart(request, temp, limits.max_upload_bytes, workers, idle_timeout_s)
    except OSError as exc:
        if exc.errno not in _FULL:
            raise
        logger.warning("upload from %s refused with 507: out of disk space (%s)", request.remote, exc.strerror)
        await drain(request)  # the client reads our 507 instead of a reset
        raise _storage_full(exc) from exc
    check_integrity(upload, declared_size, declared_digest)
    upload.metadata, upload.delta_base = parse_data_part(data_text)
    return upload


def parse_integrity_headers(request: web.Request, limit: int) -> tuple[int | None, bytes | None]:
    """``x-bk-file-size`` and ``x-bk-file-digest: sha256=<base64>`` (3.x sends them; both optional)."""
    size: int | None = None
    digest: bytes | None = None
    raw_size = request.headers.get(FILE_SIZE_HEADER)
    if raw_size is not None:
        if not is_decimal(raw_size.strip()):
            raise InvalidValueError(f"x-bk-file-size must be a byte count. Received: {raw_size[:40]!r}")
        size = int(raw_size)
        if size > limit:
            raise ArchiveTooLargeError(f"Upload of {size} bytes is larger than this server's limit of {limit} bytes.")
    raw_digest = request.headers.get(FILE_DIGEST_HEADER)
    if raw_digest is not None:
        algorithm, _, encoded = raw_digest.strip().partition("=")
        try:
            digest = base64.b64decode(encoded, validate=True)
        except ValueError:
            digest = b""
        if algorithm.lower() != "sha256" or len(digest) != 32:
            raise InvalidValueError(f"x-bk-file-digest must be 'sha256=<base64 of the SHA-256>'. Received: {raw_digest[:80]!r}")
    return size, digest


@contextlib.contextmanager
def storage_errors() -> Iterator[None]:
    """Turn a full disk (ENOSPC, EDQUOT) met while storing an upload into :class:`StorageFullError`."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _FULL:
            raise
        logger.warning("an upload was refused with 507 while being stored: out of disk space (%s)", exc.strerror)
        raise _storage_full(exc) from exc


def _storage_full(exc: OSError) -> StorageFullError:
    return StorageFullError(
        f"The server is out of disk space ({exc.strerror}); the upload was not stored. "
        "Retry once the server's administrator has freed space."
    )


async def receive_multipart(request: web.Request, temp: Path, limit: int, workers: Workers,
                            idle_timeout_s: float = DEFAULT_UPLOAD_IDLE_TIMEOUT_S) -> tuple[ReceivedUpload, str | None]:
    """Stream part ``file`` to ``temp`` (hashing as it goes); return it with the text of part ``data``."""
    if not request.content_type.startswith("multipart/"):
        raise InvalidValueError(
            f"Expected a multipart/form-data body with parts 'file' and 'data'. Received: {request.content_type!r}"
        )
    received: ReceivedUpload | None = None
    data_text: str | None = None
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or part.name not in ("file", "data"):
                await part.release()
            elif part.name == "file":
                if received is not None:
                    raise InvalidValueError("The multipart body holds part 'file' twice; expected it once.")
                received = await stream_part_to_file(request, part, temp, limit, workers, idle_timeout_s)
            else:
                data_text = await read_small_part(part, _DATA_PART_LIMIT)
    except (ConnectionError, ClientPayloadError, asyncio.IncompleteReadError) as exc:
        logger.info("upload from %s ended early (the client disconnected): %s", request.remote, exc)
        raise UploadInterruptedError(f"The upload body ended early ({type(exc).__name__}); send it again.") from exc
    except (InvalidValueError, ArchiveError):
        raise  # ours, and ValueErrors too: not to be mistaken for the parser's below
    except (ValueError, HttpProcessingError, web.RequestPayloadError) as exc:  # aiohttp's parsers: a malformed
        raise InvalidValueError(  # body, a part's header holding a character no header may, a bad chunk or encoding
            f"Malformed multipart body ({body_error_text(exc)}); expected multipart/form-data with parts 'file' and "
            "'data'.") from exc
    if received is None:
        raise InvalidValueError("The multipart body has no part 'file'; expected the NPZ bytes in part 'file'.")
    return received, data_text


async def stream_part_to_file(request: web.Request, part: BodyPartReader, temp: Path, limit: int,
                              workers: Workers, idle_timeout_s: float = DEFAULT_UPLOAD_IDLE_TIMEOUT_S) -> ReceivedUpload:
    """Write while reading: each batch of chunks goes to disk in a worker while the next one arrives.

    Chunks are read at 1 MiB (aiohttp copies each into a window with the previous one to find
    the boundary: small chunks keep those copies in cache) and handed over as a list, not joined;
    one worker hashes a batch while another writes it (one after the other, a 47 MB body's batches
    kept the worker busy 85-125 ms, hash 50-60 and write 25-45, and the socket waited on it).
    A body that sends nothing for ``idle_timeout_s`` is dropped (:class:`UploadInterruptedError`).
    """
    digest = hashlib.sha256()
    size = batched = pending_bytes = 0
    batch: list[bytes] = []
    pending: asyncio.Future[None] | None = None
    budget = ByteBudget.of_running_loop()
    read_size = (_READ_CHUNK if budget.uploads < FAST_UPLOADS
                 else _MEDIUM_READ if budget.uploads < _MANY_UPLOADS else SMALL_READ)
    budget.uploads += 1

    async def settle() -> None:  # the write in flight is done: its bytes go back to the budget
        nonlocal pending, pending_bytes
        if pending is not None:
            try:
                await pending
            finally:
                pending = None
                budget.release(pending_bytes)
                pending_bytes = 0

    async def flush() -> None:  # hand the batch to a worker (after the previous write)
        nonlocal batch, batched, pending, pending_bytes
        await settle()
        if batch:
            pending, pending_bytes = asyncio.ensure_future(_hash_beside_write(workers, out, digest, batch)), batched
            batch, batched = [], 0

    small_recv = SMALL_RECV if budget.uploads > _MANY_UPLOADS else None
    with open(temp, "wb") as out, _socket_reads(request, small_recv):
        try:
            while True:
                if budget.spent():  # by all uploads together: hold nothing while waiting for room
                    await flush()
                    await settle()
                    await budget.room()
                chunk = await _read_or_stall(request, part, idle_timeout_s, read_size)
                if not chunk:
                    break
                budget.take(len(chunk))
                batch.append(chunk)
                batched += len(chunk)
                size += len(chunk)
                if size > limit:
                    await drain(request)
                    raise ArchiveTooLargeError(f"Upload is larger than this server's limit of {limit} bytes.")
                if batched >= _CHUNK:
                    await flush()
            await flush()
        finally:
            budget.uploads -= 1
            await settle()
            budget.release(batched)
    return ReceivedUpload(temp, size, digest.digest())


def small_socket_reads(transport: object, size: int = SMALL_RECV) -> bool:
    """Have asyncio's selector transport read this connection's socket ``size`` bytes at a time
    (it reads 256 KiB, ``max_size``, a class attribute); False for transports of other event loops.

    Why: until a handler reads it, aiohttp keeps what one read brought in, so a connection costs up to
    one socket read beside aiohttp's buffer. The guard calls this at accept once more than
    :data:`MANY_CONNECTIONS` are open: 1,000 leaves uploading 1 MB each at once grew the server by
    512-519 MB with 256 KiB reads and a 64 KiB buffer, about half a megabyte a connection.
    """
    if not isinstance(getattr(type(transport), "max_size", None), int):
        return False
    transport.max_size = size  # type: ignore[attr-defined]
    return True


@contextlib.contextmanager
def _socket_reads(request: web.Request, size: int | None) -> Iterator[None]:
    """Read this connection's socket ``size`` bytes at a time (None: as it does) for the duration of
    the block, then as before (:func:`small_socket_reads`).

    A connection whose upload waits for the budget holds its last read besides aiohttp's buffer: with
    32 KiB reads, 100 uploads at once peaked at 77-79 MB of server RSS growth instead of 87-93 (same
    round times), but 8 uploads of 200 MB took 10-30% longer, hence only past ``_MANY_UPLOADS``.
    """
    transport = request.transport
    before = getattr(transport, "__dict__", {}).get("max_size")
    if size is None or transport is None or not small_socket_reads(transport, size):
        yield
        return
    try:
        yield
    finally:
        if before is None:  # the class's again, for the connection's next request
            del transport.max_size  # type: ignore[attr-defined]
        else:
            transport.max_size = before  # type: ignore[attr-defined]


async def _read_or_stall(request: web.Request, part: BodyPartReader, idle_timeout_s: float,
                         size: int = _READ_CHUNK) -> bytes:
    try:
        return await asyncio.wait_for(part.read_chunk(size), idle_timeout_s)
    except asyncio.TimeoutError:
        logger.info("upload from %s stalled: nothing arrived for %g s; dropped", request.remote, idle_timeout_s)
        raise UploadInterruptedError(
            f"The upload body stalled (nothing for {idle_timeout_s:g} s) and was dropped; send it again."
        ) from None


async def _hash_beside_write(workers: Workers, out: Any, digest: Any, chunks: list[bytes]) -> None:
    """Hash a batch in one worker while another writes it (both release the GIL); done when both are.

    A small batch (what an upload holds when the budget is spent and many upload at once) goes to one
    worker that hashes, then writes, without the writeback hint: two hops per 16 KiB kept 1,000 leaves
    x 1 MB waiting on the event loop's handoffs, not on the bytes.
    """
    if sum(len(chunk) for chunk in chunks) < _SMALL_BATCH:
        await workers.blocking(_hash_then_write, digest, out, chunks)
        return
    hashed, written = await asyncio.gather(workers.blocking(_hash_chunks, digest, chunks),
                                           workers.blocking(_write_chunks, out, chunks), return_exceptions=True)
    for outcome in (written, hashed):
        if isinstance(outcome, BaseException):
            raise outcome


def _hash_chunks(digest: Any, chunks: list[bytes]) -> None:
    for chunk in chunks:
        digest.update(chunk)


def _hash_then_write(digest: Any, out: Any, chunks: list[bytes]) -> None:
    _hash_chunks(digest, chunks)
    out.writelines(chunks)
    out.flush()


def _write_chunks(out: Any, chunks: list[bytes]) -> None:
    out.writelines(chunks)
    out.flush()
    start_writeback(out.fileno())


async def drain(request: web.Request, limit: int = _DRAIN_LIMIT) -> None:
    """Read and drop the rest of a refused (or already counted) body so the client sees our answer, not a reset."""
    dropped = 0
    while dropped < limit and (chunk := await request.content.readany()):
        dropped += len(chunk)


async def read_small_part(part: BodyPartReader, limit: int) -> str:
    data = bytearray()
    while chunk := await part.read_chunk(65536):
        data += chunk
        if len(data) > limit:
            raise InvalidValueError(f"Part {part.name!r} is larger than {limit} bytes; expected a small JSON text.")
    try:
        return data.decode(part.get_charset(default="utf-8"))
    except (UnicodeDecodeError, LookupError) as exc:
        raise InvalidValueError(f"Part {part.name!r} is not UTF-8 text: {exc}") from exc


def check_integrity(upload: ReceivedUpload, size: int | None, digest: bytes | None) -> None:
    if size is not None and size != upload.size:
        raise InvalidValueError(
            f"x-bk-file-size says {size} bytes but part 'file' holds {upload.size}; the upload is incomplete or altered."
        )
    if digest is not None and not hmac.compare_digest(digest, upload.sha256):
        raise InvalidValueError(
            f"x-bk-file-digest does not match part 'file' (received sha256={base64.b64encode(upload.sha256).decode()}); "
            "the upload was altered in transit."
        )


def parse_data_part(text: str | None) -> tuple[str | None, str | None]:
    """The upload's metadata as text (a string as sent: 2.7.1 sends non-JSON; anything else as JSON), and the
    base aggregate a delta upload names (``delta_base``; None for a full upload, as every official client's)."""
    if text is None:
        return None, None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InvalidValueError(
            f"Part 'data' is not JSON ({exc}); expected {{\"leaf_name\": ..., \"metadata\": ...}}."
        ) from exc
    if not isinstance(data, dict):
        raise InvalidValueError("Part 'data' must be a JSON object {\"leaf_name\": ..., \"metadata\": ...}.")
    check_unicode(data, "Part 'data'")
    base = data.get(DELTA_BASE_KEY)
    if base is not None and not isinstance(base, str):
        raise InvalidValueError(f"Part 'data' names {DELTA_BASE_KEY}={base!r:.80}; expected an aggregation id (text).")
    metadata = data.get("metadata")
    if metadata is None or isinstance(metadata, str):
        return metadata, base
    return json.dumps(metadata), base


async def decode_upload(path: Path, limits: UploadLimits, workers: Workers,
                        model_limit: ModelSizeLimit | None = None) -> wire.Archive:
    """Decode the archive at ``path`` within ``limits`` and the branch's ``model_limit``, in a worker thread.

    The member count and the inflated size are checked against the zip directory before anything is
    inflated (and each member is then held to its declared size); a refusal says which limit, and
    who sets it.

    Raises:
        ArchiveTooLargeError: too many members, too many decoded bytes, or a compression bomb.
        InvalidValueError: not a readable, safe NPZ archive.
    """
    max_total = limits.max_total_bytes if model_limit is None else min(limits.max_total_bytes, model_limit.max_bytes)
    try:
        return await workers.blocking(  # streamed through one 1 MiB buffer: memory per upload is bounded
            wire.scan, path, max_members=limits.max_members, max_total_bytes=max_total,
            max_compression_ratio=limits.max_compression_ratio, piece_bytes=_SCAN_PIECE,
        )
    except ArchiveTooLargeError as exc:
        raise ArchiveTooLargeError(f"Upload rejected: {exc}{_who_sets(exc.limit, limits, model_limit)}",
                                   limit=exc.limit) from exc
    except ArchiveError as exc:
        raise InvalidValueError(f"Upload rejected: {exc}") from exc
    except (*wire.CORRUPT_ZIP_ERRORS, ValueError, OSError) as exc:
        # what wire.scan did not translate (a damaged container, an unreadable file) lands here
        raise InvalidValueError(
            f"Upload rejected: not a readable NPZ archive ({type(exc).__name__}: {exc})."
        ) from exc


def _who_sets(limit: str | None, limits: UploadLimits, model_limit: ModelSizeLimit | None) -> str:
    """What a refusal over ``limit`` adds: that nothing was inflated, and how the limit is raised."""
    if limit == "members":
        return (" Nothing was inflated. A model has far fewer tensors; if this one really has that many, the "
                "server's operator raises the limit: branchkey-local serve --max-members N.")
    if limit != "bytes":
        return ""
    if model_limit is not None and model_limit.max_bytes < limits.max_total_bytes:
        return (f" Nothing was inflated. This branch takes models of up to {model_limit.max_bytes} bytes "
                f"({model_limit.source}); if the model really grew, the branch's operator raises it: branchkey-local "
                "branch max-model-mb MB (admin API: PUT /admin/v1/branches/{branch_id}/max-model-bytes).")
    return (" Nothing was inflated. The server's operator sets that limit for every branch: branchkey-local serve "
            "--max-inflated-mb MB.")


__all__ = [
    "UploadLimits", "ReceivedUpload", "receive_upload", "decode_upload", "storage_errors",
    "DEFAULT_UPLOAD_IDLE_TIMEOUT_S",
]
