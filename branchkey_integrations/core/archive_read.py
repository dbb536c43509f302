"""Reading the model archive safely: whole (:func:`decode`), scanned on disk (:func:`scan`), or layer by layer.

Decoding reads each member's ``.npy`` header itself and checks it against the zip entry before
allocating anything, so a hostile archive (a zip bomb, a header that claims a terabyte, an object
dtype that would need pickle) is refused with :class:`ArchiveTooLargeError` or :class:`ArchiveError`
instead of exhausting memory. Each member is decoded by the codec it names (:mod:`.tensor_codecs`); the
members an archive may hold are its payload kind's (:mod:`.payload_kinds`).

Example:
    >>> from .archive_write import encode
    >>> decode(encode([np.arange(3.0)], 5.0)).weighting
    5.0
"""

from __future__ import annotations

import math
import os
import zipfile
from typing import BinaryIO, Callable, Iterator, Union

import numpy as np

from .archive import (DEFAULT_MAX_MEMBERS, DEFAULT_MAX_TOTAL_BYTES, Archive, LayerSpec, all_finite,
                      check_compression_ratio, control_key, layer_key)
from .tensor_codecs import ZIP_STORED, codec_of, crc32
from .errors import ArchiveError, ArchiveTooLargeError
from .npy import read_header, read_member_header, shaped
from .payload_kinds import FEDERATED_LEARNING, SMALL_KEY_BYTES, PayloadKind, supported_kind
from .protocol import (CONTROL_PATTERN, KIND_FEDERATED_ANALYTICS, KIND_FEDERATED_LEARNING, KIND_KEY, LAYER_PATTERN,
                       WEIGHTING_KEY)
from .zipformat import CORRUPT_ZIP_ERRORS, BufferFile, MemberReader, check_local_name, file_descriptor

Source = Union[bytes, bytearray, memoryview, str, os.PathLike, BinaryIO]

PIECE_BYTES = 4 << 20
_ZERO = bytes(64)  # what a scanned layer's stand-in views (strides 0): one zero of any numeric dtype


def decode(
    source: Source,
    *,
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_compression_ratio: float | None = None,
) -> Archive:
    """Read and structurally validate an archive; never uses pickle.

    Checks: a readable zip; at most ``max_members`` members and ``max_total_bytes``
    uncompressed; no more than ``max_compression_ratio`` times the compressed size once over
    :data:`~.archive.COMPRESSION_RATIO_FLOOR_BYTES` (None: no ratio check); only the members its
    payload kind allows (``weighting``, ``layer_<i>`` and the payload-kind key); layers numbered
    0..n-1 without gaps; numeric dtypes; each ``.npy`` header consistent with its zip entry; each
    member's codec registered. Values are not checked here (see :func:`~.archive.check_finite`).

    From a writable buffer (a ``bytearray``, or the NumPy-backed ``memoryview`` the client
    downloads into), 64-byte-aligned stored members become writable views of it after a CRC
    check: no copy. Other members are read into fresh arrays.
    """
    buffer = memoryview(source).cast("B") if isinstance(source, (bytes, bytearray, memoryview)) else None
    opened = BufferFile(buffer) if buffer is not None else _open_source(source)
    try:
        with zipfile.ZipFile(opened) as zf:
            kind, infos = _checked_members(zf, max_members, max_total_bytes, buffer)
            if max_compression_ratio is not None:
                check_compression_ratio(list(infos.values()), max_compression_ratio)
            arrays = {key: _load_member(zf, info, key, buffer, kind.allows_text(key)) for key, info in infos.items()}
    except CORRUPT_ZIP_ERRORS as exc:
        raise ArchiveError(f"Not a valid NPZ (zip) archive: {exc!r}.") from exc
    finally:
        if opened is not source:
            opened.close()
    return _assemble(arrays)


def _open_source(source: Source) -> BinaryIO:
    if isinstance(source, (str, os.PathLike)):
        return open(source, "rb")
    return source  # type: ignore[return-value]


