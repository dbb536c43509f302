"""The BranchKey model archive: a NumPy ``.npz`` (a zip of ``.npy`` members).

An upload holds ``weighting`` (float64, shape (1,)) and ``layer_0``, ``layer_1``, ...; an
aggregate holds the layers only. Layer order is numeric (``layer_10`` after ``layer_9``).

Decoding reads each member's ``.npy`` header itself and checks it against the zip entry
before allocating anything, so a hostile archive (a zip bomb, a header that claims a
terabyte, an object dtype that would need pickle) is refused with
:class:`ArchiveTooLargeError` or :class:`ArchiveError` instead of exhausting memory.
"""

from __future__ import annotations

import io
import math
import os
import re
import zipfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Sequence, Union

import numpy as np

from .errors import ArchiveError, ArchiveTooLargeError

WEIGHTING_KEY = "weighting"
KIND_KEY = "__bk_payload_kind__"
KIND_FEDERATED_LEARNING = "federated_learning"
LAYER_PATTERN = re.compile(r"layer_(0|[1-9][0-9]*)")

#: Default limits, generous for real models and small next to this machine's memory.
DEFAULT_MAX_MEMBERS = 100_000
DEFAULT_MAX_TOTAL_BYTES = 16 * 1024**3

#: How the layers travel: ``"deflate"`` (what the official client writes) or ``"none"`` (stored).
COMPRESSIONS = {"deflate": zipfile.ZIP_DEFLATED, "none": zipfile.ZIP_STORED}

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
    The output always loads with ``np.load(..., allow_pickle=False)``.
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"Expected compression in {sorted(COMPRESSIONS)}. Received: compression={compression!r}")
    if weighting is not None:
        check_weighting(weighting)
    buffer = io.BytesIO() if destination is None else None
    target = buffer if buffer is not None else destination
    with zipfile.ZipFile(target, "w", COMPRESSIONS[compression], allowZip64=True, compresslevel=compresslevel) as zf:
        if weighting is not None:
            _write_member(zf, WEIGHTING_KEY, np.array([weighting], dtype=np.float64))
        for index, array in enumerate(layers):
            _write_member(zf, layer_key(index), np.asarray(array))
    return buffer.getvalue() if buffer is not None else None


def _write_member(zf: zipfile.ZipFile, key: str, array: np.ndarray) -> None:
    if array.dtype.hasobject:
        raise ArchiveError(f"{key} has dtype {array.dtype}, which would need pickle; convert it to a numeric dtype.")
    with zf.open(key + ".npy", "w", force_zip64=True) as member:
        np.lib.format.write_array(member, array, allow_pickle=False)


def decode(
    source: Source,
    *,
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
) -> Archive:
    """Read and structurally validate an archive; never uses pickle.

    Checks: a readable zip; at most ``max_members`` members and ``max_total_bytes``
    uncompressed; only ``weighting``, ``layer_<i>`` and the payload-kind key; layers
    numbered 0..n-1 without gaps; numeric dtypes; each ``.npy`` header consistent with
    its zip entry. Values are not checked here (see :func:`check_finite`).
    """
    opened = _open_source(source)
    try:
        with zipfile.ZipFile(opened) as zf:
            infos = _checked_members(zf, max_members, max_total_bytes)
            arrays = {key: _read_member(zf, info, key) for key, info in infos.items()}
    except _CORRUPT_ZIP_ERRORS as exc:
        raise ArchiveError(f"Not a valid NPZ (zip) archive: {exc!r}.") from exc
    finally:
        if opened is not source:
            opened.close()
    return _assemble(arrays)


def _open_source(source: Source) -> BinaryIO:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(source)
    if isinstance(source, (str, os.PathLike)):
        return open(source, "rb")
    return source


def _checked_members(zf: zipfile.ZipFile, max_members: int, max_total_bytes: int) -> dict[str, zipfile.ZipInfo]:
    infos = zf.infolist()
    if len(infos) > max_members:
        raise ArchiveTooLargeError(f"Archive has {len(infos)} members; the limit is {max_members}.")
    total = sum(info.file_size for info in infos)
    if total > max_total_bytes:
        raise ArchiveTooLargeError(
            f"Archive would decompress to {total} bytes; the limit is {max_total_bytes} bytes."
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
        members[key] = info
    return members


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
        return _read_member(zf, info, key)
    except _CORRUPT_ZIP_ERRORS as exc:
        raise ArchiveError(f"{key} is corrupt: {exc!r}.") from exc


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str) -> np.ndarray:
    with zf.open(info) as member:
        try:
            version = np.lib.format.read_magic(member)
            if version not in _HEADER_READERS:
                raise ValueError(f".npy format version {version} is not supported")
            header = _HEADER_READERS[version](member)
        except ValueError as exc:
            raise ArchiveError(f"{key} is not a valid .npy member: {exc}") from exc
        shape, fortran_order, dtype = header
        if dtype.hasobject or dtype.fields is not None:
            raise ArchiveError(f"{key} has dtype {dtype}; only plain numeric dtypes are allowed (no pickle).")
        if dtype.kind not in "biufcU" or (dtype.kind == "U" and key != KIND_KEY):
            raise ArchiveError(f"{key} has dtype {dtype}; expected a numeric dtype (bool, int, uint, float, complex).")
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        header_len = member.tell()
        if header_len + nbytes != info.file_size:
            raise ArchiveError(
                f"{key}: its header declares {nbytes} bytes of data but the member holds "
                f"{info.file_size - header_len}; the archive is truncated or corrupt."
            )
        array = np.empty(count, dtype=dtype)
        view = memoryview(array.view(np.uint8).reshape(-1)) if nbytes else memoryview(b"")
        read = 0
        while read < nbytes:
            got = member.readinto(view[read:])
            if not got:
                raise ArchiveError(f"{key} ended after {read} of {nbytes} bytes; the archive is truncated.")
            read += got
    if fortran_order:
        return array.reshape(shape[::-1]).transpose()
    return array.reshape(shape)


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
    """A weighting must be a finite number > 0; returns it as float."""
    try:
        value = float(weighting)
    except (TypeError, ValueError):
        raise ArchiveError(f"weighting must be a number > 0. Received: weighting={weighting!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ArchiveError(
            f"weighting must be finite and > 0 (usually the local sample count). Received: weighting={weighting!r}"
        )
    return value


def check_finite(layers: Iterable[np.ndarray], names: Sequence[str] | None = None) -> None:
    """Raise naming the first layer that holds NaN or infinity."""
    for index, array in enumerate(layers):
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            name = names[index] if names is not None else layer_key(index)
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            raise ArchiveError(f"{name} holds {bad} non-finite value(s) (NaN or infinity).")


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
    check_weighting(archive.weighting)
    if archive.kind != KIND_FEDERATED_LEARNING:
        raise ArchiveError(
            f"Payload kind {archive.kind!r} is not supported; expected {KIND_FEDERATED_LEARNING!r}."
        )
    if expected is not None:
        problem = spec_mismatch(expected, archive.specs)
        if problem:
            raise ArchiveError(f"Upload does not match this round's layers: {problem}.")
    check_finite(archive.layers)


__all__ = [
    "Archive",
    "LayerSpec",
    "COMPRESSIONS",
    "WEIGHTING_KEY",
    "KIND_KEY",
    "encode",
    "decode",
    "check_weighting",
    "check_finite",
    "spec_mismatch",
    "validate_upload",
    "layer_key",
    "read_layer",
]
