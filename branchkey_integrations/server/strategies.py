"""The built-in strategies of branchkey-local, registered on import: ``fedavg``, ``median``, ``trimmed-mean``
here, the server optimizers of :mod:`~branchkey_integrations.server.optimizers` and ``scaffold``
(:mod:`~branchkey_integrations.server.scaffold`).

Import this module (not :mod:`~branchkey_integrations.server.strategy` alone) to see the whole catalogue:
it re-exports the registry's names (:data:`CATALOGUE`, :func:`check_strategy`, ...).

- ``fedavg``: the weighted mean, which the running sum of :mod:`.aggregation` folds as uploads arrive.
- ``median`` (coordinate-wise) and ``trimmed-mean`` (cut ``floor(beta * K)`` of the K values
  at each end of every coordinate, average the rest): robust to a few wild uploads. They are
  *unweighted* by definition (an upload's weighting would let one leaf move the median at
  will), fold nothing on arrival, and read the stored uploads one layer at a time at the end, so
  memory is O(model + K x one layer).
"""

from __future__ import annotations

import logging
import math
from typing import Iterator, Sequence

import numpy as np

from ..core import wire
from ..core.errors import AggregationError
from ..core.wire import LayerSpec
from .aggregation import Combiner, LayerReader, aggregate_files, cast_like
from .optimizers import ServerOptimizer, apply_optimizer
from .scaffold import Scaffold
from .strategy import (
    CATALOGUE,
    DEFAULT_STRATEGY,
    STRATEGIES,
    Combined,
    Param,
    RoundInputs,
    Strategy,
    check_strategy,
    describe,
    register_strategy,
    strategy_for,
    takes_controls,
)

logger = logging.getLogger(__name__)


@register_strategy
class FedAvg(Strategy):
    """The weighted mean of the round's uploads: the running sum's, folded as they arrive."""

    name = "fedavg"
    summary = "the weighted mean (default)"

    def combine(self, round_: RoundInputs) -> Combined:
        return Combined.of_mean(round_)


class CoordinateWise(Strategy, Combiner):
    """Base of the robust strategies: stack one layer of each upload (float64) and reduce it over uploads.

    Nothing is folded on arrival; :meth:`combine` reads the stored uploads at the end.
    """

    folds = False

    def combine(self, round_: RoundInputs) -> Combined:
        note = self.fallback_reason(len(round_.uploads))
        if note is not None:
            logger.warning("%s: %s", round_.where(), note)
            return Combined.of_mean(round_, note)
        size, digest = aggregate_files([(u.path, u.weighting) for u in round_.uploads], round_.specs,
                                       round_.destination, self)
        return Combined(round_.destination, size, digest, self.name)

    def aggregate(self, readers: Sequence[LayerReader], specs: Sequence[LayerSpec]) -> Iterator[np.ndarray]:
        if not readers:
            raise AggregationError("A round with no uploads cannot be aggregated.")
        for index, spec in enumerate(specs):
            stack = np.empty((len(readers), *spec.shape), np.complex128 if spec.dtype.kind == "c" else np.float64)
            for number, reader in enumerate(readers):
                layer = reader.read_layer(index)
                if LayerSpec.of(layer) != spec:
                    raise AggregationError(
                        f"{wire.layer_key(index)}: expected {spec}, an upload holds {LayerSpec.of(layer)}.")
                stack[number] = layer
                del layer
            if stack.dtype.kind == "c":  # real and imaginary parts each on their own: complex numbers have no order
                reduced = self.reduce(stack.real) + 1j * self.reduce(stack.imag)
            else:
                reduced = self.reduce(stack)
            del stack
            yield cast_like(reduced, spec.dtype)

    def reduce(self, stack: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@register_strategy
class Median(CoordinateWise):
    """The coordinate-wise median (an even K averages the two middle values; unweighted).

    Example:
        >>> class Upload:
        ...     def __init__(self, weighting, layer): self.weighting, self.layer = weighting, layer
        ...     def read_layer(self, i): return self.layer
        >>> uploads = [Upload(w, np.array([v], np.float32)) for w, v in ((1, 0.0), (100, 1.0), (1, 9.0))]
        >>> next(Median().aggregate(uploads, [LayerSpec((1,), np.dtype(np.float32))])).tolist()
        [1.0]
    """

    name = "median"
    summary = "the coordinate-wise median (unweighted)"

    def reduce(self, stack: np.ndarray) -> np.ndarray:
        return np.median(stack, axis=0)


@register_strategy
class TrimmedMean(CoordinateWise):
    """Per coordinate: sort the K values, cut ``floor(beta K)`` at each end, average the rest (unweighted).

    A trimmed mean with ``beta > 0`` that would trim nothing (``floor(beta K) == 0``) is not the robust
    aggregate that was asked for: the round takes the weighted FedAvg mean and says so. ``beta = 0`` asks
    for no trimming (the unweighted mean) and always runs.
    """

    name = "trimmed-mean"
    summary = "per coordinate, the mean of the values left after cutting floor(beta K) at each end (unweighted)"
    parameters = {"beta": Param(0.1, 0, 0.5, True, "fraction cut at each end of every coordinate")}

    def __init__(self, beta: object = parameters["beta"].default) -> None:
        super().__init__(beta=beta)
        self.beta = self.params["beta"]

    def reduce(self, stack: np.ndarray) -> np.ndarray:
        cut = trimmed_count(self.beta, len(stack))
        ordered = np.sort(stack, axis=0)
        return ordered[cut:len(stack) - cut].mean(axis=0)

    def fallback_reason(self, uploads: int) -> str | None:
        if self.beta > 0 and trimmed_count(self.beta, uploads) == 0:
            return (f"trimmed-mean with beta={self.beta:g} trims floor({self.beta:g} x {uploads}) = 0 uploads at "
                    f"each end of {uploads}; aggregated with fedavg (weighted mean) instead. It needs at least "
                    f"{math.ceil(1 / self.beta)} uploads per round.")
        return None


def trimmed_count(beta: float, uploads: int) -> int:
    """How many values trimmed-mean cuts at each end of a coordinate with ``uploads`` values."""
    return math.floor(beta * uploads)


__all__ = [
    "CATALOGUE", "DEFAULT_STRATEGY", "STRATEGIES", "Param", "Strategy", "check_strategy", "describe",
    "register_strategy", "strategy_for", "FedAvg", "CoordinateWise", "Median", "TrimmedMean", "trimmed_count",
    "ServerOptimizer", "apply_optimizer", "RoundInputs", "Combined", "Scaffold", "takes_controls",
]
