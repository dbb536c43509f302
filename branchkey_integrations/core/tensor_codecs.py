"""Tensor codecs: how the bytes of one archive member are compressed, and the registry both sides use.

A codec is a small object with a ``name`` (what travels with each member it wrote) and
``encode``/``decode``; the client's encoder (:func:`~.archive_write.prepare`) and the server's
streaming reader (:mod:`.archive_read`) look codecs up here and know nothing of what one does
inside, as zarr's numcodecs. ``stored`` and ``deflate`` travel as the zip member's compression
method (0 and 8, what numpy and the official clients write), so their archives are plain NPZ. Any
other registered codec travels as the method :data:`MARKED_METHOD` plus a small extra field naming
it (:func:`marker`), which only a reader with that codec registered accepts.

Adding a codec is one class and one :func:`register_codec` call (the README's contributor section
shows one). A codec that only defines ``encode`` and ``decode`` handles one member at a time, in
memory; :class:`DeflateCodec` shows the streaming interface (:meth:`Codec.encode_members`,
:meth:`Codec.decoder`) for one that must not hold a whole member.

Example:
    >>> codec_named("deflate").method, codec_named("stored").method
    (8, 0)
    >>> codec_named("none").name  # the name the ``compression=`` option has always used
    'stored'
"""

from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar, Protocol, Sequence, Union

from .errors import ArchiveError

try:  # the optional extra [fast]: the same deflate format and CRC, many times faster
    from isal import isal_zlib as _deflate_engine
except ImportError:  # pragma: no cover - depends on the environment
    _deflate_engine = zlib  # type: ignore[assignment]
#: True when isal is installed: deflate then costs little enough to pay off on WAN links.
FAST_DEFLATE = _deflate_engine is not zlib
#: CRC-32 as zip computes it (isal's when installed: the same value, faster)
crc32 = _deflate_engine.crc32

ZIP_STORED, ZIP_DEFLATED = 0, 8
#: the zip compression method of a member written by a codec other than stored or deflate ("BK")
MARKED_METHOD = 0x4B42
#: the zip extra-field id of the marker that names such a member's codec
MARKER_EXTRA_ID = 0x6B62
#: Deflate level when none is given: level 1 compresses float weights as well as level 6 (both save
#: ~7.5 %) at ~560 MB/s per core with isal (zlib: ~30 MB/s at any level on such data).
DEFAULT_DEFLATE_LEVEL = 1
#: bytes of a member compressed as one piece (deflate's pieces, spread over threads)
PIECE_BYTES = 4 << 20

#: one member before compression: its ``.npy`` header and a byte view of its values
RawMember = tuple[bytes, memoryview]
#: one member's encoded bytes, as pieces that concatenate: bytes, or flat byte views
Pieces = tuple[Union[bytes, memoryview], ...]


class Decoder(Protocol):
    """What a codec's :meth:`Codec.decoder` returns: zlib's decompress-object interface, which the reader
    drives with bounded input and output, so a member never inflates past its declared size."""

    eof: bool
    unconsumed_tail: bytes

    def decompress(self, data: bytes | memoryview, max_length: int) -> bytes: ...