def _checked_members(zf: zipfile.ZipFile, max_members: int, max_total_bytes: int,
                     buffer: memoryview | None = None) -> tuple[PayloadKind, dict[str, zipfile.ZipInfo]]:
    """The payload kind and the members by key, from the zip directory alone: their count and declared sizes are checked
    against the limits before a byte is inflated (:class:`~.zipformat.MemberReader` then holds each to its
    size), and their names against the payload kind (read first: one value)."""
    infos = zf.infolist()
    if len(infos) > max_members:
        raise ArchiveTooLargeError(f"Archive has {len(infos)} members; the limit is {max_members}.", limit="members")
    total = sum(info.file_size for info in infos)
    if total > max_total_bytes:
        raise ArchiveTooLargeError(
            f"Archive would decompress to {total} bytes; the limit is {max_total_bytes} bytes.", limit="bytes"
        )
    kind = _payload_kind(zf, infos, buffer)
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
        if not kind.allows_member(key):
            raise ArchiveError(f"Unexpected member {info.filename!r}; {kind.member_rule()}")
        if key in members:
            raise ArchiveError(f"Member {key!r} appears twice in the archive.")
        if (key == WEIGHTING_KEY or key == KIND_KEY) and info.file_size > SMALL_KEY_BYTES:
            raise ArchiveError(f"Member {info.filename!r} declares {info.file_size} bytes; it holds one value "
                               f"(at most {SMALL_KEY_BYTES} bytes with its header).")
        members[key] = info
    return kind, members


def _payload_kind(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], buffer: memoryview | None) -> PayloadKind:
    """The archive's payload kind: its kind member's, if it has one (a few bytes, read before any other)."""
    found = [info for info in infos if info.filename in (KIND_KEY + ".npy", KIND_KEY)]
    if not found or found[0].file_size > SMALL_KEY_BYTES:
        return FEDERATED_LEARNING  # an oversized one is refused by name below
    return supported_kind(_kind_name(_load_member(zf, found[0], KIND_KEY, buffer)))


def _kind_name(raw: np.ndarray) -> str:
    return str(raw.reshape(-1)[0]) if raw.size else ""


