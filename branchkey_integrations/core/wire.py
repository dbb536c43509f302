"""The BranchKey model archive: a NumPy ``.npz`` (a zip of ``.npy`` members).

An upload holds ``weighting`` (float64, shape (1,)) and ``layer_0``, ``layer_1``, ...; an
aggregate holds the layers only. Layer order is numeric (``layer_10`` after ``layer_9``).

Decoding reads each member's ``.npy`` header itself and checks it against the zip entry
before allocating anything, so a hostile archive (a zip bomb, a header that claims a
terabyte, an object dtype that would need pickle) is refused with
:class:`ArchiveTooLargeError` or :class:`ArchiveError` instead of exhausting memory.

Why one module of this size: it is one format, read and written. The encoder's zip layout, the
decoder's header checks and the validation share the member naming, the ``.npy`` header rules and
the limits; splitting encode from decode would put the two halves of one byte layout in two places.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import re
import struct
import tokenize
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator, Sequence, Union

import numpy as np

from .errors import ArchiveError, ArchiveTooLargeError, WeightingError

WEIGHTING_KEY = "weighting"
KIND_KEY = "__bk_payload_kind__"
KIND_FEDERATED_LEARNING = "federated_learning"
LAYER_PATTERN = re.compile(r"layer_(0|[1-9][0-9]*)")

#: The accepted weightings (float32's normal range): every pair of them keeps a round's weighted sum finite.
MIN_WEIGHTING = 2.0 ** -126
MAX_WEIGHTING = 2.0 ** 126

#: Default limits, generous for real models and small next to this machine's memory.
DEFAULT_MAX_MEMBERS = 100_000
DEFAULT_MAX_TOTAL_BYTES = 16 * 1024**3
#: Compression-bomb guard (``decode(max_compression_ratio=...)``): float weights deflate to ~0.9 of their
#: size and a deflate stream inflates at most ~1032:1, so an archive that inflates beyond this many bytes
#: *and* beyond ``max_compression_ratio`` times its compressed size is refused before anything is inflated.
#: Below the floor a high ratio (a small all-zero bias) costs nothing worth refusing.
COMPRESSION_RATIO_FLOOR_BYTES = 64 * 1024**2
#: The ratio both sides apply by default: the server to an upload, the client to an aggregate.
DEFAULT_MAX_COMPRESSION_RATIO = 100.0

#: How the layers travel: ``"deflate"`` (what the official client writes) or ``"none"`` (stored).
COMPRESSIONS = {"deflate": zipfile.ZIP_DEFLATED, "none": zipfile.ZIP_STORED}

#: Deflate level when none is given: level 1 compresses float weights as well as level 6 (both save
#: ~7.5 %) at ~560 MB/s per core with isal (zlib: ~30 MB/s at any level on such data).
DEFAULT_DEFLATE_LEVEL = 1

try:  # the optional extra [fast]: the same deflate format and CRC, many times faster
    from isal import isal_zlib as _deflate_engine
except ImportError:  # pragma: no cover - depends on the environment
    _deflate_engine = zlib  # type: ignore[assignment]
#: True when isal is installed: deflate then costs little enough to pay off on WAN links.
FAST_DEFLATE = _deflate_engine is not zlib
_crc32 = _deflate_engine.crc32

ZIP_STORED, ZIP_DEFLATED = zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED
_CHUNK = 4 << 20
_ALIGN = 64  # numpy pads .npy headers to 64 bytes; aligning each member's start aligns its data
_ALIGN_EXTRA_ID = 0xD935  # the extra-field id Android's zipalign uses for padding
_ZIP64_LIMIT = (1 << 31) - 1  # as Python's zipfile: beyond it, sizes and offsets go in zip64 records
_MAX_HEADER = 1 << 20  # numpy itself refuses .npy headers over 10 000 bytes
_HEADER_GUESS = 4096  # a .npy header is ~128 bytes: read this much first, the rest only for a longer one
_SMALL_MEMBER = 64 << 10  # a member of at most this many (compressed) bytes is read with its local header at once
_LOCAL_SLACK = 256  # room for a local header's name and extra field in that read (alignment padding is <= 67 bytes)
_INFLATE_INPUT = 64 << 10  # compressed bytes handed to the inflater at a time
_INFLATE_OUTPUT = 1 << 20  # bytes inflated at a time, at most: a bomb's piece costs no more memory than any other
_SMALL_KEYS = 64 << 10  # bytes that 'weighting' or the payload kind (one value each) may declare, at most
_ZERO = bytes(64)  # what a scanned layer's stand-in views (strides 0): one zero of any numeric dtype
_DOS_DATE = 0x0021  # 1980-01-01 00:00: archives of the same arrays are byte-identical

_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}

# What zipfile raises on a damaged or unsupported archive: bad structure, a corrupt deflate
# stream, a truncated member, an unknown compression method, an encrypted member.
_CORRUPT_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError)

Source = Union[bytes, bytearray, memoryview, str, os.PathLike, BinaryIO]


@dataclass(frozen=True)
class LayerSpec:
    """Shape and dtype of one layer: what every leaf of a branch must agree on."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @classmethod
    def of(cls, array: np.ndarray) -> "LayerSpec":
        return cls(tuple(int(n) for n in array.shape), np.dtype(array.dtype))

    def __str__(self) -> str:
        return f"{self.dtype.name}{list(self.shape)}"


@dataclass
class Archive:
    """A decoded archive. ``weighting`` is None for an aggregate."""

    layers: list[np.ndarray]
    weighting: float | None = None
    kind: str = KIND_FEDERATED_LEARNING
    #: True when :func:`scan` made it: ``layers`` are zero-byte stand-ins of the right shape and dtype,
    #: whose values were checked finite while they streamed past
    scanned: bool = False

    @property
    def specs(self) -> list[LayerSpec]:
        return [LayerSpec.of(a) for a in self.layers]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.layers)


def layer_key(index: int) -> str:
    return f"layer_{index}"