class Codec:
    """A codec: ``name`` travels with each member it wrote; ``encode`` and ``decode`` are inverses.

    Subclasses set ``name`` and define :meth:`encode` and :meth:`decode` (whole member in, whole
    member out); one that streams overrides :meth:`encode_members` and :meth:`decoder` instead.
    """

    name: ClassVar[str] = ""
    #: the zip compression method written; every codec but stored and deflate is :data:`MARKED_METHOD`
    method: ClassVar[int] = MARKED_METHOD

    def encode(self, data: bytes) -> bytes:
        raise NotImplementedError(f"codec {self.name!r} defines no encode()")

    def decode(self, data: bytes) -> bytes:
        raise NotImplementedError(f"codec {self.name!r} defines no decode()")

    def encode_members(self, raws: Sequence[RawMember], level: int) -> list[Pieces]:
        """Each member's encoded bytes, as pieces that concatenate (``level``: a codec's effort, if it has one)."""
        return [(self.encode(header + bytes(data)),) for header, data in raws]

    def decoder(self, compressed_size: int) -> Decoder:
        """A decoder of one member of ``compressed_size`` encoded bytes."""
        return WholeDecoder(self, compressed_size)

    def decoded_crc(self, header: bytes, data: memoryview) -> int:
        """The CRC-32 of the member as a reader decodes it (zip's CRC): of ``header`` and ``data`` for a lossless codec."""
        return crc32(data, crc32(header))

    def sized_decoder(self, compressed_size: int, decoded_size: int) -> Decoder:
        """:meth:`decoder`, told the member's declared size too (one that checks it before allocating overrides this)."""
        return self.decoder(compressed_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class WholeDecoder:
    """Decodes a member at once when all its encoded bytes are in, then hands the result out in pieces."""

    def __init__(self, codec: Codec, compressed_size: int) -> None:
        self._codec, self._want = codec, compressed_size
        self._input: list[bytes] = []
        self._got = 0
        self._output: memoryview | None = None
        self.eof = False
        self.unconsumed_tail = b""

    def decompress(self, data: bytes | memoryview, max_length: int) -> bytes:
        if data:
            self._input.append(bytes(data))
            self._got += len(data)
        if self._output is None:
            if self._got < self._want:
                return b""
            self._output = memoryview(self._codec.decode(b"".join(self._input)))
            self._input = []
        out, self._output = bytes(self._output[:max_length]), self._output[max_length:]
        self.eof = not self._output.nbytes
        return out


class StoredCodec(Codec):
    """Members as they are: the archive is headers plus views of the arrays (no copy)."""

    name = "stored"
    method = ZIP_STORED

    def encode(self, data: bytes) -> bytes:
        return data

    def decode(self, data: bytes) -> bytes:
        return data

    def encode_members(self, raws: Sequence[RawMember], level: int) -> list[Pieces]:
        return list(raws)  # (header, values): a member's pieces as they are


class DeflateCodec(Codec):
    """Raw deflate, what numpy and the official clients write.

    Members are compressed in parallel threads, in 4 MiB pieces (pigz-style sync-flushed blocks, one
    valid deflate stream per member), with isal when installed (levels 1-3; zlib does 0 and 4-9).
    """

    name = "deflate"
    method = ZIP_DEFLATED

    def encode(self, data: bytes) -> bytes:
        return _deflate_piece(b"", memoryview(data), True, DEFAULT_DEFLATE_LEVEL)

    def decode(self, data: bytes) -> bytes:
        return zlib.decompress(data, -15)

    def encode_members(self, raws: Sequence[RawMember], level: int) -> list[Pieces]:
        """Compress every member, its pieces spread over one thread per core (zlib and isal release the GIL)."""
        jobs: list[tuple[int, bytes, memoryview, bool]] = []
        for index, (header, data) in enumerate(raws):
            starts = range(0, max(data.nbytes, 1), PIECE_BYTES)
            for number, start in enumerate(starts):
                jobs.append((index, header if number == 0 else b"", data[start:start + PIECE_BYTES],
                             number == len(starts) - 1))
        workers = min(len(jobs), os.cpu_count() or 1)
        if workers <= 1 or len(jobs) == len(raws) and sum(data.nbytes for _, data in raws) < PIECE_BYTES:
            results = [_deflate_piece(header, data, last, level) for _, header, data, last in jobs]  # not worth a pool
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                results = list(pool.map(lambda job: _deflate_piece(job[1], job[2], job[3], level), jobs))
        out: list[list[bytes]] = [[] for _ in raws]
        for (index, *_), compressed in zip(jobs, results):
            out[index].append(compressed)
        return [tuple(pieces) for pieces in out]

    def decoder(self, compressed_size: int) -> Decoder:
        return zlib.decompressobj(-15)  # type: ignore[return-value]


def _deflate_piece(header: bytes, data: memoryview, last: bool, level: int) -> bytes:
    """Raw deflate of one piece; a sync flush ends it on a byte boundary so pieces concatenate."""
    library = _deflate_engine if 1 <= level <= 3 else zlib  # isal's levels are 0-3, and its 0 is not "store"
    engine = library.compressobj(level, zlib.DEFLATED, -15)
    out = engine.compress(header) + engine.compress(data)
    return out + engine.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


STORED, DEFLATE = StoredCodec(), DeflateCodec()
_REGISTRY: dict[str, Codec] = {STORED.name: STORED, DEFLATE.name: DEFLATE}
_ALIASES = {"none": STORED.name}  # the ``compression=`` option's name for stored since the first release


def register_codec(codec: Codec) -> Codec:
    """Make ``codec`` available to the encoder (``compression=codec.name``) and to every reader in this process.

    Raises:
        ValueError: a name that is empty, not plain ASCII (it travels in the archive), or taken by another codec.
    """
    name = codec.name
    if not (isinstance(name, str) and name.isascii() and name.isprintable() and 0 < len(name) <= 64):
        raise ValueError(f"Expected a codec name of 1-64 printable ASCII characters. Received: name={name!r}")
    taken = _REGISTRY.get(_ALIASES.get(name, name))
    if taken is not None and taken is not codec:
        raise ValueError(f"A codec named {name!r} is already registered ({taken!r}); choose another name.")
    if codec.method != MARKED_METHOD:
        raise ValueError(f"Codec {name!r} sets method={codec.method}; only stored (0) and deflate (8) travel as a "
                         f"zip method of their own, others as {MARKED_METHOD} with a marker.")
    _REGISTRY[name] = codec
    return codec


def unregister_codec(name: str) -> None:
    """Forget a codec registered with :func:`register_codec` (stored and deflate stay)."""
    if name in (STORED.name, DEFLATE.name):
        raise ValueError(f"Codec {name!r} is built in; it cannot be unregistered.")
    _REGISTRY.pop(name, None)


def codec_names() -> list[str]:
    """The names ``compression=`` accepts: ``"none"`` (stored) and every registered codec's."""
    return sorted({*_REGISTRY, *_ALIASES})


def codec_named(name: str) -> Codec:
    """The codec registered as ``name`` (``"none"`` is stored).

    Raises:
        ValueError: no codec of that name is registered.
    """
    codec = _REGISTRY.get(_ALIASES.get(name, name)) if isinstance(name, str) else None
    if codec is None:
        raise ValueError(f"Expected compression in {codec_names()}. Received: compression={name!r}")
    return codec


def marker(codec: Codec) -> bytes:
    """The extra field that names ``codec`` in a member's headers (none for stored and deflate)."""
    if codec.method != MARKED_METHOD:
        return b""
    name = codec.name.encode("ascii")
    return struct.pack("<HH", MARKER_EXTRA_ID, len(name)) + name


def codec_of(method: int, extra: bytes, key: str) -> Codec:
    """The codec of a member written with zip ``method`` and central-directory ``extra`` field.

    Raises:
        ArchiveError: a method or a marked codec this reader does not know.
    """
    if method == ZIP_STORED:
        return STORED
    if method == ZIP_DEFLATED:
        return DEFLATE
    name = _marked_name(extra) if method == MARKED_METHOD else None
    if name is None:
        raise ArchiveError(f"{key} is compressed with zip method {method}; expected stored (0) or deflate (8), as "
                           "numpy writes.")
    codec = _REGISTRY.get(name)
    if codec is None or codec.method != MARKED_METHOD:
        raise ArchiveError(f"{key} is encoded with codec {name[:64]!r}, which this reader does not know; registered: "
                           f"{sorted(_REGISTRY)}.")
    return codec


def _marked_name(extra: bytes) -> str | None:
    """The codec name in a marker among a member's extra fields; None without a well-formed one."""
    position = 0
    while position + 4 <= len(extra):
        field_id, length = struct.unpack_from("<HH", extra, position)
        body = extra[position + 4:position + 4 + length]
        if field_id == MARKER_EXTRA_ID:
            return body.decode("ascii", "replace") if len(body) == length and body else None
        position += 4 + length
    return None


__all__ = [
    "Codec", "Decoder", "WholeDecoder", "StoredCodec", "DeflateCodec", "STORED", "DEFLATE", "register_codec",
    "unregister_codec", "codec_named", "codec_names", "codec_of", "marker", "FAST_DEFLATE", "DEFAULT_DEFLATE_LEVEL",
    "MARKED_METHOD", "MARKER_EXTRA_ID", "ZIP_STORED", "ZIP_DEFLATED", "crc32",
]
