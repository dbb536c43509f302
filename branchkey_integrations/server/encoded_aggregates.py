"""Aggregates served encoded: a leaf that asks (``GET /api/v1/file/download/{id}?codec=NAME``) gets the
aggregate in a codec its branch advertises, the same bytes for every leaf that asks for that codec (the
copy is made once, beside the aggregate, and served from there).

A copy lives as ``<aggregate id>.enc-<codec>.npz`` in the store's files directory: one whose aggregate
retention removed is deleted when the next copy is made, and a restart deletes them all (they are strays to
its start-up clean-up) and makes them again on demand. The leaf's client decodes the copy with the same
registry as any archive.

In a codec that streams (:data:`~..core.streamed_archive.STREAMED_CODECS`: ``int8``, ``bf16``) the first
download does not wait for the copy: the copy is encoded member by member in a thread of its own
(:class:`~..core.streamed_archive.StreamedArchive`, its length known before it is encoded), written to its
file, and sent to every download that asks while it is being made (:func:`encoded_source`,
:func:`send_streamed`); the same bytes as the file, which serves every later download. Other codecs are
encoded whole, once (a second download waits for the first one's copy).

Example:
    >>> copy_name("f1", "int8")
    'f1.enc-int8.npz'
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import threading
from pathlib import Path
from typing import Mapping, Sequence, Union

from aiohttp import web

from ..core import wire
from ..core.errors import InvalidValueError
from ..core.streamed_archive import StreamedArchive, streams
from .records import FileRecord
from .store import Store

#: what a ``codec`` query may be (the schema in the OpenAPI document says the same)
CODEC_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")

logger = logging.getLogger(__name__)
_SUFFIX = ".enc-"
#: the copies being made, by target file: a download that finds one here is sent it as it is made
_MAKING: dict[Path, StreamedArchive] = {}
#: copies of codecs that do not stream, by target file: a second download waits for the first one's copy
_WHOLE: dict[Path, threading.Lock] = {}
_LOCK = threading.Lock()


def copy_name(file_id: str, codec: str) -> str:
    return f"{file_id}{_SUFFIX}{codec}.npz"


def check_download_codec(codec: str, accepted: Sequence[str]) -> str | None:
    """The codec to serve an aggregate in: ``codec`` when the branch advertises it, None (the aggregate as
    stored) for ``none`` or a codec the branch does not advertise (the client decodes what it gets: an archive
    names its codecs); InvalidValueError (400) for a value that is no codec name at all.

    Example:
        >>> check_download_codec("int8", ["int8"]), check_download_codec("fp16", ["int8"]), check_download_codec("none", [])
        ('int8', None, None)
    """
    if not CODEC_NAME.fullmatch(codec):
        raise InvalidValueError(f"Expected codec to be a codec name such as {sorted(accepted) or ['int8']} or none "
                                f"(the aggregate as stored). Received: codec={codec[:64]!r}")
    if codec not in accepted or codec in ("none", "stored", "deflate"):
        logger.debug("codec %r asked for, not advertised by the branch (%s): the aggregate as stored", codec, accepted)
        return None
    return codec


def encoded_source(store: Store, record: FileRecord, codec: str) -> Union[Path, StreamedArchive]:
    """The aggregate ``record`` in ``codec``: its copy's file once made, else (a codec that streams) the copy
    being made, which :func:`send_streamed` sends as it is encoded; blocking (a worker thread)."""
    target = store.files_dir / copy_name(record.id, codec)
    if not streams(codec):
        return encoded_copy(store, record, codec)
    with _LOCK:
        making = _MAKING.get(target)
        if making is not None or target.exists():
            return target if making is None else making
        archive = wire.decode(store.file_path(record))  # the aggregate's layers: one model in memory, once per codec
        making = _MAKING[target] = StreamedArchive.of_layers(archive.layers, None, codec, controls=archive.controls)
    threading.Thread(target=_write_copy, args=(store, making, target), name=f"bk-copy-{codec}", daemon=True).start()
    return making


def _write_copy(store: Store, archive: StreamedArchive, target: Path) -> None:
    """Write the copy being made to its file (atomically); then downloads are served from the file."""
    partial = store.new_temp_path()
    try:
        with open(partial, "wb") as handle:
            for chunk in archive.chunks():
                handle.write(chunk)
        os.replace(partial, target)
        logger.info("aggregate %s encoded as %s for download (%d bytes)", target.name, archive.codec.name,
                    archive.size)
    except Exception as exc:  # noqa: BLE001 - the downloads under way still get it; the next one makes it again
        logger.warning("could not keep the encoded aggregate %s (%s); the next download makes it again",
                       target.name, exc)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        with _LOCK:
            _MAKING.pop(target, None)
    _forget_removed(store)


async def send_streamed(request: web.Request, archive: StreamedArchive,
                        headers: Mapping[str, str]) -> web.StreamResponse:
    """Send ``archive`` as it is encoded (its length declared up front), waiting on the event loop, not a thread."""
    loop, more = asyncio.get_running_loop(), asyncio.Event()

    def wake() -> None:  # from the encoding thread
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting any more
            loop.call_soon_threadsafe(more.set)

    archive.listen(wake)
    response = web.StreamResponse(headers=headers)
    response.content_length = archive.size
    await response.prepare(request)
    index = 0
    while True:
        more.clear()
        pieces, done = archive.ready(index)
        index += len(pieces)
        for piece in pieces:
            await response.write(piece)
        if done:
            break
        if not pieces:
            await more.wait()
    await response.write_eof()
    return response


def encoded_copy(store: Store, record: FileRecord, codec: str) -> Path:
    """The aggregate ``record`` encoded with ``codec``: made once (atomically), then the same file."""
    target = store.files_dir / copy_name(record.id, codec)
    with _LOCK:
        lock = _WHOLE.setdefault(target, threading.Lock())
    with lock:  # a second download waits for the first one's copy instead of encoding it again
        if target.exists():
            return target
        archive = wire.decode(store.file_path(record))  # the aggregate's layers: one model in memory, once per codec
        partial = store.new_temp_path()
        try:
            with open(partial, "wb") as handle:
                wire.prepare(archive.layers, None, compression=codec, controls=archive.controls).write_to(handle)
            os.replace(partial, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
    with _LOCK:
        _WHOLE.pop(target, None)
    logger.info("aggregate %s encoded as %s for download (%d bytes)", record.id, codec, target.stat().st_size)
    _forget_removed(store)
    return target


def _forget_removed(store: Store) -> None:
    """Delete the copies of aggregates that retention removed since."""
    for entry in store.files_dir.glob(f"*{_SUFFIX}*.npz"):
        file_id = entry.name.rsplit(_SUFFIX, 1)[0]
        record = store.get_file(file_id)
        if record is None or record.removed_at is not None:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()


__all__ = ["encoded_copy", "encoded_source", "send_streamed", "check_download_codec", "copy_name"]