def encode(
    layers: Sequence[np.ndarray],
    weighting: float | None = None,
    destination: Union[str, os.PathLike, BinaryIO, None] = None,
    *,
    compression: str = "deflate",
    compresslevel: int | None = None,
) -> bytes | None:
    """Write ``layers`` (and ``weighting`` if given) as a BranchKey NPZ.

    Returns the bytes when ``destination`` is None, else writes to the path or binary file.
    The output always loads with ``np.load(..., allow_pickle=False)``. See :func:`prepare`
    for the compression options; to send an archive without a copy use :func:`prepare`.
    """
    archive = prepare(layers, weighting, compression=compression, compresslevel=compresslevel)
    if destination is None:
        return archive.getvalue()
    if isinstance(destination, (str, os.PathLike)):
        with open(destination, "wb") as handle:
            archive.write_to(handle)
    else:
        archive.write_to(destination)
    return None


def prepare(
    layers: Sequence[np.ndarray],
    weighting: float | None = None,
    *,
    compression: str = "deflate",
    compresslevel: int | None = None,
) -> "EncodedArchive":
    """Lay out a BranchKey NPZ without writing it: headers plus the bytes of each member.

    ``compression="none"`` stores members: the archive is headers plus views of the arrays
    themselves (no copy; the arrays must not change until it is sent). ``"deflate"``
    compresses members in parallel threads, in 4 MiB pieces (pigz-style sync-flushed
    blocks, one valid deflate stream per member), with isal when installed (levels 1-3; zlib
    does 0 and 4-9); ``compresslevel`` defaults to 1, which on float weights saves as much as
    zlib's default level (~7.5 %) at ~20x its speed.
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"Expected compression in {sorted(COMPRESSIONS)}. Received: compression={compression!r}")
    level = DEFAULT_DEFLATE_LEVEL if compresslevel is None else compresslevel
    if not (isinstance(level, int) and 0 <= level <= 9):
        raise ValueError(f"Expected compresslevel between 0 and 9. Received: compresslevel={compresslevel!r}")
    members: list[tuple[str, np.ndarray]] = []
    if weighting is not None:
        members.append((WEIGHTING_KEY, np.array([check_weighting(weighting)], dtype=np.float64)))
    members += [(layer_key(index), np.asarray(array)) for index, array in enumerate(layers)]
    raws = [_npy_member(key, array) for key, array in members]
    layout = _ZipLayout()
    pieces: list[memoryview] = []
    if compression == "none":
        for (key, _), (header, data) in zip(members, raws):
            crc = _crc32(data, _crc32(header))
            size = len(header) + data.nbytes
            pieces += [memoryview(layout.member(key, ZIP_STORED, crc, size, size)), memoryview(header), data]
    else:
        for (key, _), (header, data), chunks in zip(members, raws, _deflate_all(raws, level)):
            crc = _crc32(data, _crc32(header))
            csize = sum(len(c) for c in chunks)
            pieces.append(memoryview(layout.member(key, ZIP_DEFLATED, crc, len(header) + data.nbytes, csize)))
            pieces += [memoryview(c) for c in chunks]
    pieces.append(memoryview(layout.end()))
    return EncodedArchive(pieces)


class EncodedArchive:
    """An NPZ as an ordered list of buffers; re-readable, so a retried upload can send it again."""

    def __init__(self, pieces: list[memoryview]) -> None:
        self._pieces = pieces
        self.size = sum(piece.nbytes for piece in pieces)
        self._sha256: bytes | None = None

    def chunks(self, limit: int = _CHUNK) -> Iterator[memoryview]:
        """The archive's bytes in order, as views of at most ``limit`` bytes (no copies)."""
        for piece in self._pieces:
            for start in range(0, piece.nbytes, limit):
                yield piece[start:start + limit]

    def sha256(self) -> bytes:
        """SHA-256 of the archive (one pass, ~1.6 GB/s; cached)."""
        if self._sha256 is None:
            digest = hashlib.sha256()
            for chunk in self.chunks():
                digest.update(chunk)
            self._sha256 = digest.digest()
        return self._sha256

    def write_to(self, handle: BinaryIO) -> None:
        for chunk in self.chunks():
            handle.write(chunk)

    def getvalue(self) -> bytes:
        return b"".join(self.chunks())


