"""FedAvg: equals numpy's weighted mean, accumulates in float64, streams layer by layer."""

from __future__ import annotations

import hashlib

from pathlib import Path

import numpy as np
import pytest

from branchkey_integrations.core import wire
from branchkey_integrations.core.wire import LayerSpec
from branchkey_integrations.core.errors import AggregationError
from branchkey_integrations.server.aggregation import FedAvg, aggregate_files


class MemoryUpload:
    """A LayerReader over in-memory layers that records every read."""

    def __init__(self, weighting: float, layers: list[np.ndarray], log: list[tuple[int, int]], tag: int) -> None:
        self.weighting, self.layers, self.log, self.tag = weighting, layers, log, tag

    def read_layer(self, index: int) -> np.ndarray:
        self.log.append((index, self.tag))
        return self.layers[index]


def specs_of(layers: list[np.ndarray]) -> list[LayerSpec]:
    return [LayerSpec.of(a) for a in layers]


def write_uploads(tmp_path: Path, uploads: list[tuple[list[np.ndarray], float]]) -> list[tuple[Path, float]]:
    paths = []
    for i, (layers, weighting) in enumerate(uploads):
        path = tmp_path / f"u{i}.npz"
        path.write_bytes(wire.encode(layers, weighting))
        paths.append((path, weighting))
    return paths


def test_float32_equals_weighted_mean(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    uploads = [([rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=5).astype(np.float32)], w)
               for w in (1.0, 250.0, 3.5)]
    out = tmp_path / "agg.npz"
    aggregate_files(write_uploads(tmp_path, uploads), specs_of(uploads[0][0]), out)
    result = wire.decode(out)
    assert result.weighting is None and len(result.layers) == 2
    weights = np.array([w for _, w in uploads])
    for index, layer in enumerate(result.layers):
        stacked = np.stack([layers[index].astype(np.float64) for layers, _ in uploads])
        expected = np.average(stacked, axis=0, weights=weights).astype(np.float32)
        assert layer.dtype == np.float32
        np.testing.assert_allclose(layer, expected, rtol=1e-6, atol=1e-7)


def test_accumulates_in_float64_not_in_the_upload_dtype() -> None:
    rng = np.random.default_rng(1)
    log: list[tuple[int, int]] = []
    weights = rng.uniform(1, 100, size=50)
    layers = [rng.normal(size=200).astype(np.float16) for _ in weights]
    uploads = [MemoryUpload(float(w), [x], log, i) for i, (w, x) in enumerate(zip(weights, layers))]
    [layer] = FedAvg().aggregate(uploads, [LayerSpec((200,), np.dtype(np.float16))])
    exact = np.average(np.stack(layers).astype(np.float64), axis=0, weights=weights).astype(np.float16)
    naive = np.zeros(200, np.float16)
    for w, x in zip(weights, layers):
        naive += np.float16(w / weights.sum()) * x
    assert not np.array_equal(naive, exact)  # float16 accumulation would be wrong here
    np.testing.assert_array_equal(layer, exact)


def test_integer_layers_are_rounded_then_cast() -> None:
    log: list[tuple[int, int]] = []
    a = MemoryUpload(1.0, [np.array([0, 1, 10, -3], np.int64), np.array([True, False])], log, 0)
    b = MemoryUpload(2.0, [np.array([1, 2, 11, -4], np.int64), np.array([True, True])], log, 1)
    ints, bools = FedAvg().aggregate([a, b], specs_of(a.layers))
    expected = np.rint((np.array([0, 1, 10, -3]) + 2 * np.array([1, 2, 11, -4])) / 3).astype(np.int64)
    np.testing.assert_array_equal(ints, expected)
    assert ints.dtype == np.int64 and bools.dtype == np.bool_ and bools.tolist() == [True, True]


def test_streams_one_layer_at_a_time() -> None:
    log: list[tuple[int, int]] = []
    layers = [np.ones((2,), np.float32) * k for k in range(3)]
    uploads = [MemoryUpload(1.0, layers, log, tag) for tag in range(4)]
    iterator = FedAvg().aggregate(uploads, specs_of(layers))
    next(iterator)
    assert log == [(0, tag) for tag in range(4)]  # nothing of layer 1 read before layer 0 is done
    list(iterator)
    assert log == [(i, tag) for i in range(3) for tag in range(4)]  # each member read exactly once


def test_aggregate_is_stored_uncompressed_without_weighting(tmp_path: Path) -> None:
    layers = [np.arange(6, dtype=np.float32).reshape(2, 3)]
    out = tmp_path / "agg.npz"
    size, digest = aggregate_files(write_uploads(tmp_path, [(layers, 2.0)]), specs_of(layers), out)
    assert (size, digest) == (out.stat().st_size, hashlib.sha256(out.read_bytes()).hexdigest())
    import zipfile

    with zipfile.ZipFile(out) as zf:
        assert [i.filename for i in zf.infolist()] == ["layer_0.npy"]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
    np.testing.assert_array_equal(wire.decode(out).layers[0], layers[0])


def test_layout_mismatch_is_an_aggregation_error(tmp_path: Path) -> None:
    uploads = [([np.zeros(2, np.float32)], 1.0), ([np.zeros(3, np.float32)], 1.0)]
    with pytest.raises(AggregationError, match="layer_0"):
        aggregate_files(write_uploads(tmp_path, uploads), specs_of(uploads[0][0]), tmp_path / "agg.npz")


def test_no_uploads_is_an_error() -> None:
    with pytest.raises(AggregationError, match="no uploads"):
        list(FedAvg().aggregate([], []))


def test_an_upload_damaged_on_disk_is_an_aggregation_error_for_the_layer_readers(tmp_path: Path) -> None:
    """median, trimmed-mean and the server optimizers open files with NpzLayerReader: a file that is no longer a
    zip archive must reach the round's retry handler as AggregationError (a BadZipFile escaped it)."""
    from branchkey_integrations.server.strategies import Median

    layers = [np.ones(3, np.float32)]
    good, bad = tmp_path / "good.npz", tmp_path / "bad.npz"
    good.write_bytes(wire.encode(layers, 1.0))
    bad.write_bytes(b"not an archive any more")
    with pytest.raises(AggregationError, match="bad.npz is not a readable archive"):
        aggregate_files([(good, 1.0), (bad, 1.0)], specs_of(layers), tmp_path / "out.npz", Median())
