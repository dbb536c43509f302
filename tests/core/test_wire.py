"""The NPZ archive: compatibility with numpy's own format, numeric order, and refusal of hostile input."""

import io
import zipfile

import numpy as np
import pytest

from branchkey_integrations.core import tensor_codecs as codecs, npy, wire, zipformat
from branchkey_integrations.core.errors import ArchiveError, ArchiveTooLargeError, WeightingError


def layers(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((i % 3 + 1, 2)).astype(np.float32) for i in range(n)]


@pytest.mark.parametrize("compression", ["deflate", "none"])
def test_round_trip_is_bit_exact_and_loads_with_numpy(compression):
    original = layers() + [np.arange(6, dtype=np.int64).reshape(2, 3), np.asfortranarray(np.eye(3)),
                           np.array([np.nan, np.inf], dtype=np.float16), np.zeros((0, 4), np.float32)]
    data = wire.encode(original, 7.0, compression=compression)
    decoded = wire.decode(data)
    assert decoded.weighting == 7.0
    assert len(decoded.layers) == len(original)
    for want, got in zip(original, decoded.layers):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert want.tobytes() == got.tobytes()
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        assert npz["weighting"].dtype == np.float64 and npz["weighting"].shape == (1,)
        np.testing.assert_array_equal(npz["layer_10"], original[10])


def test_reads_what_the_official_client_writes():
    buffer = io.BytesIO()
    original = layers(11)
    np.savez_compressed(buffer, weighting=np.array([3.0]), **{f"layer_{i}": a for i, a in enumerate(original)})
    decoded = wire.decode(buffer.getvalue())
    assert decoded.weighting == 3.0
    # numeric order: layer_10 is the eleventh layer, not the third
    np.testing.assert_array_equal(decoded.layers[10], original[10])
    np.testing.assert_array_equal(decoded.layers[2], original[2])


def test_aggregate_without_weighting_and_payload_kind_key():
    buffer = io.BytesIO()
    np.savez(buffer, layer_0=np.ones(2), __bk_payload_kind__=np.array("federated_learning"))
    decoded = wire.decode(buffer.getvalue())
    assert decoded.weighting is None and decoded.kind == "federated_learning"


def _npz(**members):
    buffer = io.BytesIO()
    np.savez(buffer, **members)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"not a zip at all", "Not a valid NPZ"),
        (_npz(weighting=np.array([1.0]), layer_0=np.ones(1), layer_2=np.ones(1)), "missing: layer_1"),
        (_npz(weighting=np.array([1.0])), "no layers"),
        (_npz(weighting=np.array([1.0]), layer_0=np.ones(1), extra=np.ones(1)), "Unexpected member 'extra.npy'"),
        (_npz(weighting=np.array([1.0, 2.0]), layer_0=np.ones(1)), "single number"),
        (_npz(weighting=np.array([1.0]), layer_01=np.ones(1)), "Unexpected member"),
        (_npz(weighting=np.array([1.0]), layer_0=np.array(["a", "b"])), "numeric dtype"),
    ],
)
def test_malformed_archives_are_refused_with_a_reason(payload, message):
    with pytest.raises(ArchiveError, match=message):
        wire.decode(payload)


def test_object_arrays_are_refused_without_unpickling():
    buffer = io.BytesIO()
    np.savez(buffer, weighting=np.array([1.0]), layer_0=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ArchiveError, match="pickle"):
        wire.decode(buffer.getvalue())


def test_header_claiming_more_data_than_the_member_holds_is_refused_before_allocation():
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})
    forged = header.getvalue() + b"\0" * 16
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("weighting.npy", _member(np.array([1.0])))
        zf.writestr("layer_0.npy", forged)
    with pytest.raises(ArchiveError, match="truncated or corrupt"):
        wire.decode(archive.getvalue())


