"""Aggregates served encoded: a leaf that asks (``GET /api/v1/file/download/{id}?codec=NAME``) gets the
aggregate in a codec its branch advertises, the same bytes for every leaf that asks for that codec (the
copy is made once, beside the aggregate, and served from there).

A copy lives as ``<aggregate id>.enc-<codec>.npz`` in the store's files directory: one whose aggregate
retention removed is deleted when the next copy is made, and a restart deletes them all (they are strays to
its start-up clean-up) and makes them again on demand. The leaf's client decodes the copy with the same
registry as any archive.

Example:
    >>> copy_name("f1", "int8")
    'f1.enc-int8.npz'
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Sequence

from ..core import wire
from ..core.errors import InvalidValueError
from .records import FileRecord
from .store import Store

#: what a ``codec`` query may be (the schema in the OpenAPI document says the same)
CODEC_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")

logger = logging.getLogger(__name__)
_SUFFIX = ".enc-"


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


def encoded_copy(store: Store, record: FileRecord, codec: str) -> Path:
    """The aggregate ``record`` encoded with ``codec``: made once (atomically), then the same file."""
    target = store.files_dir / copy_name(record.id, codec)
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


__all__ = ["encoded_copy", "check_download_codec", "copy_name"]