class ArchiveWriter:
    """Writes stored members to a file one at a time, so a writer needs only one layer in memory.

    Example:
        >>> with ArchiveWriter(io.BytesIO()) as writer:
        ...     writer.add(layer_key(0), np.ones(3, np.float32))
    """

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self._layout = _ZipLayout()
        self._keys: set[str] = set()

    def add(self, key: str, array: np.ndarray) -> None:
        if key in self._keys:
            raise ArchiveError(f"Member {key!r} written twice.")
        self._keys.add(key)
        header, data = _npy_member(key, np.asarray(array))
        size = len(header) + data.nbytes
        self._handle.write(self._layout.member(key, ZIP_STORED, _crc32(data, _crc32(header)), size, size))
        self._handle.write(header)
        self._handle.write(data)

    def add_pieces(self, key: str, spec: LayerSpec, pieces: Iterable[np.ndarray], *,
                   fortran_order: bool = False) -> None:
        """Write a stored member from its values in pieces (each written before the next is asked for), in C
        order, or in Fortran order with ``fortran_order`` (the header says which, as numpy's does).

        For a writer that never holds the whole layer (the server's mean): the local header of a member
        over 64 KiB goes out with the CRC still unknown and is rewritten in place once the last piece is
        written, so the handle must be seekable. A smaller one is gathered first and written once, CRC
        in place (seeking back cost a flush, and a write, per member: seconds for 100,000 small layers).

        Raises:
            ArchiveError: the pieces do not hold exactly ``spec``'s values, or ``key`` was written before.
        """
        if key in self._keys:
            raise ArchiveError(f"Member {key!r} written twice.")
        self._keys.add(key)
        header = _spec_header(spec.dtype, spec.shape, fortran_order)
        size = len(header) + math.prod(spec.shape) * spec.dtype.itemsize
        values = (memoryview(np.ascontiguousarray(piece, dtype=spec.dtype)).cast("B") for piece in pieces)
        if size <= _SMALL_MEMBER:
            data = b"".join([bytes(view) for view in values])  # each copied before the next piece overwrites it
            _check_written(key, spec, len(header) + len(data), size, len(header))
            self._handle.write(self._layout.member(key, ZIP_STORED, _crc32(data, _crc32(header)), size, size))
            self._handle.write(header)
            self._handle.write(data)
            return
        start, offset = self._handle.tell(), self._layout.offset
        self._handle.write(self._layout.member(key, ZIP_STORED, 0, size, size))
        self._handle.write(header)
        crc, written = _crc32(header), len(header)
        for view in values:
            crc, written = _crc32(view, crc), written + view.nbytes
            self._handle.write(view)
        _check_written(key, spec, written, size, len(header))
        end = self._handle.tell()
        self._handle.seek(start)
        self._handle.write(self._layout.rewrite_crc(offset, crc))
        self._handle.seek(end)

    def copy_stored(self, source: zipfile.ZipFile, key: str) -> None:
        """Copy the stored member ``key`` of ``source`` (an archive on disk) byte for byte, its CRC with it.

        The bytes go from file to file in the kernel where it can (``os.copy_file_range``); the
        handle must be a real file. For a member already checked (CRC, header, values) when it was
        received: nothing is decoded or checked again.
        """
        if key in self._keys:
            raise ArchiveError(f"Member {key!r} written twice.")
        info = source.getinfo(key + ".npy")
        fd = _file_descriptor(source.fp)
        if info.compress_type != ZIP_STORED or fd is None:
            raise ArchiveError(f"{key} is not a stored member of an archive on disk; decode and add it instead.")
        local = os.pread(fd, 30, info.header_offset)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise ArchiveError(f"{key}: its local header is missing; the archive is corrupt.")
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_length + extra_length
        self._keys.add(key)
        self._handle.write(self._layout.member(key, ZIP_STORED, info.CRC, info.file_size, info.file_size))
        if info.file_size <= _SMALL_MEMBER:  # one read and a buffered write: no flush and no syscalls of its own
            data = os.pread(fd, info.file_size, start)
            if len(data) != info.file_size:
                raise ArchiveError(f"{key} ended after {len(data)} of {info.file_size} bytes; the archive is "
                                   "truncated.")
            self._handle.write(data)
            return
        self._handle.flush()
        out, done = self._handle.fileno(), 0
        while done < info.file_size:
            try:
                copied = os.copy_file_range(fd, out, info.file_size - done, start + done)
            except (AttributeError, OSError):  # not Linux, or not between these files: through memory
                copied = os.write(out, os.pread(fd, min(_CHUNK, info.file_size - done), start + done))
            if not copied:
                raise ArchiveError(f"{key} ended after {done} of {info.file_size} bytes; the archive is truncated.")
            done += copied
        self._handle.seek(0, os.SEEK_END)  # the buffered handle's position follows what the kernel wrote

    def close(self) -> None:
        self._handle.write(self._layout.end())

    def __enter__(self) -> "ArchiveWriter":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()


def _check_written(key: str, spec: LayerSpec, written: int, size: int, header: int) -> None:
    if written != size:
        raise ArchiveError(f"{key}: {written - header} bytes of values written; {spec} holds {size - header}.")


def _npy_member(key: str, array: np.ndarray) -> tuple[bytes, memoryview]:
    """The ``.npy`` header (as ``np.save`` writes it) and a byte view of the data, copied only if strided."""
    if array.dtype.hasobject:
        raise ArchiveError(f"{key} has dtype {array.dtype}, which would need pickle; convert it to a numeric dtype.")
    if array.dtype.fields is not None or array.dtype.kind not in "biufc":
        raise ArchiveError(f"{key} has dtype {array.dtype}; expected a numeric dtype (bool, int, uint, float, complex).")
    info = np.lib.format.header_data_from_array_1_0(array)
    if info["fortran_order"]:
        flat = array.T.reshape(-1)
    else:
        flat = np.ascontiguousarray(array).reshape(-1)
    return _npy_header(info), memoryview(flat.view(np.uint8))


@functools.lru_cache(maxsize=4096)
def _spec_header(dtype: np.dtype, shape: tuple[int, ...], fortran_order: bool) -> bytes:
    """The ``.npy`` header of a layer of ``dtype`` and ``shape`` (cached: a model repeats a few shapes)."""
    return _npy_header({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": fortran_order, "shape": shape})


def _npy_header(info: dict) -> bytes:
    """The ``.npy`` header of ``info`` (descr, fortran_order, shape) as ``np.save`` writes it."""
    header = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(header, info)
    except ValueError:  # a header over 64 KiB (a shape with very many dimensions)
        header = io.BytesIO()
        np.lib.format.write_array_header_2_0(header, info)
    return header.getvalue()


def _deflate_all(raws: list[tuple[bytes, memoryview]], level: int) -> list[list[bytes]]:
    """Compress every member, its pieces spread over one thread per core (zlib and isal release the GIL)."""
    jobs: list[tuple[int, bytes, memoryview, bool]] = []
    for index, (header, data) in enumerate(raws):
        starts = range(0, max(data.nbytes, 1), _CHUNK)
        for number, start in enumerate(starts):
            jobs.append((index, header if number == 0 else b"", data[start:start + _CHUNK], number == len(starts) - 1))
    workers = min(len(jobs), os.cpu_count() or 1)
    if workers <= 1 or len(jobs) == len(raws) and sum(data.nbytes for _, data in raws) < _CHUNK:
        results = [_deflate_piece(header, data, last, level) for _, header, data, last in jobs]  # not worth a pool
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda job: _deflate_piece(job[1], job[2], job[3], level), jobs))
    out: list[list[bytes]] = [[] for _ in raws]
    for (index, *_), compressed in zip(jobs, results):
        out[index].append(compressed)
    return out


def _deflate_piece(header: bytes, data: memoryview, last: bool, level: int) -> bytes:
    """Raw deflate of one piece; a sync flush ends it on a byte boundary so pieces concatenate."""
    library = _deflate_engine if 1 <= level <= 3 else zlib  # isal's levels are 0-3, and its 0 is not "store"
    engine = library.compressobj(level, zlib.DEFLATED, -15)
    out = engine.compress(header) + engine.compress(data)
    return out + engine.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