@pytest.mark.parametrize("pad", [0, 6000])  # 6000: a header longer than the first read of a stored member
def test_a_stored_members_header_of_any_length_is_read_in_place(tmp_path, pad):
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }" + " " * pad + "\n"
    member = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + array.tobytes()
    path = tmp_path / "long.npz"
    with zipfile.ZipFile(path, "w") as zf:  # stored: read with pread, from the file
        zf.writestr("weighting.npy", _member(np.array([2.0])))
        zf.writestr("layer_0.npy", member)
    with zipfile.ZipFile(path) as zf:
        spec, fortran_order, pieces = wire.layer_pieces(zf, 0, 1 << 20)
        assert spec == wire.LayerSpec((3, 4), np.dtype(np.float32)) and not fortran_order
        np.testing.assert_array_equal(np.concatenate(list(pieces)), array.reshape(-1))
    np.testing.assert_array_equal(wire.decode(path).layers[0], array)


@pytest.mark.parametrize("array", [np.zeros((3, 4), np.float32), np.zeros((), np.float64), np.zeros((0, 4), np.float16),
                                   np.asfortranarray(np.ones((2, 3))), np.zeros(3, ">i4"), np.zeros(2, bool),
                                   np.zeros((64, 3, 7, 7), np.complex64)], ids=str)
def test_numpys_own_headers_are_read_as_numpy_reads_them(array):
    member = io.BytesIO(_member(array))
    version = np.lib.format.read_magic(member)
    fast = npy.read_plain_header(member, version)
    member.seek(0)
    np.lib.format.read_magic(member)
    assert fast == np.lib.format.read_array_header_1_0(member)


@pytest.mark.parametrize("header", [
    "{'shape': (3, 4), 'fortran_order': False, 'descr': '<f4'}",  # valid, another key order: numpy's reader
    "{'descr': '<f4',  'fortran_order': False, 'shape': (3, 4), }",  # valid, an extra space
])
def test_other_valid_headers_still_decode(header):
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    text = header + " " * (63 - (len(header) + 10) % 64) + "\n"
    member = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode() + array.tobytes()
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("weighting.npy", _member(np.array([1.0])))
        zf.writestr("layer_0.npy", member)
    np.testing.assert_array_equal(wire.decode(archive.getvalue()).layers[0], array)


def _member(array):
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array)
    return buffer.getvalue()


def test_limits_stop_zip_bombs_and_member_floods():
    bomb = wire.encode([np.zeros(10_000_000, np.uint8)], 1.0)
    assert len(bomb) < 100_000  # compresses extremely well
    with pytest.raises(ArchiveTooLargeError, match="limit is 1000000 bytes"):
        wire.decode(bomb, max_total_bytes=1_000_000)
    many = wire.encode([np.zeros(1)] * 50, 1.0)
    with pytest.raises(ArchiveTooLargeError, match="members"):
        wire.decode(many, max_members=10)


@pytest.mark.parametrize("weighting", [0, -1.0, float("nan"), float("inf"), "ten", 5e-324, 1e300])
def test_bad_weighting_is_refused(weighting):
    with pytest.raises(WeightingError, match="weighting") as refused:
        wire.check_weighting(weighting)
    assert not isinstance(refused.value, ArchiveError)  # no archive exists yet: not an archive error


def test_validate_upload_names_the_mismatching_layer():
    archive = wire.decode(wire.encode([np.ones((2, 2), np.float32), np.ones(3, np.float32)], 1.0))
    expected = [wire.LayerSpec((2, 2), np.dtype(np.float32)), wire.LayerSpec((4,), np.dtype(np.float32))]
    with pytest.raises(ArchiveError, match=r"layer_1: expected float32\[4\], received float32\[3\]"):
        wire.validate_upload(archive, expected)
    with pytest.raises(ArchiveError, match="expected 1 layers, received 2"):
        wire.validate_upload(archive, expected[:1])


def test_validate_upload_refuses_non_finite_values_by_layer():
    archive = wire.decode(wire.encode([np.ones(2), np.array([1.0, np.nan])], 1.0))
    with pytest.raises(ArchiveError, match="layer_1 holds 1 non-finite"):
        wire.validate_upload(archive)


