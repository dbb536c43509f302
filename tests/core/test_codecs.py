"""Codecs behind one interface: a codec registered from outside the package round-trips an archive, its
name travels per member, and the reader's limits hold for it as for deflate."""

from __future__ import annotations

import hashlib
import io
import struct
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from branchkey_integrations.core import tensor_codecs as codecs, wire
from branchkey_integrations.core.errors import ArchiveError

from ..toy_codec import Bz2Codec, LiarCodec


@pytest.fixture
def bz2_codec() -> Iterator[Bz2Codec]:
    codec = codecs.register_codec(Bz2Codec())
    yield codec
    codecs.unregister_codec(codec.name)


def model() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.standard_normal((40, 30)).astype(np.float32), np.asfortranarray(rng.standard_normal((5, 6))),
            np.arange(600_000, dtype=np.float32)]  # over 1 MiB decoded: handed out in pieces


def test_a_registered_codec_round_trips_an_archive_and_travels_as_a_marked_member(bz2_codec, tmp_path: Path) -> None:
    layers = model()
    data = wire.encode(layers, 4.0, compression=bz2_codec.name)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
    assert {info.compress_type for info in infos} == {codecs.MARKED_METHOD}
    name = bz2_codec.name.encode()
    assert all(info.extra == struct.pack("<HH", codecs.MARKER_EXTRA_ID, len(name)) + name for info in infos)
    decoded = wire.decode(data)
    assert decoded.weighting == 4.0
    for got, want in zip(decoded.layers, layers):
        np.testing.assert_array_equal(got, want)
    path = tmp_path / "upload.npz"
    path.write_bytes(data)
    scanned = wire.scan(path, piece_bytes=1 << 16)
    assert scanned.specs == [wire.LayerSpec.of(layer) for layer in layers]
    with zipfile.ZipFile(path) as zf:
        spec, _, pieces = wire.layer_pieces(zf, 2, 1 << 16)
        np.testing.assert_array_equal(np.concatenate([piece.copy() for piece in pieces]), layers[2])


def test_stored_and_deflate_archives_carry_no_marker_and_stored_bytes_are_unchanged() -> None:
    layers = [np.arange(12, dtype=np.float32).reshape(3, 4), np.ones(5, np.int64)]
    stored = wire.encode(layers, 2.0, compression="none")
    # the same bytes as before codecs became objects (sha256 of this archive at dc1570f)
    assert hashlib.sha256(stored).hexdigest() == STORED_SHA256
    for data, method in ((stored, zipfile.ZIP_STORED), (wire.encode(layers, 2.0), zipfile.ZIP_DEFLATED)):
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            assert {info.compress_type for info in zf.infolist()} == {method}
            assert not any(struct.pack("<H", codecs.MARKER_EXTRA_ID) in info.extra for info in zf.infolist())
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:  # what the official clients read
            np.testing.assert_array_equal(npz["layer_0"], layers[0])


STORED_SHA256 = "975fe32e0d69c5f66b43cbc8b2847e90bfc20ca0734e895673f5572f9d8dd851"


def test_a_codec_this_reader_does_not_know_is_refused_by_name(bz2_codec) -> None:
    data = wire.encode(model()[:1], 1.0, compression=bz2_codec.name)
    codecs.unregister_codec(bz2_codec.name)
    try:
        with pytest.raises(ArchiveError, match="encoded with codec 'bz2-toy', which this reader does not know"):
            wire.decode(data)
    finally:
        codecs.register_codec(bz2_codec)
    with pytest.raises(ValueError, match="Expected compression in .*'bz2-toy'.*Received: compression='zstd'"):
        wire.encode(model()[:1], 1.0, compression="zstd")


def test_a_registered_codec_is_held_to_the_size_its_zip_entry_declares(tmp_path: Path) -> None:
    liar = codecs.register_codec(LiarCodec())
    try:
        data = wire.encode([np.ones(10, np.float32)], 1.0, compression=liar.name)
        with pytest.raises(ArchiveError, match="weighting inflates past the 136 bytes its zip entry declares"):
            wire.decode(data)
        path = tmp_path / "liar.npz"
        path.write_bytes(data)
        with pytest.raises(ArchiveError, match="inflates past"):
            wire.scan(path)
    finally:
        codecs.unregister_codec(liar.name)


def test_codec_names_are_checked_when_registered(bz2_codec) -> None:
    class Other(Bz2Codec):
        pass

    with pytest.raises(ValueError, match="A codec named 'bz2-toy' is already registered"):
        codecs.register_codec(Other())
    Other.name = "bad name\n"
    with pytest.raises(ValueError, match="Received: name='bad name\\\\n'"):
        codecs.register_codec(Other())
    with pytest.raises(ValueError, match="built in"):
        codecs.unregister_codec("deflate")
    assert "bz2-toy" in codecs.codec_names() and codecs.codec_named("none") is codecs.STORED


def test_the_contributing_guides_codec_example_runs_as_written(tmp_path: Path) -> None:
    text = (Path(__file__).parents[2] / "docs" / "contributing.md").read_text(encoding="utf-8")
    start = "```python\nfrom branchkey_integrations.core.tensor_codecs import Codec"
    block = text[text.index(start) + len("```python\n"):]
    block = block[:block.index("```")]
    exec(compile(block, "docs/contributing.md", "exec"), {})  # registers "bz2"
    try:
        layers = model()[:2]
        data = wire.encode(layers, 2.0, compression="bz2")
        for got, want in zip(wire.decode(data).layers, layers):
            np.testing.assert_array_equal(got, want)
    finally:
        codecs.unregister_codec("bz2")
