"""An archive encoded while it is sent (core/streamed_archive.py): the same bytes as the whole-archive encoder,
its length known before anything is encoded, error feedback's residual settled once, memory bounded, and an
encoding error reaching the reader."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from branchkey_integrations.core import wire
from branchkey_integrations.core.codec_choice import ErrorFeedback
from branchkey_integrations.core.errors import ArchiveError
from branchkey_integrations.core.float_codecs import FRAME_VALUES, Int8BlockCodec, INT8
from branchkey_integrations.core.payload_kinds import FEDERATED_LEARNING
from branchkey_integrations.core.streamed_archive import StreamedArchive, streams


def _layers(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 0.02, (3, 3, 64, 64)).astype(np.float32),  # several frames, a partial last one
            rng.normal(0, 0.02, FRAME_VALUES).astype(np.float32),  # exactly one frame
            np.asfortranarray(rng.normal(size=(30, 7)).astype(np.float32)),
            np.arange(10, dtype=np.int64),  # travels raw
            rng.normal(size=5),  # float64: raw
            np.zeros(0, np.float32)]


@pytest.mark.parametrize("codec", ["int8", "bf16"])
def test_the_bytes_are_those_of_the_whole_archive_and_the_size_is_known_first(codec: str) -> None:
    layers = _layers()
    controls = [np.full(layer.shape, 0.5, layer.dtype) for layer in layers]
    streamed = StreamedArchive.of_layers(layers, 3.0, codec, controls=controls)
    size = streamed.size
    data = b"".join(streamed.chunks(limit=100_000))
    assert data == wire.prepare(layers, 3.0, compression=codec, controls=controls).getvalue()
    assert len(data) == size
    assert b"".join(streamed.chunks()) == data  # a second reader (a retried upload) gets the same bytes again
    archive = wire.decode(data)
    assert archive.weighting == 3.0 and len(archive.layers) == len(layers)


def test_only_the_codecs_of_a_known_size_that_cannot_fail_stream() -> None:
    assert [name for name in ("int8", "bf16", "fp16", "none", "deflate", "shuffle-zstd") if streams(name)] == [
        "int8", "bf16"]
    with pytest.raises(ValueError, match="Expected a codec in"):
        StreamedArchive.of_layers([np.ones(3, np.float32)], 1.0, "fp16")


def test_error_feedback_keeps_what_the_codec_dropped_once_however_often_the_bytes_are_read() -> None:
    layers = _layers(1)
    feedback = ErrorFeedback()
    sent = feedback.compensate(layers)  # the first round: the layers themselves, in the residual's buffers
    streamed = StreamedArchive(FEDERATED_LEARNING.members(sent, 1.0), INT8, settle=feedback.residual)
    first = b"".join(streamed.chunks())
    again = b"".join(streamed.chunks())
    streamed.wait()
    in_c_order = [np.ascontiguousarray(layer) for layer in layers]  # the residual's buffers are C-ordered
    assert first == again == wire.prepare(in_c_order, 1.0, compression="int8").getvalue()
    for layer, residual in zip(layers, feedback.residual):
        if layer.dtype == np.float32:  # float32 layers: what int8 dropped, exactly, settled once
            np.testing.assert_array_equal(residual, layer - INT8.dequantized(layer))


def test_the_encoder_holds_about_the_encoded_archive_not_a_copy_of_the_model() -> None:
    layers = [np.random.default_rng(2).normal(0, 0.02, n).astype(np.float32) for n in (4_000_000, 2_000_000, 1_000)]
    model = sum(layer.nbytes for layer in layers)
    feedback = ErrorFeedback()
    sent = feedback.compensate(layers)  # the residual is the client's state, not the encoder's
    tracemalloc.start()
    try:
        streamed = StreamedArchive(FEDERATED_LEARNING.members(sent, 1.0), INT8, settle=feedback.residual)
        size = sum(len(chunk) for chunk in streamed.chunks())
        streamed.wait()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size == streamed.size and size < 0.27 * model
    assert peak <= 1.25 * model, f"peak {peak / model:.2f}x the model"
    assert peak <= 0.45 * model, f"peak {peak / model:.2f}x the model"  # today: the int8 archive and one frame


def test_an_encoding_error_reaches_the_reader() -> None:
    class ShortInt8(Int8BlockCodec):  # breaks its size promise: one byte short per frame
        def encode_frame(self, values: np.ndarray) -> bytes:
            return super().encode_frame(values)[:-1]

    streamed = StreamedArchive(FEDERATED_LEARNING.members([np.ones(300, np.float32)], 1.0), ShortInt8())
    with pytest.raises(ArchiveError, match="An int8 frame holds 307 bytes for 300 values"):
        b"".join(streamed.chunks())
    with pytest.raises(ArchiveError):
        streamed.wait()