def test_corrupt_deflate_stream_is_an_archive_error_not_a_zlib_error():
    data = bytearray(wire.encode([np.random.default_rng(0).standard_normal(5000)], 1.0))
    middle = len(data) // 2
    data[middle:middle + 64] = b"\x00" * 64  # damage the compressed bytes, not the zip directory
    with pytest.raises(ArchiveError):
        wire.decode(bytes(data))


def test_read_layer_reads_one_member_with_the_same_checks():
    payload = wire.encode([np.arange(3), np.ones((2, 2), np.float32)], 1.0)
    with zipfile.ZipFile(io.BytesIO(payload)) as zf:
        np.testing.assert_array_equal(wire.read_layer(zf, 1), np.ones((2, 2), np.float32))
        with pytest.raises(ArchiveError, match="no member layer_2"):
            wire.read_layer(zf, 2)


# -- the fast encoder: numpy compatibility, bit-exactness, zero-copy decode, zip64 by structure --------------

ODD_ARRAYS = [
    pytest.param(np.float32(3.5).reshape(()), id="0-d"),
    pytest.param(np.zeros((0, 3), np.float64), id="empty"),
    pytest.param(np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)), id="fortran"),
    pytest.param(np.arange(20, dtype=np.int32).reshape(4, 5)[:, ::2], id="strided"),
    pytest.param(np.array([True, False, True]), id="bool"),
    pytest.param(np.arange(5, dtype=np.uint8), id="uint8"),
    pytest.param(np.array([1 + 2j, np.nan], np.complex128), id="complex"),
    pytest.param(np.array([1.5, -2.0], np.float16), id="float16"),
    pytest.param(np.arange(6, dtype=">f8").reshape(2, 3), id="big-endian"),
]


@pytest.mark.parametrize("array", ODD_ARRAYS)
@pytest.mark.parametrize("compression, level", [("none", None), ("deflate", None), ("deflate", 9)])
def test_every_layout_round_trips_bit_exactly_and_loads_with_numpy(array, compression, level):
    data = wire.encode([array, layers(1)[0]], 2.0, compression=compression, compresslevel=level)
    for source in (data, bytearray(data), io.BytesIO(data)):
        decoded = wire.decode(source)
        got = decoded.layers[0]
        assert got.dtype == array.dtype and got.shape == array.shape and got.tobytes() == array.tobytes()
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        assert npz["layer_0"].dtype == array.dtype and npz["layer_0"].tobytes() == array.tobytes()


def test_archives_match_what_numpy_would_write_member_for_member():
    original = layers(3)
    buffer = io.BytesIO()
    np.savez(buffer, weighting=np.array([4.0]), **{f"layer_{i}": a for i, a in enumerate(original)})
    with zipfile.ZipFile(buffer) as theirs, zipfile.ZipFile(io.BytesIO(wire.encode(original, 4.0))) as ours:
        assert theirs.namelist() == ours.namelist()
        for name in theirs.namelist():
            assert theirs.read(name) == ours.read(name)  # the same .npy bytes, header included


def test_stored_layers_decode_as_aligned_writable_views_of_the_download_buffer():
    original = layers(5)
    buffer = bytearray(wire.encode(original, 1.0, compression="none"))
    decoded = wire.decode(buffer)
    base = np.frombuffer(buffer, np.uint8).ctypes.data
    for array in decoded.layers:
        assert not array.flags.owndata and array.flags.aligned and array.flags.writeable
        assert (array.ctypes.data - base) % 64 == 0
    decoded.layers[0][0, 0] = 42.0  # a view: writes go to the buffer, nothing else is shared
    assert original[0][0, 0] != 42.0


