"""Delta uploads on the server: the check of the base they name, and the full upload rebuilt from the difference.

A delta upload (:mod:`~branchkey_integrations.core.delta`) names its base in part ``data`` (``delta_base``). The
base must be the branch's latest aggregate: any other id (an older aggregate, another branch's, an upload, an
unknown one) is refused with 409 (:class:`~branchkey_integrations.core.errors.DeltaBaseError`) naming both ids,
before the body is decoded, and the leaf sends its full weights instead. A delta whose base is right is rebuilt
into a full upload as it is checked: each layer streams through one piece of the upload and the same piece of
the base (read from its stored file), the piece's values are reconstructed (XOR back, or base + difference),
checked finite and written as a stored member. Every reader downstream (the running FedAvg, the robust
strategies, SCAFFOLD's controls, a round of one upload copied as it is) then sees full weights, bit for bit
what the leaf held, and the server holds one piece of each at a time, never a whole upload.

Example:
    >>> import tempfile, pathlib
    >>> from ..core.delta import xor_bits
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> base, weights = np.full(3, 0.5, np.float32), np.array([0.5, 0.25, -1.0], np.float32)
    >>> _ = wire.encode([base], None, folder / "base.npz")
    >>> _ = wire.encode([xor_bits(weights, base)], 2.0, folder / "upload.npz")
    >>> upload = ReceivedUpload(folder / "upload.npz", 0, b"", delta_base="agg-1")
    >>> archive = wire.scan(folder / "upload.npz")
    >>> upload, archive = rebuild_upload(upload, folder / "base.npz", archive)
    >>> wire.decode(upload.path).layers[0].tolist(), archive.specs[0].dtype.name
    ([0.5, 0.25, -1.0], 'float32')
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..core import wire
from ..core.delta import DELTA_BASE_KEY, is_delta_layer, reconstruct
from ..core.errors import ArchiveError, DeltaBaseError, InvalidValueError
from ..core.protocol import KIND_FEDERATED_LEARNING, is_file_id
from ..core.wire import LayerSpec
from .aggregation import FOLD_PIECE_BYTES, file_sha256
from .store import Store
from .uploads import ReceivedUpload

_F32, _U32 = np.dtype("<f4"), np.dtype("<u4")
_ZERO = bytes(64)  # what a rebuilt layer's stand-in views (strides 0), as wire.scan's do


def base_file(store: Store, branch_id: str, base_id: str) -> Path:
    """The file of ``base_id``, when it is the branch's latest aggregate.

    Raises:
        DeltaBaseError: it is not (stale, unknown, another branch's, or removed), naming both ids.
    """
    latest = store.latest_aggregate(branch_id)
    latest_id = latest["aggregation_id"] if latest else None
    record = store.get_file(base_id) if is_file_id(base_id) else None
    fix = (f"Send the full weights (without {DELTA_BASE_KEY})" + (f", or the difference from {latest_id}" if latest_id
                                                                   else "") + ".")
    if record is None or record.kind != "aggregate" or record.branch_id != branch_id:
        raise DeltaBaseError(f"Delta upload refused: its base {base_id[:80]!r} is not an aggregate of branch {branch_id} "
                             f"(the branch's latest aggregate is {latest_id}). {fix}")
    if base_id != latest_id or record.removed_at:
        raise DeltaBaseError(f"Delta upload refused: its base is aggregate {base_id}, but the branch's latest aggregate "
                             f"is {latest_id}: the leaf's base is stale. {fix}")
    return store.file_path(record)


def rebuild_upload(upload: ReceivedUpload, base: Path, archive: wire.Archive,
                   piece_bytes: int = FOLD_PIECE_BYTES) -> tuple[ReceivedUpload, wire.Archive]:
    """The delta upload at ``upload.path`` (checked by :func:`wire.scan` into ``archive``) rewritten in place as
    the full upload it stands for, with its new size and SHA-256, and its archive with the full layers' specs.

    Raises:
        InvalidValueError: it is not a model, its layers do not fit the base's, or a rebuilt value is not finite.
    """
    if archive.kind != KIND_FEDERATED_LEARNING:
        raise InvalidValueError(f"Upload rejected: a {archive.kind} upload cannot be a delta (it names "
                                f"{DELTA_BASE_KEY}); only a model's layers are sent as a difference.")
    rebuilt = upload.path.with_name(upload.path.name + ".full")
    try:
        with zipfile.ZipFile(upload.path) as delta, zipfile.ZipFile(base) as held, open(rebuilt, "w+b") as handle:
            writer = wire.ArchiveWriter(handle)
            if archive.weighting is not None:  # none: refused by the upload check that follows, as any upload
                writer.add(wire.WEIGHTING_KEY, np.array([archive.weighting], np.float64))
            specs = _write_layers(writer, delta, held, archive.specs, piece_bytes)
            for index in range(len(archive.controls)):  # SCAFFOLD's control update: one layer's size, as sent
                control = wire.read_control(delta, index)
                if control is not None:  # the scan counted it
                    writer.add(wire.control_key(index), control)
            writer.close()
        os.replace(rebuilt, upload.path)
    except ArchiveError as exc:
        raise InvalidValueError(f"Upload rejected: {exc}") from exc
    finally:
        rebuilt.unlink(missing_ok=True)
    stand_ins = [np.ndarray(spec.shape, spec.dtype, buffer=_ZERO, strides=(0,) * len(spec.shape)) for spec in specs]
    full = dataclasses.replace(archive, layers=stand_ins, scanned=True)
    return dataclasses.replace(upload, size=upload.path.stat().st_size,
                               sha256=bytes.fromhex(file_sha256(upload.path))), full


def _write_layers(writer: wire.ArchiveWriter, delta: zipfile.ZipFile, held: zipfile.ZipFile,
                  specs: Sequence[LayerSpec], piece_bytes: int) -> list[LayerSpec]:
    """Write each full layer; return their specs (the base's)."""
    base_count = sum(1 for name in held.namelist() if wire.LAYER_PATTERN.fullmatch(name.removesuffix(".npy")))
    if len(specs) != base_count:
        raise ArchiveError(f"The delta upload holds {len(specs)} layers; its base holds {base_count}.")
    out = []
    for index, spec in enumerate(specs):
        key = wire.layer_key(index)
        base_spec, base_fortran, base_pieces = wire.layer_pieces(held, index, piece_bytes)
        wanted = (_U32, _F32) if is_delta_layer(base_spec.dtype) else (base_spec.dtype,)
        if spec.shape != base_spec.shape or spec.dtype not in wanted:
            raise ArchiveError(f"{key} is {spec}; as a difference from its base ({base_spec}) it must have the base's "
                               f"shape and dtype {' or '.join(str(d) for d in wanted)}.")
        _, fortran, pieces = wire.layer_pieces(delta, index, piece_bytes)
        if not is_delta_layer(base_spec.dtype):  # travels whole
            _close(base_pieces)
            writer.add_pieces(key, spec, pieces, fortran_order=fortran)
        elif fortran or base_fortran:  # rare (a transposed layer): whole layers, numpy minds the order
            _close(pieces)
            _close(base_pieces)
            writer.add(key, _finite(reconstruct(wire.read_layer(delta, index), wire.read_layer(held, index)), key))
        else:
            writer.add_pieces(key, base_spec, _rebuilt(pieces, base_pieces, key, piece_bytes))
        out.append(base_spec)
    return out


def _rebuilt(pieces: Iterator[np.ndarray], base_pieces: Iterator[np.ndarray], key: str,
             piece_bytes: int) -> Iterator[np.ndarray]:
    """The full values, piece by piece (both streams come in pieces of the same count: 4-byte values)."""
    buffer = np.empty(max(1, piece_bytes // 4), _F32)
    for piece, base in zip(pieces, base_pieces):
        if piece.size != base.size:
            raise ArchiveError(f"{key}: a piece of {piece.size} values met one of {base.size} in the base.")
        yield _finite(reconstruct(piece, base, out=buffer[:piece.size]), key)
    for rest in (pieces, base_pieces):  # both ended: this runs their CRC checks
        if next(rest, None) is not None:
            raise ArchiveError(f"{key} holds more values than its base.")


def _close(pieces: Iterator[np.ndarray]) -> None:
    """Stop a layer's stream unread (a generator: its reader is released)."""
    getattr(pieces, "close", lambda: None)()


def _finite(values: np.ndarray, key: str) -> np.ndarray:
    if not wire.all_finite(values):
        raise ArchiveError(f"{key}, rebuilt from its base, holds non-finite value(s) (NaN or infinity).")
    return values


__all__ = ["base_file", "rebuild_upload"]