def scan(
    path: str | os.PathLike,
    *,
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_compression_ratio: float | None = None,
    piece_bytes: int = PIECE_BYTES,
) -> Archive:
    """Check an archive on disk as :func:`decode` does, and its values finite, in ``piece_bytes`` of memory.

    For a receiver that must not hold (or map) a whole upload: each layer streams through one
    buffer (:func:`layer_pieces`: CRC checked, finite checked piece by piece) and is represented
    in the result by a read-only, zero-byte stand-in of its shape and dtype (``Archive.scanned``).

    Raises:
        ArchiveTooLargeError: over a limit (members, bytes, compression ratio).
        ArchiveError: not a valid, safe BranchKey archive, or a layer holds NaN or infinity.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            kind, infos = _checked_members(zf, max_members, max_total_bytes)
            if max_compression_ratio is not None:
                check_compression_ratio(list(infos.values()), max_compression_ratio)
            arrays: dict[str, np.ndarray] = {}
            for key, info in infos.items():
                if CONTROL_PATTERN.fullmatch(key) and kind.allows_member(key):  # SCAFFOLD: one layer's size
                    control = _load_member(zf, info, key, None)
                    if not all_finite(control):
                        raise ArchiveError(f"{key} holds non-finite value(s) (NaN or infinity).")
                    arrays[key] = np.ndarray(control.shape, control.dtype, buffer=_ZERO,
                                             strides=(0,) * control.ndim)
                    continue
                if not LAYER_PATTERN.fullmatch(key):  # weighting, payload kind: a few bytes; analytics fields
                    arrays[key] = _load_member(zf, info, key, None, kind.allows_text(key))
                    continue
                spec, _, pieces = layer_pieces(zf, int(key[len("layer_"):]), piece_bytes)
                for piece in pieces:
                    if not all_finite(piece):
                        bad = int(piece.size - np.count_nonzero(np.isfinite(piece)))
                        raise ArchiveError(f"{key} holds {bad}+ non-finite value(s) (NaN or infinity).")
                arrays[key] = np.ndarray(spec.shape, spec.dtype, buffer=_ZERO, strides=(0,) * len(spec.shape))
    except CORRUPT_ZIP_ERRORS as exc:
        raise ArchiveError(f"Not a valid NPZ (zip) archive: {exc!r}.") from exc
    archive = _assemble(arrays)
    archive.scanned = True
    return archive


def read_layer(zf: zipfile.ZipFile, index: int) -> np.ndarray:
    """Read one ``layer_<index>`` from an open archive with the same checks as :func:`decode`.

    Lets the server aggregate layer by layer without holding whole archives in memory.
    """
    key, info = _layer_member(zf, index)
    try:
        return _load_member(zf, info, key, None)
    except CORRUPT_ZIP_ERRORS as exc:
        raise ArchiveError(f"{key} is corrupt: {exc!r}.") from exc


def read_control(zf: zipfile.ZipFile, index: int) -> np.ndarray | None:
    """Read one ``control_<index>`` (SCAFFOLD) from an open archive as :func:`read_layer` reads a layer; None
    when the archive has none (an upload of a client that sends no controls)."""
    key = control_key(index)
    try:
        info = zf.getinfo(key + ".npy")
    except KeyError:
        return None
    try:
        return _load_member(zf, info, key, None)
    except CORRUPT_ZIP_ERRORS as exc:
        raise ArchiveError(f"{key} is corrupt: {exc!r}.") from exc


def _layer_member(zf: zipfile.ZipFile, index: int) -> tuple[str, zipfile.ZipInfo]:
    key = layer_key(index)
    try:
        return key, zf.getinfo(key + ".npy")
    except KeyError:
        raise ArchiveError(f"Archive has no member {key}.") from None


def layer_pieces(
    zf: zipfile.ZipFile, index: int, piece_bytes: int = PIECE_BYTES
) -> tuple[LayerSpec, bool, Iterator[np.ndarray]]:
    """Stream one ``layer_<index>``: its spec, whether its data is in Fortran order, and its values.

    The values come as flat pieces of at most ``piece_bytes`` in file order (C order, or Fortran
    order when the second value is True), each a view of one reused buffer that the next piece
    overwrites: a consumer (the server's running FedAvg) needs one piece of memory, not one layer.
    The header gets the same checks as :func:`decode`; the CRC is checked after the last piece,
    so a consumer that cannot undo what it did with the pieces must treat an :class:`ArchiveError`
    from the iterator as spoiling it.
    """
    key, info = _layer_member(zf, index)
    try:
        reader = _member_reader(zf, info, key)
        shape, fortran_order, dtype = read_member_header(reader)
    except CORRUPT_ZIP_ERRORS as exc:
        raise ArchiveError(f"{key} is corrupt: {exc!r}.") from exc
    count = math.prod(shape)
    step = max(1, piece_bytes // max(dtype.itemsize, 1))

    def pieces() -> Iterator[np.ndarray]:
        buffer = np.empty(min(step, count), dtype=dtype)
        try:
            for first in range(0, count, step):
                piece = buffer[:min(step, count - first)]
                view, got = memoryview(piece.view(np.uint8)), 0
                while got < view.nbytes:
                    read = reader.readinto(view[got:])
                    if not read:
                        raise ArchiveError(f"{key} ended early; the archive is truncated.")
                    got += read
                yield piece
            reader.finish()
        except CORRUPT_ZIP_ERRORS as exc:
            raise ArchiveError(f"{key} is corrupt: {exc!r}.") from exc

    return LayerSpec(tuple(int(n) for n in shape), np.dtype(dtype)), bool(fortran_order), pieces()


def _load_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str, buffer: memoryview | None,
                 allow_text: bool = False) -> np.ndarray:
    allow_text = allow_text or key == KIND_KEY
    if buffer is not None and info.compress_type == ZIP_STORED:
        return _view_member(buffer, info, key, allow_text)
    reader = _member_reader(zf, info, key, buffer)
    shape, fortran_order, dtype = read_member_header(reader, allow_text=allow_text)
    array = np.empty(math.prod(shape), dtype=dtype)
    view = memoryview(array.view(np.uint8)) if array.nbytes else memoryview(b"")
    read = 0
    while read < view.nbytes:
        got = reader.readinto(view[read:])
        if not got:
            raise ArchiveError(f"{key} ended after {read} of {view.nbytes} bytes; the archive is truncated.")
        read += got
    reader.finish()
    return shaped(array, shape, fortran_order)


def _member_reader(zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str,
                   buffer: memoryview | None = None) -> MemberReader:
    """A reader of one member of ``zf`` through its codec: from ``buffer`` (the whole archive) when given,
    else from the OS file under ``zf`` (``pread``), else from its file object (``seek`` and ``read``)."""
    codec = codec_of(info.compress_type, info.extra, key)
    source = buffer if buffer is not None else file_descriptor(zf.fp)
    return MemberReader(zf.fp if source is None else source, info, key, codec)  # type: ignore[arg-type]


def _view_member(buffer: memoryview, info: zipfile.ZipInfo, key: str, allow_text: bool) -> np.ndarray:
    """A stored member as a view of the buffer (a copy only when its data is not aligned)."""
    local = buffer[info.header_offset:info.header_offset + 30]
    if local.nbytes < 30 or bytes(local[:4]) != b"PK\x03\x04":
        raise ArchiveError(f"{key}: its local header is missing; the archive is corrupt.")
    name_length, extra_length = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
    check_local_name(bytes(buffer[info.header_offset + 30:info.header_offset + 30 + name_length]), info, key)
    start = info.header_offset + 30 + name_length + extra_length
    member = buffer[start:start + info.file_size]
    if member.nbytes != info.file_size:
        raise ArchiveError(f"{key} ends after {member.nbytes} of {info.file_size} bytes; the archive is truncated.")
    if crc32(member) != info.CRC:
        raise ArchiveError(f"{key} fails its CRC check; the archive is corrupt.")
    reader = BufferFile(member)
    shape, fortran_order, dtype = read_header(reader, info.file_size, key, allow_text=allow_text)
    array = np.frombuffer(buffer, dtype=dtype, count=math.prod(shape), offset=start + reader.tell())
    if not array.flags.aligned:
        array = array.copy()
    return shaped(array, shape, fortran_order)


def _assemble(arrays: dict[str, np.ndarray]) -> Archive:
    kind = KIND_FEDERATED_LEARNING
    if KIND_KEY in arrays:
        kind = str(arrays.pop(KIND_KEY).reshape(-1)[0])
    if kind == KIND_FEDERATED_ANALYTICS:  # every other member is a named field; 'weighting' is read by nothing
        raw = arrays.pop(WEIGHTING_KEY, None)
        if raw is not None and (raw.size != 1 or raw.dtype.kind not in "biuf"):
            raise ArchiveError(f"'weighting' is reserved (the official client writes it as 0.0 and nothing reads it); "
                               f"it cannot be a field. Received: dtype={raw.dtype}, shape={raw.shape}. Rename the field.")
        return Archive(layers=[], weighting=None, kind=kind, fields=arrays)
    weighting = None
    if WEIGHTING_KEY in arrays:
        raw = arrays.pop(WEIGHTING_KEY)
        if raw.size != 1 or raw.dtype.kind not in "iuf":
            raise ArchiveError(
                f"'weighting' must be a single number (float64 array of shape (1,)). "
                f"Received: dtype={raw.dtype}, shape={raw.shape}."
            )
        weighting = float(raw.reshape(-1)[0])
    controls = _numbered({key: arrays.pop(key) for key in [k for k in arrays if CONTROL_PATTERN.fullmatch(k)]},
                         "control_", control_key)
    return Archive(layers=_numbered(arrays, "layer_", layer_key), weighting=weighting, kind=kind, controls=controls)


def _numbered(arrays: dict[str, np.ndarray], prefix: str, key_of: Callable[[int], str]) -> list[np.ndarray]:
    """``arrays`` (``<prefix><n>`` members) in numeric order; refused when the numbers have a gap. No layer at
    all is refused; no control is an empty list."""
    indices = sorted(int(key[len(prefix):]) for key in arrays)
    if not indices and prefix == "control_":
        return []
    if not indices:
        raise ArchiveError("Archive holds no layers; expected 'layer_0', 'layer_1', ...")
    if indices != list(range(len(indices))):
        missing = sorted(set(range(indices[-1] + 1)) - set(indices))
        raise ArchiveError(
            f"{prefix.capitalize()[:-1]}s must be numbered 0..{len(indices) - 1} without gaps; missing: "
            + ", ".join(key_of(i) for i in missing[:5])
        )
    return [arrays[key_of(i)] for i in indices]


__all__ = ["decode", "scan", "read_layer", "read_control", "layer_pieces", "Source"]