def test_a_flipped_byte_in_a_stored_member_fails_the_crc_on_every_path(tmp_path):
    data = bytearray(wire.encode(layers(2), 1.0, compression="none"))
    data[len(data) // 3] ^= 0xFF
    path = tmp_path / "bad.npz"
    path.write_bytes(data)
    for source in (data, bytes(data), path):
        with pytest.raises(ArchiveError):
            wire.decode(source)


def test_zip64_records_are_written_where_sizes_and_offsets_need_them(monkeypatch):
    monkeypatch.setattr(zipformat, "_ZIP64_LIMIT", 100)  # every member and the directory now "exceed 2 GiB"
    original = layers(3) + [np.zeros(0, np.float32)]
    for compression in ("none", "deflate"):
        data = wire.encode(original, 5.0, compression=compression)
        assert b"PK\x06\x06" in data and b"PK\x06\x07" in data  # zip64 end record and locator
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            assert zf.testzip() is None
            assert [info.extract_version for info in zf.infolist()][-2] == 45
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            np.testing.assert_array_equal(npz["layer_2"], original[2])
        assert [a.tobytes() for a in wire.decode(bytearray(data)).layers] == [a.tobytes() for a in original]


def test_large_members_are_deflated_in_pieces_that_form_one_valid_stream(monkeypatch):
    monkeypatch.setattr(codecs, "PIECE_BYTES", 1000)  # many sync-flushed pieces per member
    original = [np.random.default_rng(1).standard_normal(5000).astype(np.float32)]
    data = wire.encode(original, 1.0, compression="deflate")
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.getinfo("layer_0.npy").compress_type == zipfile.ZIP_DEFLATED and zf.testzip() is None
    np.testing.assert_array_equal(wire.decode(data).layers[0], original[0])


def test_prepared_archive_is_re_readable_and_its_digest_is_of_its_bytes():
    archive = wire.prepare(layers(4), 3.0, compression="none")
    first, second = b"".join(archive.chunks(limit=7)), archive.getvalue()
    assert first == second and len(first) == archive.size
    import hashlib

    assert archive.sha256() == hashlib.sha256(first).digest()


def test_archive_writer_streams_members_that_decode_like_encode():
    original = layers(3)
    handle = io.BytesIO()
    with wire.ArchiveWriter(handle) as writer:
        for index, array in enumerate(original):
            writer.add(wire.layer_key(index), array)
    assert handle.getvalue() == wire.encode(original, compression="none")


def test_a_member_written_in_pieces_is_the_member_written_whole():
    original = [*layers(3), np.zeros((0, 2), np.float16), np.asfortranarray(np.arange(12.0).reshape(3, 4))]
    handle = io.BytesIO()
    with wire.ArchiveWriter(handle) as writer:
        for index, array in enumerate(original):
            flat = np.ascontiguousarray(array).reshape(-1)
            pieces = (flat[i:i + 5] for i in range(0, flat.size, 5))
            writer.add_pieces(wire.layer_key(index), wire.LayerSpec.of(array), pieces)
    expected = wire.encode([np.ascontiguousarray(a) for a in original], compression="none")
    assert handle.getvalue() == expected  # the CRCs rewritten in place are the ones encode computes
    with pytest.raises(ArchiveError, match=r"layer_0: 8 bytes of values written; float32\[3\] holds 12"):
        wire.ArchiveWriter(io.BytesIO()).add_pieces("layer_0", wire.LayerSpec((3,), np.dtype(np.float32)),
                                                     [np.zeros(2, np.float32)])


@pytest.mark.parametrize("bad", [{"compression": "zstd"}, {"compression": "deflate", "compresslevel": 12}])
def test_bad_compression_options_are_refused_naming_the_value(bad):
    with pytest.raises(ValueError, match="Received"):
        wire.encode(layers(1), 1.0, **bad)


def test_non_numeric_dtypes_are_refused_when_encoding():
    with pytest.raises(ArchiveError, match="numeric"):
        wire.encode([np.array(["a"])], 1.0)


def test_finite_check_finds_nan_and_inf_but_accepts_sums_that_overflow():
    big = np.full(10, 60000, np.float16)  # the float16 sum overflows; every value is finite
    wire.check_finite([big])
    for bad in (np.nan, np.inf):
        array = np.ones(5, np.float32)
        array[3] = bad
        with pytest.raises(ArchiveError, match="1 non-finite"):
            wire.check_finite([array])
        assert not wire.all_finite(array) and not wire.all_finite(array.astype(np.complex64))
    assert wire.all_finite(big) and wire.all_finite(np.arange(3)) and wire.all_finite(np.zeros(0, np.float32))