class _ZipLayout:
    """Zip headers for members laid out one after the other; zip64 records only where needed.

    Stored members are padded (an extra field, as Android's zipalign does) so that each
    member's ``.npy`` data starts 64-byte aligned in the archive: a reader can then view
    the arrays in the downloaded buffer instead of copying them.
    """

    def __init__(self) -> None:
        self.offset = 0
        self._central: list[bytes] = []
        self._members: dict[int, tuple[int, str, int, int, int]] = {}  # offset -> its central index and fields

    def member(self, key: str, method: int, crc: int, size: int, csize: int) -> bytes:
        """The local header of the next member (whose data is ``csize`` bytes); records its central entry."""
        local = self._local(key, method, crc, size, csize, self.offset)
        self._members[self.offset] = (len(self._central), key, method, size, csize)
        self._central.append(self._central_entry(key, method, crc, size, csize, self.offset))
        self.offset += len(local) + csize
        return local

    def rewrite_crc(self, offset: int, crc: int) -> bytes:
        """Set the CRC of the member at ``offset`` (written with a placeholder); returns its new local header,
        the same length as the first."""
        index, key, method, size, csize = self._members[offset]
        self._central[index] = self._central_entry(key, method, crc, size, csize, offset)
        return self._local(key, method, crc, size, csize, offset)

    @staticmethod
    def _local(key: str, method: int, crc: int, size: int, csize: int, offset: int) -> bytes:
        name = (key + ".npy").encode("ascii")
        big = max(size, csize) > _ZIP64_LIMIT
        extra = struct.pack("<HHQQ", 1, 16, size, csize) if big else b""
        if method == ZIP_STORED:
            extra += _padding(offset + 30 + len(name) + len(extra))
        version = 45 if big else 20
        return struct.pack(
            "<4s2B4HL2L2H", b"PK\x03\x04", version, 0, 0, method, 0, _DOS_DATE, crc,
            0xFFFFFFFF if big else csize, 0xFFFFFFFF if big else size, len(name), len(extra),
        ) + name + extra

    @staticmethod
    def _central_entry(key: str, method: int, crc: int, size: int, csize: int, offset: int) -> bytes:
        name = (key + ".npy").encode("ascii")
        fields = [size, csize, offset]
        wide = [value for value in fields if value > _ZIP64_LIMIT]
        size_, csize_, offset_ = (0xFFFFFFFF if value > _ZIP64_LIMIT else value for value in fields)
        extra = struct.pack(f"<HH{len(wide)}Q", 1, 8 * len(wide), *wide) if wide else b""
        version = 45 if wide else 20
        return struct.pack(
            "<4s4B4HL2L5HLL", b"PK\x01\x02", version, 3, version, 0, 0, method, 0, _DOS_DATE, crc,
            csize_, size_, len(name), len(extra), 0, 0, 0, 0o644 << 16, offset_,
        ) + name + extra

    def end(self) -> bytes:
        """Central directory and end records (zip64 end records when counts or offsets need them)."""
        directory = b"".join(self._central)
        count, start, length = len(self._central), self.offset, len(directory)
        tail = b""
        if count > 0xFFFF or start > _ZIP64_LIMIT or length > _ZIP64_LIMIT:
            end64 = start + length
            tail = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, length, start)
            tail += struct.pack("<4sLQL", b"PK\x06\x07", 0, end64, 1)
            count, start, length = min(count, 0xFFFF), min(start, 0xFFFFFFFF), min(length, 0xFFFFFFFF)
        self.offset += len(directory) + len(tail) + 22
        return directory + tail + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, length, start, 0)


