"""Aggregation strategies: turn the uploads of a round into one aggregate archive.

Why streaming: a round can hold many leaves of a model of hundreds of MB. Strategies read
one layer of every upload at a time (``LayerReader.read_layer``), so memory stays
O(model size) (the finished aggregate plus one layer per leaf), not O(leaves x model).

Why float64: summing float32 or float16 parameters of many leaves in their own precision
loses digits; accumulating in float64 (complex128 for complex layers) and casting back to
the uploads' dtype once keeps the mean exact to the dtype's precision. Integer layers are
rounded half to even (``np.rint``) before the cast.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import math
import os
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, Iterator, Protocol, Sequence

import numpy as np

from ..core import wire
from ..core.errors import AggregationError, ArchiveError
from ..core.wire import LayerSpec


class LayerReader(Protocol):
    """One upload as a strategy sees it: a weighting and layers read on demand."""

    weighting: float

    def read_layer(self, index: int) -> np.ndarray: ...


class NpzLayerReader:
    """Reads single ``layer_<i>`` members of an upload archive on disk, never the whole archive.

    The archive was fully validated by ``wire.decode``/``wire.validate_upload`` when it was
    accepted; members are still read with wire's checked reader (header against zip entry,
    no pickle), because a file on disk is only as trustworthy as the disk.
    """

    def __init__(self, path: str | os.PathLike, weighting: float) -> None:
        self.path = Path(path)
        self.weighting = wire.check_weighting(weighting)
        self._zip = zipfile.ZipFile(self.path)

    def read_layer(self, index: int) -> np.ndarray:
        try:
            return wire.read_layer(self._zip, index)
        except ArchiveError as exc:
            raise AggregationError(f"{self.path.name}: {exc}") from exc

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> "NpzLayerReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Strategy(abc.ABC):
    """An aggregation strategy; add one by subclassing and registering it in :data:`STRATEGIES`."""

    name: ClassVar[str]

    @abc.abstractmethod
    def aggregate(self, readers: Sequence[LayerReader], specs: Sequence[LayerSpec]) -> Iterator[np.ndarray]:
        """Yield the aggregate's layers in order, each with the dtype and shape of ``specs``."""


class FedAvg(Strategy):
    """Weighted federated averaging: ``sum_k w_k x_k / sum_k w_k``, layer by layer.

    The weights are normalised before multiplying (``w_k / sum w``), which is the same mean
    but cannot overflow float64 for a huge weighting.

    Example:
        >>> class Upload:
        ...     def __init__(self, weighting, layers): self.weighting, self.layers = weighting, layers
        ...     def read_layer(self, i): return self.layers[i]
        >>> a = Upload(1.0, [np.array([0.0, 2.0], np.float32)])
        >>> b = Upload(3.0, [np.array([4.0, 6.0], np.float32)])
        >>> [layer] = FedAvg().aggregate([a, b], [LayerSpec((2,), np.dtype(np.float32))])
        >>> layer.tolist(), layer.dtype.name
        ([3.0, 5.0], 'float32')
    """

    name = "fedavg"

    def aggregate(self, readers: Sequence[LayerReader], specs: Sequence[LayerSpec]) -> Iterator[np.ndarray]:
        if not readers:
            raise AggregationError("A round with no uploads cannot be aggregated.")
        total = math.fsum(reader.weighting for reader in readers)
        shares = [reader.weighting / total for reader in readers]
        for index, spec in enumerate(specs):
            accumulator_dtype = np.complex128 if spec.dtype.kind == "c" else np.float64
            accumulator = np.empty(spec.shape, dtype=accumulator_dtype)
            scratch = np.empty(spec.shape, dtype=accumulator_dtype)
            for number, (reader, share) in enumerate(zip(readers, shares)):
                layer = reader.read_layer(index)
                if LayerSpec.of(layer) != spec:
                    raise AggregationError(
                        f"{wire.layer_key(index)}: expected {spec}, an upload holds {LayerSpec.of(layer)}."
                    )
                np.multiply(layer, share, out=accumulator if number == 0 else scratch, dtype=accumulator_dtype)
                if number:
                    accumulator += scratch
                del layer
            del scratch
            yield cast_like(accumulator, spec.dtype)
            del accumulator


def cast_like(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast an accumulator back to an upload dtype; integers and bools are rounded first."""
    if dtype.kind in "biu":
        values = np.rint(values.real)
    return values.astype(dtype)


STRATEGIES: dict[str, Strategy] = {FedAvg.name: FedAvg()}


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise AggregationError(f"Unknown aggregation algorithm {name!r}; expected one of {sorted(STRATEGIES)}.") from None


def aggregate_files(
    uploads: Sequence[tuple[str | os.PathLike, float]],
    specs: Sequence[LayerSpec],
    destination: str | os.PathLike,
    strategy: Strategy | str = "fedavg",
) -> tuple[int, str]:
    """Aggregate upload archives ``(path, weighting)`` into an uncompressed archive at ``destination``;
    return its size and hex SHA-256, computed while writing (the store records both).

    The result holds ``layer_0..n-1`` only (no weighting). Each layer is checked finite and
    written as soon as it is done, so memory holds one layer of the result, not all of them;
    on an error ``destination`` is left incomplete, for the caller to delete.
    """
    strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy
    with contextlib.ExitStack() as stack:
        readers = [stack.enter_context(NpzLayerReader(path, weighting)) for path, weighting in uploads]
        handle = stack.enter_context(open(destination, "wb"))
        hashing = _HashingWriter(handle)
        writer = wire.ArchiveWriter(hashing)
        for index, layer in enumerate(strategy.aggregate(readers, specs)):
            try:
                wire.check_finite([layer], [wire.layer_key(index)])
            except ArchiveError as exc:
                raise AggregationError(f"The aggregate is not finite: {exc}") from exc
            writer.add(wire.layer_key(index), layer)
            del layer
        writer.close()
        handle.flush()
        os.fsync(handle.fileno())
    return hashing.size, hashing.sha256.hexdigest()


class _HashingWriter:
    """A write-only file that hashes and counts what passes through it on the way to ``handle``."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        self.sha256.update(data)
        self.size += memoryview(data).nbytes
        return self._handle.write(data)


__all__ = [
    "LayerReader", "NpzLayerReader", "Strategy", "FedAvg", "STRATEGIES",
    "get_strategy", "aggregate_files", "cast_like",
]
