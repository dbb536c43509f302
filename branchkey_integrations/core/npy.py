"""The ``.npy`` member format: headers written as ``np.save`` writes them, and read back checked.

A header is checked before anything is allocated: a numeric dtype (never one that needs pickle)
and data that fills the member exactly, so a header that claims a terabyte is refused. The
header numpy writes is parsed with one regular expression; anything else goes to numpy's own
reader.

Example:
    >>> header, data = npy_member("layer_0", np.ones((2, 3), np.float32))
    >>> plain_header(header[10:])
    ((2, 3), False, dtype('float32'))
"""

from __future__ import annotations

import functools
import io
import math
import re
import tokenize
from typing import BinaryIO

import numpy as np

from .errors import ArchiveError
from .zipformat import BufferFile, MemberReader

MAX_HEADER = 1 << 20  # numpy itself refuses .npy headers over 10 000 bytes
_HEADER_GUESS = 4096  # a .npy header is ~128 bytes: read this much first, the rest only for a longer one
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}

#: shape, Fortran order, dtype: what a header says
Header = tuple[tuple[int, ...], bool, np.dtype]


def npy_member(key: str, array: np.ndarray, allow_text: bool = False) -> tuple[bytes, memoryview]:
    """The ``.npy`` header (as ``np.save`` writes it) and a byte view of the data, copied only if strided;
    fixed-width text (``U``, ``S``) only where ``allow_text`` (an analytics field, the payload kind)."""
    if array.dtype.hasobject:
        raise ArchiveError(f"{key} has dtype {array.dtype}, which would need pickle; convert it to a numeric dtype.")
    text = allow_text and array.dtype.kind in "US"
    if not text and (array.dtype.fields is not None or array.dtype.kind not in "biufc"):
        raise ArchiveError(f"{key} has dtype {array.dtype}; expected a numeric dtype (bool, int, uint, float, complex).")
    info = np.lib.format.header_data_from_array_1_0(array)
    if info["fortran_order"]:
        flat = array.T.reshape(-1)
    else:
        flat = np.ascontiguousarray(array).reshape(-1)
    return npy_header(info), memoryview(flat.view(np.uint8))


@functools.lru_cache(maxsize=4096)
def spec_header(dtype: np.dtype, shape: tuple[int, ...], fortran_order: bool) -> bytes:
    """The ``.npy`` header of a layer of ``dtype`` and ``shape`` (cached: a model repeats a few shapes)."""
    return npy_header({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": fortran_order, "shape": shape})


def npy_header(info: dict) -> bytes:
    """The ``.npy`` header of ``info`` (descr, fortran_order, shape) as ``np.save`` writes it."""
    header = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(header, info)
    except ValueError:  # a header over 64 KiB (a shape with very many dimensions)
        header = io.BytesIO()
        np.lib.format.write_array_header_2_0(header, info)
    return header.getvalue()


def header_size(prefix: bytes) -> int | None:
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


def read_member_header(reader: MemberReader, allow_text: bool = False) -> Header:
    """Read and check the ``.npy`` header at the start of ``reader``'s member; the values that were read
    with it are handed back to the reader (:attr:`MemberReader.spill`), so its ``readinto`` goes on from them."""
    size = reader.info.file_size
    head = bytearray(min(size, _HEADER_GUESS))
    got = reader.read_raw(memoryview(head))
    needed = header_size(bytes(head[:12]))
    if needed is not None and got < min(needed, size, MAX_HEADER):  # a long header: read the rest of it
        rest = bytearray(min(needed, size, MAX_HEADER) - got)
        head = head[:got] + rest[:reader.read_raw(memoryview(rest))]
        got = len(head)
    plain = None
    if needed is not None and needed <= got and head[6:8] in (b"\x01\x00", b"\x02\x00"):
        plain = plain_header(bytes(head[10 if head[6] == 1 else 12:needed]))  # parsed in place: no file calls
    if plain is not None and needed is not None:
        parsed, start = checked_header(*plain, needed, size, reader.key, allow_text), needed
    else:
        member = BufferFile(memoryview(head)[:got])
        parsed, start = read_header(member, size, reader.key, allow_text), member.tell()
    reader.spill = memoryview(head)[start:got]
    return parsed


#: the header numpy writes (``np.save``, ``np.savez``, and so every BranchKey client): read without ``ast``
_PLAIN_HEADER = re.compile(r"\{'descr': '([<>|=][a-zA-Z][0-9]{1,3})', 'fortran_order': (True|False), "
                           r"'shape': \(((?:(?:0|[1-9][0-9]*), )*(?:0|[1-9][0-9]*),?)?\), \} *\n")
_PLAIN_DTYPES: dict[str, np.dtype] = {}


def read_plain_header(member: BinaryIO, version: tuple[int, int]) -> Header | None:
    """The header as numpy writes it (:func:`plain_header`); None, with ``member`` where it was, for
    anything else, which numpy's reader then parses (or refuses) as before."""
    start = member.tell()
    width = 2 if version == (1, 0) else 4
    length = member.read(width)
    size = int.from_bytes(length, "little") if len(length) == width else 0
    parsed = plain_header(member.read(size)) if 0 < size <= 10_000 else None  # numpy refuses longer ones: it says so
    if parsed is None:
        member.seek(start)
    return parsed


def plain_header(text: bytes) -> Header | None:
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


def read_header(member: BinaryIO, file_size: int, key: str, allow_text: bool = False) -> Header:
    """Parse and check a ``.npy`` header: numeric dtype, and data that fills the member exactly."""
    try:
        version = np.lib.format.read_magic(member)
        if version not in _HEADER_READERS:
            raise ValueError(f".npy format version {version} is not supported")
        shape, fortran_order, dtype = read_plain_header(member, version) or _HEADER_READERS[version](member)
    except (ValueError, SyntaxError, tokenize.TokenError, RecursionError) as exc:  # numpy tokenizes the header text
        raise ArchiveError(f"{key} is not a valid .npy member: {exc}") from exc
    return checked_header(shape, fortran_order, dtype, member.tell(), file_size, key, allow_text)


def checked_header(shape: tuple[int, ...], fortran_order: bool, dtype: np.dtype, header_length: int,
                   file_size: int, key: str, allow_text: bool = False) -> Header:
    """The header, once its dtype is numeric (text only where ``allow_text``) and its data fills the member."""
    if dtype.hasobject or dtype.fields is not None:
        raise ArchiveError(f"{key} has dtype {dtype}; only plain numeric dtypes are allowed (no pickle).")
    if dtype.kind not in "biufcUS" or (dtype.kind in "US" and not allow_text):
        raise ArchiveError(f"{key} has dtype {dtype}; expected a numeric dtype (bool, int, uint, float, complex).")
    nbytes = math.prod(shape) * dtype.itemsize
    if header_length + nbytes != file_size:
        raise ArchiveError(
            f"{key}: its header declares {nbytes} bytes of data but the member holds "
            f"{file_size - header_length}; the archive is truncated or corrupt."
        )
    return shape, fortran_order, dtype


def shaped(flat: np.ndarray, shape: tuple[int, ...], fortran_order: bool) -> np.ndarray:
    """A flat array of values in file order as the array the header describes."""
    if fortran_order:
        return flat.reshape(shape[::-1]).transpose()
    return flat.reshape(shape)


__all__ = ["npy_member", "spec_header", "npy_header", "header_size", "read_member_header", "read_plain_header",
           "plain_header", "read_header", "checked_header", "shaped", "Header", "MAX_HEADER"]