def _padding(data_start: int) -> bytes:
    """An extra field that moves ``data_start`` to the next multiple of 64 (4 bytes at least, or none)."""
    pad = -data_start % _ALIGN
    if pad == 0:
        return b""
    if pad < 4:
        pad += _ALIGN
    return struct.pack("<HH", _ALIGN_EXTRA_ID, pad - 4) + bytes(pad - 4)


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
    :data:`COMPRESSION_RATIO_FLOOR_BYTES` (None: no ratio check); only ``weighting``, ``layer_<i>`` and the payload-kind key; layers
    numbered 0..n-1 without gaps; numeric dtypes; each ``.npy`` header consistent with
    its zip entry. Values are not checked here (see :func:`check_finite`).

    From a writable buffer (a ``bytearray``, or the NumPy-backed ``memoryview`` the client
    downloads into), 64-byte-aligned stored members become writable views of it after a CRC
    check: no copy. Other members are read into fresh arrays.
    """
    buffer = memoryview(source).cast("B") if isinstance(source, (bytes, bytearray, memoryview)) else None
    opened = _BufferFile(buffer) if buffer is not None else _open_source(source)
    try:
        with zipfile.ZipFile(opened) as zf:
            infos = _checked_members(zf, max_members, max_total_bytes)
            if max_compression_ratio is not None:
                check_compression_ratio(list(infos.values()), max_compression_ratio)
            arrays = {key: _load_member(zf, info, key, buffer) for key, info in infos.items()}
    except _CORRUPT_ZIP_ERRORS as exc:
        raise ArchiveError(f"Not a valid NPZ (zip) archive: {exc!r}.") from exc
    finally:
        if opened is not source:
            opened.close()
    return _assemble(arrays)


class _BufferFile(io.RawIOBase):
    """A seekable read-only file over a buffer, so zipfile can parse it without copying it."""

    def __init__(self, buffer: memoryview) -> None:
        super().__init__()
        self._buffer = buffer
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, target: "memoryview | bytearray") -> int:  # type: ignore[override]
        view = self._buffer[self._position:self._position + len(target)]
        target[:view.nbytes] = view
        self._position += view.nbytes
        return view.nbytes

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._buffer.nbytes}[whence]
        self._position = max(base + offset, 0)
        return self._position

    def tell(self) -> int:
        return self._position

    def getbuffer(self) -> memoryview:
        return self._buffer


def _open_source(source: Source) -> BinaryIO:
    if isinstance(source, (str, os.PathLike)):
        return open(source, "rb")
    return source  # type: ignore[return-value]


def _checked_members(zf: zipfile.ZipFile, max_members: int, max_total_bytes: int) -> dict[str, zipfile.ZipInfo]:
    """The members by key, from the zip directory alone: their count and declared sizes are checked
    against the limits before a byte is inflated (:class:`_MemberReader` then holds each to its size)."""
    infos = zf.infolist()
    if len(infos) > max_members:
        raise ArchiveTooLargeError(f"Archive has {len(infos)} members; the limit is {max_members}.", limit="members")
    total = sum(info.file_size for info in infos)
    if total > max_total_bytes:
        raise ArchiveTooLargeError(
            f"Archive would decompress to {total} bytes; the limit is {max_total_bytes} bytes.", limit="bytes"
        )
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
        if key != WEIGHTING_KEY and key != KIND_KEY and not LAYER_PATTERN.fullmatch(key):
            raise ArchiveError(
                f"Unexpected member {info.filename!r}; a BranchKey archive holds only "
                f"'{WEIGHTING_KEY}', 'layer_0', 'layer_1', ... (numbered from 0)."
            )
        if key in members:
            raise ArchiveError(f"Member {key!r} appears twice in the archive.")
        if (key == WEIGHTING_KEY or key == KIND_KEY) and info.file_size > _SMALL_KEYS:
            raise ArchiveError(f"Member {info.filename!r} declares {info.file_size} bytes; it holds one value "
                               f"(at most {_SMALL_KEYS} bytes with its header).")
        members[key] = info
    return members


def scan(
    path: str | os.PathLike,
    *,
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_compression_ratio: float | None = None,
    piece_bytes: int = _CHUNK,
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
            infos = _checked_members(zf, max_members, max_total_bytes)
            if max_compression_ratio is not None:
                check_compression_ratio(list(infos.values()), max_compression_ratio)
            arrays: dict[str, np.ndarray] = {}
            for key, info in infos.items():
                if not LAYER_PATTERN.fullmatch(key):
                    arrays[key] = _load_member(zf, info, key, None)  # weighting, payload kind: a few bytes
                    continue
                spec, _, pieces = layer_pieces(zf, int(key[len("layer_"):]), piece_bytes)
                for piece in pieces:
                    if not all_finite(piece):
                        bad = int(piece.size - np.count_nonzero(np.isfinite(piece)))
                        raise ArchiveError(f"{key} holds {bad}+ non-finite value(s) (NaN or infinity).")
                arrays[key] = np.ndarray(spec.shape, spec.dtype, buffer=_ZERO, strides=(0,) * len(spec.shape))
    except _CORRUPT_ZIP_ERRORS as exc:
        raise ArchiveError(f"Not a valid NPZ (zip) archive: {exc!r}.") from exc
    archive = _assemble(arrays)
    archive.scanned = True
    return archive


def check_compression_ratio(infos: Sequence[zipfile.ZipInfo], max_ratio: float) -> None:
    """Refuse a compression bomb (see :data:`COMPRESSION_RATIO_FLOOR_BYTES`), naming its worst member.

    Compares what the zip directory declares, so nothing is inflated to find out; a member that
    inflates to more than it declares fails its own size check when read.
    """
    inflated = sum(info.file_size for info in infos)
    compressed = sum(info.compress_size for info in infos)
    if inflated <= COMPRESSION_RATIO_FLOOR_BYTES or inflated <= max_ratio * compressed:
        return
    worst = max(infos, key=lambda info: info.file_size / max(info.compress_size, 1))
    raise ArchiveTooLargeError(
        f"Archive inflates to {inflated} bytes from {compressed} compressed ({inflated / max(compressed, 1):.0f}:1); "
        f"member {worst.filename!r} alone inflates {worst.file_size} bytes from {worst.compress_size} "
        f"({worst.file_size / max(worst.compress_size, 1):.0f}:1). The limit is {max_ratio:g}:1 (float weights "
        f"deflate to about 0.9 of their size); this looks like a compression bomb. Send real weights, or store "
        f"the members uncompressed, or raise the server's --max-compression-ratio.", limit="ratio"
    )


def read_layer(zf: zipfile.ZipFile, index: int) -> np.ndarray:
    """Read one ``layer_<index>`` from an open archive with the same checks as :func:`decode`.

    Lets the server aggregate layer by layer without holding whole archives in memory.
    """
    key = layer_key(index)
    try:
        info = zf.getinfo(key + ".npy")
    except KeyError:
        raise ArchiveError(f"Archive has no member {key}.") from None
    try:
        return _load_member(zf, info, key, None)
    except _CORRUPT_ZIP_ERRORS as exc:
        raise ArchiveError(f"{key} is corrupt: {exc!r}.") from exc


def layer_pieces(
    zf: zipfile.ZipFile, index: int, piece_bytes: int = _CHUNK
) -> tuple[LayerSpec, bool, Iterator[np.ndarray]]:
    """Stream one ``layer_<index>``: its spec, whether its data is in Fortran order, and its values.

    The values come as flat pieces of at most ``piece_bytes`` in file order (C order, or Fortran
    order when the second value is True), each a view of one reused buffer that the next piece
    overwrites: a consumer (the server's running FedAvg) needs one piece of memory, not one layer.
    The header gets the same checks as :func:`decode`; the CRC is checked after the last piece,
    so a consumer that cannot undo what it did with the pieces must treat an :class:`ArchiveError`
    from the iterator as spoiling it.
    """
    key = layer_key(index)
    try:
        info = zf.getinfo(key + ".npy")
    except KeyError:
        raise ArchiveError(f"Archive has no member {key}.") from None
    try:
        reader = _member_reader(zf, info, key)
        shape, fortran_order, dtype = reader.header()
    except _CORRUPT_ZIP_ERRORS as exc:
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
        except _CORRUPT_ZIP_ERRORS as exc:
            raise ArchiveError(f"{key} is corrupt: {exc!r}.") from exc

    return LayerSpec(tuple(int(n) for n in shape), np.dtype(dtype)), bool(fortran_order), pieces()


def _load_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str, buffer: memoryview | None) -> np.ndarray:
    if buffer is not None and info.compress_type == ZIP_STORED:
        return _view_member(buffer, info, key)
    reader = _member_reader(zf, info, key, buffer)
    shape, fortran_order, dtype = reader.header()
    array = np.empty(math.prod(shape), dtype=dtype)
    view = memoryview(array.view(np.uint8)) if array.nbytes else memoryview(b"")
    read = 0
    while read < view.nbytes:
        got = reader.readinto(view[read:])
        if not got:
            raise ArchiveError(f"{key} ended after {read} of {view.nbytes} bytes; the archive is truncated.")
        read += got
    reader.finish()
    return _shaped(array, shape, fortran_order)


def _file_descriptor(handle: object) -> int | None:
    """The OS file behind ``handle`` when positional reads (``os.preadv``) can fill arrays from it."""
    if not hasattr(os, "preadv"):
        return None
    try:
        return handle.fileno()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return None


def _member_reader(zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str,
                   buffer: memoryview | None = None) -> "_MemberReader":
    """A reader of one member of ``zf``: from ``buffer`` (the whole archive) when given, else from the OS
    file under ``zf`` (``pread``), else from its file object (``seek`` and ``read``)."""
    source = buffer if buffer is not None else _file_descriptor(zf.fp)
    return _MemberReader(zf.fp if source is None else source, info, key)  # type: ignore[arg-type]


class _MemberReader:
    """The ``.npy`` bytes of one stored or deflated member, read from where its local header says they start.

    Not zipfile's reader, for two reasons. Its overhead: a seek, the local header read again and a
    ``ZipExtFile`` cost ~25 us a member before the first byte (a 99,999-layer upload spent seconds
    there); here a member of a few KiB is one ``pread``, its local header included. And its trust:
    it stops at the size the zip directory declares but accepts a deflate stream that goes on past
    it. Here a member inflates in pieces (at most 64 KiB of input and 1 MiB of output at a time) and
    never past its declared size: one that would (a bomb whose directory lies) is refused by
    :meth:`finish`, as is one that ends short or fails its CRC. So the limits checked against the
    directory before anything is inflated (:func:`_checked_members`) hold while inflating.
    """

    def __init__(self, source: int | memoryview | BinaryIO, info: zipfile.ZipInfo, key: str) -> None:
        if info.flag_bits & 0x1:
            raise ArchiveError(f"{key} is encrypted; a BranchKey archive's members are plain .npy files.")
        if info.compress_type not in (ZIP_STORED, ZIP_DEFLATED):
            raise ArchiveError(f"{key} is compressed with zip method {info.compress_type}; expected stored (0) or "
                               "deflate (8), as numpy writes.")
        if info.compress_type == ZIP_STORED and info.compress_size != info.file_size:
            raise ArchiveError(f"{key} is stored in {info.compress_size} bytes but declares {info.file_size}; "
                               "the archive is corrupt.")
        self._source, self._info, self._key = source, info, key
        first = self._read(info.header_offset, 30 + _LOCAL_SLACK + min(info.compress_size, _SMALL_MEMBER))
        if len(first) < 30 or bytes(first[:4]) != b"PK\x03\x04":
            raise ArchiveError(f"{key}: its local header is missing; the archive is corrupt.")
        name_length, extra_length = struct.unpack("<HH", first[26:30])
        _check_local_name(bytes(first[30:30 + name_length]), info, key)
        skip = 30 + name_length + extra_length
        self._ahead = first[skip:skip + info.compress_size]  # the member's first bytes, read with its header
        self._offset = info.header_offset + skip + len(self._ahead)  # of the member's next unread bytes
        self._unread = info.compress_size - len(self._ahead)
        self._left = info.file_size  # .npy bytes still to come
        self._inflate = zlib.decompressobj(-15) if info.compress_type == ZIP_DEFLATED else None
        self._tail: bytes | memoryview = b""  # input the inflater has not consumed yet
        self._crc = 0
        self._spill = memoryview(b"")  # values that :meth:`header` read with the header

    def _read(self, offset: int, size: int) -> bytes | memoryview:
        source = self._source
        if isinstance(source, int):
            return os.pread(source, size, offset)
        if isinstance(source, memoryview):
            return source[offset:offset + size]
        source.seek(offset)
        return source.read(size)

    def _next_input(self, limit: int) -> bytes | memoryview:
        """The member's next stored or compressed bytes, at most ``limit``; empty at its end."""
        if self._ahead:
            chunk, self._ahead = self._ahead[:limit], self._ahead[limit:]
            return chunk
        if self._unread <= 0:
            return b""
        chunk = self._read(self._offset, min(limit, self._unread))
        if not chunk:
            raise ArchiveError(f"{self._key} ends early; the archive is truncated.")
        self._offset += len(chunk)
        self._unread -= len(chunk)
        return chunk

    def _fill(self, target: memoryview) -> int:
        """Put the member's next bytes into ``target``; 0 only at the end of its data."""
        if self._inflate is None:
            if not self._ahead and isinstance(self._source, int) and self._unread > 0:  # straight into place
                got = os.preadv(self._source, [target[:self._unread]], self._offset)
                if not got:
                    raise ArchiveError(f"{self._key} ends early; the archive is truncated.")
                self._offset += got
                self._unread -= got
                return got
            chunk = self._next_input(target.nbytes)
            target[:len(chunk)] = chunk
            return len(chunk)
        while True:
            if not self._tail:
                if self._inflate.eof:
                    return 0
                self._tail = self._next_input(_INFLATE_INPUT)
                if not self._tail:
                    return 0
            out = self._inflate.decompress(self._tail, min(target.nbytes, _INFLATE_OUTPUT))
            self._tail = self._inflate.unconsumed_tail
            if out:
                target[:len(out)] = out
                return len(out)

    def _read_raw(self, view: memoryview) -> int:
        """Fill ``view`` with the member's next bytes, never past its declared size; returns how many."""
        want, got = min(view.nbytes, self._left), 0
        while got < want and (filled := self._fill(view[got:want])):
            got += filled
        self._crc = _crc32(view[:got], self._crc)
        self._left -= got
        return got

    def header(self) -> tuple[tuple[int, ...], bool, np.dtype]:
        """Read and check the member's ``.npy`` header (:func:`_read_header`); its values follow in :meth:`readinto`."""
        size = self._info.file_size
        head = bytearray(min(size, _HEADER_GUESS))
        got = self._read_raw(memoryview(head))
        needed = _npy_header_size(bytes(head[:12]))
        if needed is not None and got < min(needed, size, _MAX_HEADER):  # a long header: read the rest of it
            rest = bytearray(min(needed, size, _MAX_HEADER) - got)
            head = head[:got] + rest[:self._read_raw(memoryview(rest))]
            got = len(head)
        plain = None
        if needed is not None and needed <= got and head[6:8] in (b"\x01\x00", b"\x02\x00"):
            plain = _plain_header(bytes(head[10 if head[6] == 1 else 12:needed]))  # parsed in place: no file calls
        if plain is not None and needed is not None:
            parsed, start = _checked_header(*plain, needed, self._info, self._key), needed
        else:
            reader = _BufferFile(memoryview(head)[:got])
            parsed, start = _read_header(reader, self._info, self._key), reader.tell()
        self._spill = memoryview(head)[start:got]
        return parsed

    def readinto(self, view: memoryview) -> int:
        """Fill ``view`` with the member's next values (after :meth:`header`); 0 at their end."""
        spilled = min(self._spill.nbytes, view.nbytes)
        if spilled:
            view[:spilled] = self._spill[:spilled]
            self._spill = self._spill[spilled:]
        return spilled + (self._read_raw(view[spilled:]) if spilled < view.nbytes else 0)

    def finish(self) -> None:
        """Check, after the last value, that the member ends where its zip entry says and passes its CRC."""
        key, info = self._key, self._info
        if self._left or self._spill.nbytes:
            raise ArchiveError(f"{key}: {self._left + self._spill.nbytes} of its {info.file_size} bytes were not read.")
        if self._inflate is not None and not self._inflate.eof:
            if self._fill(memoryview(bytearray(1))):
                raise ArchiveError(
                    f"{key} inflates past the {info.file_size} bytes its zip entry declares; refused (a compression "
                    "bomb whose directory understates it, or a corrupt archive).")
            if not self._inflate.eof:
                raise ArchiveError(f"{key}: its deflate stream ends early; the archive is truncated or corrupt.")
        if self._crc != info.CRC:
            raise ArchiveError(f"{key} fails its CRC check; the archive is corrupt.")


def _npy_header_size(prefix: bytes) -> int | None:
    """Bytes before a ``.npy`` member's data (magic, version, length field and header), from its first
    bytes; None when they are not a ``.npy`` start (the full parse then says what is wrong). Reading just
    this much keeps a fold from copying up to 1 MiB of every layer only to find where its data starts."""
    if len(prefix) < 12 or prefix[:6] != b"\x93NUMPY":
        return None
    if prefix[6] == 1:
        return 10 + int.from_bytes(prefix[8:10], "little")
    if prefix[6] in (2, 3):
        return 12 + int.from_bytes(prefix[8:12], "little")
    return None


def _check_local_name(local_name: bytes, info: zipfile.ZipInfo, key: str) -> None:
    """A member's local header names what the central directory names (as zipfile checks): two names are two
    readings of one archive, which another reader could take differently."""
    expected = info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
    if local_name != expected:
        raise ArchiveError(f"{key}: its local header names {local_name[:80]!r}, the central directory "
                           f"{expected[:80]!r}; the archive is corrupt.")


def _view_member(buffer: memoryview, info: zipfile.ZipInfo, key: str) -> np.ndarray:
    """A stored member as a view of the buffer (a copy only when its data is not aligned)."""
    local = buffer[info.header_offset:info.header_offset + 30]
    if local.nbytes < 30 or bytes(local[:4]) != b"PK\x03\x04":
        raise ArchiveError(f"{key}: its local header is missing; the archive is corrupt.")
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    _check_local_name(bytes(buffer[info.header_offset + 30:info.header_offset + 30 + name_length]), info, key)
    start = info.header_offset + 30 + name_length + extra_length
    member = buffer[start:start + info.file_size]
    if member.nbytes != info.file_size:
        raise ArchiveError(f"{key} ends after {member.nbytes} of {info.file_size} bytes; the archive is truncated.")
    if _crc32(member) != info.CRC:
        raise ArchiveError(f"{key} fails its CRC check; the archive is corrupt.")
    reader = _BufferFile(member)
    shape, fortran_order, dtype = _read_header(reader, info, key)
    array = np.frombuffer(buffer, dtype=dtype, count=math.prod(shape), offset=start + reader.tell())
    if not array.flags.aligned:
        array = array.copy()
    return _shaped(array, shape, fortran_order)


#: the header numpy writes (``np.save``, ``np.savez``, and so every BranchKey client): read without ``ast``
_PLAIN_HEADER = re.compile(r"\{'descr': '([<>|=][a-zA-Z][0-9]{1,3})', 'fortran_order': (True|False), "
                           r"'shape': \(((?:(?:0|[1-9][0-9]*), )*(?:0|[1-9][0-9]*),?)?\), \} *\n")
_PLAIN_DTYPES: dict[str, np.dtype] = {}


def _read_plain_header(member: BinaryIO, version: tuple[int, int]) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """The header as numpy writes it (:func:`_plain_header`); None, with ``member`` where it was, for
    anything else, which numpy's reader then parses (or refuses) as before."""
    start = member.tell()
    width = 2 if version == (1, 0) else 4
    length = member.read(width)
    size = int.from_bytes(length, "little") if len(length) == width else 0
    parsed = _plain_header(member.read(size)) if 0 < size <= 10_000 else None  # numpy refuses longer ones: it says so
    if parsed is None:
        member.seek(start)
    return parsed


def _plain_header(text: bytes) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """A header's text as numpy writes it, parsed with one regular expression (numpy's reader compiles it
    as Python source: 60 layers x 100 uploads took 0.2-0.5 s of a round's folds); None for anything else."""
    match = _PLAIN_HEADER.fullmatch(text.decode("latin1")) if text.endswith(b"\n") else None
    if match is None:
        return None
    descr, fortran, dims = match.groups()
    dtype = _PLAIN_DTYPES.get(descr)
    if dtype is None:
        try:
            dtype = np.dtype(descr)
        except TypeError:
            return None
        _PLAIN_DTYPES[descr] = dtype
    shape = tuple(int(n) for n in dims.split(",") if n.strip()) if dims else ()
    return shape, fortran == "True", dtype


def _read_header(member: BinaryIO, info: zipfile.ZipInfo, key: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Parse and check a ``.npy`` header: numeric dtype, and data that fills the member exactly."""
    try:
        version = np.lib.format.read_magic(member)
        if version not in _HEADER_READERS:
            raise ValueError(f".npy format version {version} is not supported")
        shape, fortran_order, dtype = _read_plain_header(member, version) or _HEADER_READERS[version](member)
    except (ValueError, SyntaxError, tokenize.TokenError, RecursionError) as exc:  # numpy tokenizes the header text
        raise ArchiveError(f"{key} is not a valid .npy member: {exc}") from exc
    return _checked_header(shape, fortran_order, dtype, member.tell(), info, key)


def _checked_header(shape: tuple[int, ...], fortran_order: bool, dtype: np.dtype, header_length: int,
                    info: zipfile.ZipInfo, key: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    if dtype.hasobject or dtype.fields is not None:
        raise ArchiveError(f"{key} has dtype {dtype}; only plain numeric dtypes are allowed (no pickle).")
    if dtype.kind not in "biufcU" or (dtype.kind == "U" and key != KIND_KEY):
        raise ArchiveError(f"{key} has dtype {dtype}; expected a numeric dtype (bool, int, uint, float, complex).")
    nbytes = math.prod(shape) * dtype.itemsize
    if header_length + nbytes != info.file_size:
        raise ArchiveError(
            f"{key}: its header declares {nbytes} bytes of data but the member holds "
            f"{info.file_size - header_length}; the archive is truncated or corrupt."
        )
    return shape, fortran_order, dtype


def _shaped(flat: np.ndarray, shape: tuple[int, ...], fortran_order: bool) -> np.ndarray:
    if fortran_order:
        return flat.reshape(shape[::-1]).transpose()
    return flat.reshape(shape)


def _assemble(arrays: dict[str, np.ndarray]) -> Archive:
    weighting = None
    if WEIGHTING_KEY in arrays:
        raw = arrays.pop(WEIGHTING_KEY)
        if raw.size != 1 or raw.dtype.kind not in "iuf":
            raise ArchiveError(
                f"'weighting' must be a single number (float64 array of shape (1,)). "
                f"Received: dtype={raw.dtype}, shape={raw.shape}."
            )
        weighting = float(raw.reshape(-1)[0])
    kind = KIND_FEDERATED_LEARNING
    if KIND_KEY in arrays:
        kind = str(arrays.pop(KIND_KEY).reshape(-1)[0])
    indices = sorted(int(key[len("layer_"):]) for key in arrays)
    if not indices:
        raise ArchiveError("Archive holds no layers; expected 'layer_0', 'layer_1', ...")
    if indices != list(range(len(indices))):
        missing = sorted(set(range(indices[-1] + 1)) - set(indices))
        raise ArchiveError(
            f"Layers must be numbered 0..{len(indices) - 1} without gaps; missing: "
            + ", ".join(layer_key(i) for i in missing[:5])
        )
    return Archive(layers=[arrays[layer_key(i)] for i in indices], weighting=weighting, kind=kind)


def check_weighting(weighting: float) -> float:
    """A weighting must be a number from :data:`MIN_WEIGHTING` to :data:`MAX_WEIGHTING`; returns it as float.

    Why a range and not any finite number > 0: a round's weighted sum divides every weighting by a power
    of two near the first one's (``RunningSum``), which must stay a float64 for any pair of accepted
    weightings; 5e-324 beside 100 is a ratio float64 cannot hold. The range (float32's normal numbers)
    holds any sample count or loss-based weight a leaf sends.
    """
    try:
        value = float(weighting)
    except (TypeError, ValueError):
        raise WeightingError(f"weighting must be a number > 0. Received: weighting={weighting!r}") from None
    if not MIN_WEIGHTING <= value <= MAX_WEIGHTING:  # NaN too
        raise WeightingError(
            f"weighting must be a finite number > 0 from {MIN_WEIGHTING:.4g} to {MAX_WEIGHTING:.4g} (usually the local "
            f"sample count). Received: weighting={weighting!r}"
        )
    return value


def check_finite(layers: Iterable[np.ndarray], names: Sequence[str] | None = None) -> None:
    """Raise naming the first layer that holds NaN or infinity."""
    for index, array in enumerate(layers):
        if not all_finite(array):
            name = names[index] if names is not None else layer_key(index)
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            raise ArchiveError(f"{name} holds {bad} non-finite value(s) (NaN or infinity).")


def all_finite(array: np.ndarray) -> bool:
    """Whether a float or complex array holds no NaN or infinity (other dtypes always do).

    A NaN or infinity makes the sum non-finite, so a finite sum (one fast pass, no temporary)
    proves the layer finite; only a non-finite sum (or an overflow) needs the exact check."""
    if array.dtype.kind not in "fc":
        return True
    if array.size <= 1024:  # a few values: checked at once, without errstate's cost (a model may have 10,000 such)
        return bool(np.isfinite(array).all())
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(array.sum()):
            return True
    return bool(np.isfinite(array).all())


def spec_mismatch(
    expected: Sequence[LayerSpec], received: Sequence[LayerSpec], names: Sequence[str] | None = None
) -> str | None:
    """Describe the first difference between two layer layouts, or None when they agree."""
    if len(expected) != len(received):
        return f"expected {len(expected)} layers, received {len(received)}"
    for index, (want, got) in enumerate(zip(expected, received)):
        if want != got:
            name = names[index] if names is not None else layer_key(index)
            return f"{name}: expected {want}, received {got}"
    return None


def validate_upload(archive: Archive, expected: Sequence[LayerSpec] | None = None) -> None:
    """Everything an upload must satisfy before it may count in a round."""
    if archive.weighting is None:
        raise ArchiveError("Upload has no 'weighting' member; expected a float64 array of shape (1,).")
    try:
        check_weighting(archive.weighting)
    except WeightingError as exc:  # inside an archive, a bad weighting is a bad archive
        raise ArchiveError(f"Member 'weighting': {exc}") from None
    if archive.kind != KIND_FEDERATED_LEARNING:
        raise ArchiveError(
            f"Payload kind {archive.kind!r} is not supported; expected {KIND_FEDERATED_LEARNING!r}."
        )
    if expected is not None:
        problem = spec_mismatch(expected, archive.specs)
        if problem:
            raise ArchiveError(f"Upload does not match this round's layers: {problem}.")
    if not archive.scanned:  # scan() checked the values as they streamed past
        check_finite(archive.layers)


__all__ = [
    "Archive",
    "LayerSpec",
    "COMPRESSIONS",
    "WEIGHTING_KEY",
    "KIND_KEY",
    "encode",
    "prepare",
    "EncodedArchive",
    "ArchiveWriter",
    "decode",
    "scan",
    "check_weighting",
    "MIN_WEIGHTING",
    "MAX_WEIGHTING",
    "check_compression_ratio",
    "COMPRESSION_RATIO_FLOOR_BYTES",
    "check_finite",
    "all_finite",
    "spec_mismatch",
    "validate_upload",
    "layer_key",
    "read_layer",
    "layer_pieces",
]
