"""The zip container of the model archive: headers written, and one member's bytes read back.

It knows zip's byte layout (local and central headers, zip64 records, the end record) and how
to read a member's bytes from where its local header says they start, through the member's
codec (:mod:`.tensor_codecs`), never past the size the central directory declares. It knows nothing of
``.npy`` or of which members an archive holds (:mod:`.archive` and :mod:`.npy` do).

Example:
    >>> layout = ZipLayout()
    >>> header = layout.member("layer_0", ZIP_STORED, 0, 0, 0)
    >>> header[:4], len(layout.end()) > 22
    (b'PK\\x03\\x04', True)
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from typing import BinaryIO

from .tensor_codecs import MARKED_METHOD, ZIP_STORED, Codec, crc32
from .errors import ArchiveError

#: what reading a damaged or unsupported archive raises, besides :class:`ArchiveError`: bad structure,
#: a corrupt deflate stream, a truncated member, an unknown compression method, an encrypted member
CORRUPT_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError)

ALIGN = 64  # numpy pads .npy headers to 64 bytes; aligning each member's start aligns its data
_ALIGN_EXTRA_ID = 0xD935  # the extra-field id Android's zipalign uses for padding
_ZIP64_LIMIT = (1 << 31) - 1  # as Python's zipfile: beyond it, sizes and offsets go in zip64 records
_DOS_DATE = 0x0021  # 1980-01-01 00:00: archives of the same arrays are byte-identical
#: a member of at most this many (compressed) bytes is read with its local header at once
SMALL_MEMBER = 64 << 10
_LOCAL_SLACK = 256  # room for a local header's name and extra field in that read (alignment padding is <= 67 bytes)
_INFLATE_INPUT = 64 << 10  # compressed bytes handed to the decoder at a time
_INFLATE_OUTPUT = 1 << 20  # bytes decoded at a time, at most: a bomb's piece costs no more memory than any other


class ZipLayout:
    """Zip headers for members laid out one after the other; zip64 records only where needed.

    Stored members are padded (an extra field, as Android's zipalign does) so that each
    member's ``.npy`` data starts 64-byte aligned in the archive: a reader can then view
    the arrays in the downloaded buffer instead of copying them. A member of a marked codec
    (:data:`~.tensor_codecs.MARKED_METHOD`) carries the codec's marker as its extra field.
    """

    def __init__(self) -> None:
        self.offset = 0
        self._central: list[bytes] = []
        self._members: dict[int, tuple[int, str, int, int, int, bytes]] = {}  # offset -> central index, fields

    def member(self, key: str, method: int, crc: int, size: int, csize: int, marker: bytes = b"") -> bytes:
        """The local header of the next member (whose data is ``csize`` bytes); records its central entry."""
        local = self._local(key, method, crc, size, csize, self.offset, marker)
        self._members[self.offset] = (len(self._central), key, method, size, csize, marker)
        self._central.append(self._central_entry(key, method, crc, size, csize, self.offset, marker))
        self.offset += len(local) + csize
        return local

    def rewrite_crc(self, offset: int, crc: int) -> bytes:
        """Set the CRC of the member at ``offset`` (written with a placeholder); returns its new local header,
        the same length as the first."""
        index, key, method, size, csize, marker = self._members[offset]
        self._central[index] = self._central_entry(key, method, crc, size, csize, offset, marker)
        return self._local(key, method, crc, size, csize, offset, marker)

    @staticmethod
    def _local(key: str, method: int, crc: int, size: int, csize: int, offset: int, marker: bytes) -> bytes:
        name = (key + ".npy").encode("ascii")
        big = max(size, csize) > _ZIP64_LIMIT
        extra = struct.pack("<HHQQ", 1, 16, size, csize) if big else b""
        if marker:
            extra += marker
        if method == ZIP_STORED:
            extra += _padding(offset + 30 + len(name) + len(extra))
        version = 45 if big else 20
        return struct.pack(
            "<4s2B4HL2L2H", b"PK\x03\x04", version, 0, 0, method, 0, _DOS_DATE, crc,
            0xFFFFFFFF if big else csize, 0xFFFFFFFF if big else size, len(name), len(extra),
        ) + name + extra

    @staticmethod
    def _central_entry(key: str, method: int, crc: int, size: int, csize: int, offset: int, marker: bytes) -> bytes:
        name = (key + ".npy").encode("ascii")
        fields = [size, csize, offset]
        wide = [value for value in fields if value > _ZIP64_LIMIT]
        size_, csize_, offset_ = (0xFFFFFFFF if value > _ZIP64_LIMIT else value for value in fields)
        extra = struct.pack(f"<HH{len(wide)}Q", 1, 8 * len(wide), *wide) if wide else b""
        if marker:
            extra += marker
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
    pad = -data_start % ALIGN
    if pad == 0:
        return b""
    if pad < 4:
        pad += ALIGN
    return struct.pack("<HH", _ALIGN_EXTRA_ID, pad - 4) + bytes(pad - 4)


class BufferFile(io.RawIOBase):
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


def file_descriptor(handle: object) -> int | None:
    """The OS file behind ``handle`` when positional reads (``os.preadv``) can fill arrays from it."""
    if not hasattr(os, "preadv"):
        return None
    try:
        return handle.fileno()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return None


def check_local_name(local_name: bytes, info: zipfile.ZipInfo, key: str) -> None:
    """A member's local header names what the central directory names (as zipfile checks): two names are two
    readings of one archive, which another reader could take differently."""
    expected = info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
    if local_name != expected:
        raise ArchiveError(f"{key}: its local header names {local_name[:80]!r}, the central directory "
                           f"{expected[:80]!r}; the archive is corrupt.")


class MemberReader:
    """The bytes of one member, read from where its local header says they start and decoded by its codec.

    Not zipfile's reader, for two reasons. Its overhead: a seek, the local header read again and a
    ``ZipExtFile`` cost ~25 us a member before the first byte (a 99,999-layer upload spent seconds
    there); here a member of a few KiB is one ``pread``, its local header included. And its trust:
    it stops at the size the zip directory declares but accepts a deflate stream that goes on past
    it. Here a member decodes in pieces (at most 64 KiB of input and 1 MiB of output at a time) and
    never past its declared size: one that would (a bomb whose directory lies) is refused by
    :meth:`finish`, as is one that ends short or fails its CRC. So the limits checked against the
    directory before anything is inflated hold while inflating.
    """

    def __init__(self, source: int | memoryview | BinaryIO, info: zipfile.ZipInfo, key: str, codec: Codec) -> None:
        if info.flag_bits & 0x1:
            raise ArchiveError(f"{key} is encrypted; a BranchKey archive's members are plain .npy files.")
        if codec.method == ZIP_STORED and info.compress_size != info.file_size:
            raise ArchiveError(f"{key} is stored in {info.compress_size} bytes but declares {info.file_size}; "
                               "the archive is corrupt.")
        self._source, self.info, self.key, self._codec = source, info, key, codec
        first = self._read(info.header_offset, 30 + _LOCAL_SLACK + min(info.compress_size, SMALL_MEMBER))
        if len(first) < 30 or bytes(first[:4]) != b"PK\x03\x04":
            raise ArchiveError(f"{key}: its local header is missing; the archive is corrupt.")
        name_length, extra_length = struct.unpack("<HH", first[26:30])
        check_local_name(bytes(first[30:30 + name_length]), info, key)
        skip = 30 + name_length + extra_length
        self._ahead = first[skip:skip + info.compress_size]  # the member's first bytes, read with its header
        self._offset = info.header_offset + skip + len(self._ahead)  # of the member's next unread bytes
        self._unread = info.compress_size - len(self._ahead)
        self._left = info.file_size  # decoded bytes still to come
        self._decoder = codec.sized_decoder(info.compress_size, info.file_size) if codec.method != ZIP_STORED else None
        self._tail: bytes | memoryview = b""  # input the decoder has not consumed yet
        self._crc = 0
        self.spill = memoryview(b"")  # decoded bytes read ahead by a caller and handed back (:meth:`readinto`)

    def _read(self, offset: int, size: int) -> bytes | memoryview:
        source = self._source
        if isinstance(source, int):
            return os.pread(source, size, offset)
        if isinstance(source, memoryview):
            return source[offset:offset + size]
        source.seek(offset)
        return source.read(size)

    def _next_input(self, limit: int) -> bytes | memoryview:
        """The member's next stored or encoded bytes, at most ``limit``; empty at its end."""
        if self._ahead:
            chunk, self._ahead = self._ahead[:limit], self._ahead[limit:]
            return chunk
        if self._unread <= 0:
            return b""
        chunk = self._read(self._offset, min(limit, self._unread))
        if not chunk:
            raise ArchiveError(f"{self.key} ends early; the archive is truncated.")
        self._offset += len(chunk)
        self._unread -= len(chunk)
        return chunk

    def _fill(self, target: memoryview) -> int:
        """Put the member's next bytes into ``target``; 0 only at the end of its data."""
        decoder = self._decoder
        if decoder is None:
            if not self._ahead and isinstance(self._source, int) and self._unread > 0:  # straight into place
                got = os.preadv(self._source, [target[:self._unread]], self._offset)
                if not got:
                    raise ArchiveError(f"{self.key} ends early; the archive is truncated.")
                self._offset += got
                self._unread -= got
                return got
            chunk = self._next_input(target.nbytes)
            target[:len(chunk)] = chunk
            return len(chunk)
        while True:
            if not self._tail:
                if decoder.eof:
                    return 0
                self._tail = self._next_input(_INFLATE_INPUT)
            out = decoder.decompress(self._tail, min(target.nbytes, _INFLATE_OUTPUT))
            self._tail = decoder.unconsumed_tail
            if out:
                target[:len(out)] = out
                return len(out)
            if not self._tail and not self._ahead and self._unread <= 0:
                return 0

    def read_raw(self, view: memoryview) -> int:
        """Fill ``view`` with the member's next bytes, never past its declared size; returns how many."""
        want, got = min(view.nbytes, self._left), 0
        while got < want and (filled := self._fill(view[got:want])):
            got += filled
        self._crc = crc32(view[:got], self._crc)
        self._left -= got
        return got

    def readinto(self, view: memoryview) -> int:
        """Fill ``view`` with the member's next bytes (:attr:`spill` first); 0 at their end."""
        spilled = min(self.spill.nbytes, view.nbytes)
        if spilled:
            view[:spilled] = self.spill[:spilled]
            self.spill = self.spill[spilled:]
        return spilled + (self.read_raw(view[spilled:]) if spilled < view.nbytes else 0)

    def finish(self) -> None:
        """Check, after the last byte, that the member ends where its zip entry says and passes its CRC."""
        key, info = self.key, self.info
        if self._left or self.spill.nbytes:
            raise ArchiveError(f"{key}: {self._left + self.spill.nbytes} of its {info.file_size} bytes were not read.")
        if self._decoder is not None and not self._decoder.eof:
            if self._fill(memoryview(bytearray(1))):
                raise ArchiveError(
                    f"{key} inflates past the {info.file_size} bytes its zip entry declares; refused (a compression "
                    "bomb whose directory understates it, or a corrupt archive).")
            if not self._decoder.eof:
                raise ArchiveError(f"{key}: its {self._codec.name} stream ends early; the archive is truncated or "
                                   "corrupt.")
        if self._crc != info.CRC:
            raise ArchiveError(f"{key} fails its CRC check; the archive is corrupt.")


__all__ = ["ZipLayout", "BufferFile", "MemberReader", "file_descriptor", "check_local_name", "CORRUPT_ZIP_ERRORS",
           "MARKED_METHOD", "SMALL_MEMBER", "ALIGN"]
