"""wire.scan: decode's checks on a file, in one buffer's memory; wire.layer_pieces: a layer piece by piece."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from branchkey_integrations.core import wire
from branchkey_integrations.core.errors import ArchiveError, ArchiveTooLargeError


def layers() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(size=(300, 70)).astype(np.float32), np.arange(5, dtype=np.int64), np.float16([1.5, 2.5])]


@pytest.mark.parametrize("compression", ["none", "deflate"])
def test_scan_sees_what_decode_sees_without_holding_the_values(tmp_path: Path, compression: str) -> None:
    path = tmp_path / "u.npz"
    wire.encode(layers(), 12.0, path, compression=compression)
    scanned, decoded = wire.scan(path, piece_bytes=4096), wire.decode(path)
    assert scanned.scanned and scanned.weighting == decoded.weighting == 12.0
    assert scanned.specs == decoded.specs
    assert all(layer.strides == (0,) * layer.ndim for layer in scanned.layers)  # zero-byte stand-ins
    wire.validate_upload(scanned, decoded.specs)


@pytest.mark.parametrize("compression", ["none", "deflate"])
def test_scan_refuses_a_non_finite_value_in_any_piece(tmp_path: Path, compression: str) -> None:
    bad = layers()
    bad[0][299, 69] = np.nan  # in the last piece
    path = tmp_path / "u.npz"
    wire.encode(bad, 1.0, path, compression=compression)
    with pytest.raises(ArchiveError, match="layer_0 holds .*non-finite"):
        wire.scan(path, piece_bytes=4096)


def test_scan_refuses_a_corrupt_member(tmp_path: Path) -> None:
    path = tmp_path / "u.npz"
    wire.encode(layers(), 1.0, path, compression="none")
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("layer_0.npy")
    data[info.header_offset + 200] ^= 0xFF  # a byte of layer_0's values
    path.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="layer_0 fails its CRC check"):
        wire.scan(path, piece_bytes=4096)


def test_scan_refuses_a_bomb_before_inflating_it(tmp_path: Path) -> None:
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("weighting.npy", b"x")  # never read: the ratio check comes first
        zf.writestr("layer_0.npy", bytes(wire.COMPRESSION_RATIO_FLOOR_BYTES + 1))
    with pytest.raises(ArchiveTooLargeError, match="'layer_0.npy' alone inflates"):
        wire.scan(path, max_compression_ratio=100)
    with pytest.raises(ArchiveTooLargeError, match="compression bomb"):
        wire.decode(path.read_bytes(), max_compression_ratio=100)


def test_layer_pieces_come_in_file_order_in_one_reused_buffer(tmp_path: Path) -> None:
    array = np.arange(10_000, dtype=np.float32).reshape(100, 100)
    path = tmp_path / "u.npz"
    wire.encode([array], 1.0, path, compression="none")
    with zipfile.ZipFile(path) as zf:
        spec, fortran_order, pieces = wire.layer_pieces(zf, 0, 4096)
        collected = [piece.copy() for piece in pieces]
    assert spec == wire.LayerSpec((100, 100), np.dtype(np.float32)) and not fortran_order
    assert len(collected) == 10 and all(piece.size == 1024 for piece in collected[:-1])
    np.testing.assert_array_equal(np.concatenate(collected), array.reshape(-1))
