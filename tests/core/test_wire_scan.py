"""wire.scan: decode's checks on a file, in one buffer's memory; wire.layer_pieces: a layer piece by piece."""

from __future__ import annotations

import io
import tracemalloc
import zipfile
import zlib
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


def understate(path: Path, name: str, size: int, crc: int) -> None:
    """Make the zip directory (central and local entries) of member ``name`` declare ``size`` and ``crc``."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        local, central = zf.getinfo(name).header_offset, zf.start_dir
    while data[central + 46:central + 46 + len(name)] != name.encode():
        central = data.index(b"PK\x01\x02", central + 1)
    for at in (local + 14, central + 16):  # CRC, compressed size, size
        data[at:at + 4] = crc.to_bytes(4, "little")
        data[at + 8:at + 12] = size.to_bytes(4, "little")
    path.write_bytes(bytes(data))


def test_a_member_that_inflates_past_its_declared_size_is_refused(tmp_path: Path) -> None:
    """The zip directory's sizes are what the limits check, so a member may never inflate past its own:
    zipfile stops there but accepts a stream that goes on (a bomb whose directory lies)."""
    array = np.zeros(1000, np.float32)
    member = wire.encode([array], 1.0, compression="none")  # its members, as .npy bytes, are copied below
    with zipfile.ZipFile(io.BytesIO(member)) as zf:
        npy = zf.read("layer_0.npy")
        weighting = zf.read("weighting.npy")
    path = tmp_path / "liar.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("weighting.npy", weighting)
        zf.writestr("layer_0.npy", npy + bytes(8 << 20))  # 8 MiB more than the header and the directory say
    understate(path, "layer_0.npy", len(npy), zlib.crc32(npy))
    with pytest.raises(ArchiveError, match="layer_0 inflates past the 4128 bytes its zip entry declares"):
        wire.scan(path)
    with pytest.raises(ArchiveError, match="inflates past"):
        wire.decode(path)
    with pytest.raises(ArchiveError, match="inflates past"):
        wire.decode(path.read_bytes())


def test_a_weighting_declaring_more_than_one_value_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "heavy.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("weighting.npy", "w") as member:  # 64 MiB of zeros, ~64 KiB on disk: never inflated
            member.write(b"\0" * 1024)  # not even a .npy header: only the directory is read
            for _ in range(64):
                member.write(bytes(1 << 20))
        zf.writestr("layer_0.npy", b"")
    for read in (wire.scan, wire.decode):
        with pytest.raises(ArchiveError, match="'weighting.npy' declares 67109888 bytes; it holds one value"):
            read(path)


@pytest.mark.parametrize("compression", ["none", "deflate"])
def test_a_layer_is_read_into_its_array_alone(tmp_path: Path, compression: str) -> None:
    """Decoding holds the layer's array and a piece at a time, not the inflated member beside it."""
    path = tmp_path / "big.npz"
    layer = np.zeros(16 << 20, np.float32)  # 64 MiB
    wire.encode([layer], 1.0, path, compression=compression)
    tracemalloc.start()
    try:
        decoded = wire.decode(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert decoded.layers[0].shape == layer.shape and not decoded.layers[0].any()
    assert peak < layer.nbytes + (4 << 20), f"decoding a {layer.nbytes >> 20} MiB layer peaked at {peak >> 20} MiB"


@pytest.mark.parametrize("compression", ["none", "deflate"])
def test_a_local_header_naming_another_member_than_the_directory_is_refused(tmp_path: Path, compression: str) -> None:
    """The fuzzer's find: 'weighting.npy' in the central directory, 'veighting.npy' in its local header. zipfile
    refuses that; wire's own member reader accepted it, so two readers could read one upload two ways."""
    content = bytearray(wire.encode(layers(), 1.0, compression=compression))
    name_at = content.index(b"PK\x03\x04") + 30  # the first member's name, in its local header
    assert bytes(content[name_at:name_at + 9]) in (b"weighting", b"layer_0.n")
    content[name_at] ^= 0x20  # one letter's case, in the local header only
    path = tmp_path / "u.npz"
    path.write_bytes(bytes(content))
    for read in (lambda: wire.scan(path), lambda: wire.decode(bytes(content))):
        with pytest.raises(ArchiveError, match="its local header names"):
            read()


def test_a_npy_header_numpy_cannot_tokenize_is_an_archive_error(tmp_path: Path) -> None:
    """numpy raises tokenize.TokenError (not ValueError) for an unterminated header dict: that was a 500."""
    text = b"{'descr': '<f4', 'fortran_order': False, 'shape': (2, \n"
    header = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("weighting.npy", _npy(np.array([1.0])))
        zf.writestr("layer_0.npy", header + b"\x00" * 8)
    path = tmp_path / "u.npz"
    path.write_bytes(buffer.getvalue())
    for read in (lambda: wire.scan(path), lambda: wire.decode(buffer.getvalue())):
        with pytest.raises(ArchiveError, match="layer_0 is not a valid .npy member"):
            read()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()
