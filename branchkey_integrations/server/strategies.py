"""Server strategies of branchkey-local: the catalogue, parameter checks, and the math.

A branch aggregates with one strategy (``branches.algorithm``, its parameters in
``branches.strategy_params``):

- ``fedavg``: the weighted mean (the running sum of :mod:`.aggregation`).
- ``fedavgm``, ``fedadam``, ``fedyogi``, ``fedadagrad``: server optimizers (Reddi et al. 2021,
  "Adaptive Federated Optimization"; FedAvgM: Hsu et al. 2019). They step over the round's
  weighted FedAvg mean, which the fast running-sum path computes as for ``fedavg``: the
  pseudo-gradient is ``delta = mean - x_prev``, where ``x_prev`` is the branch's previous aggregate
  of the same run (the model the leaves trained from). A run's first round has no ``x_prev``: its
  aggregate is the FedAvg mean, and the optimizer starts from there with zero moments.
- ``median`` (coordinate-wise) and ``trimmed-mean`` (cut ``floor(beta * K)`` of the K values
  at each end of every coordinate, average the rest): robust to a few wild uploads. They are
  *unweighted* by definition (an upload's weighting would let one leaf move the median at
  will), and read the stored uploads one layer at a time, so memory is O(model + K x one layer).

Why float64 state: ``m`` and ``v`` are computed and stored in float64 (the moments of tiny
pseudo-gradients underflow float16 and lose digits in float32), and every aggregation reads them
back from the store, so a restarted server computes the same bytes as one that never stopped.
Only float layers move: integer, bool and complex layers (step counters, masks) take the FedAvg
mean (integers rounded half to even), and their state is an empty placeholder.

Update rules (``d`` the pseudo-gradient, all in float64, moments starting at zero; the step is
Reddi et al.'s, without the bias correction some libraries add):

- fedavgm:    ``m = momentum m + d``;                                 ``x = x_prev + eta m``
- fedadam:    ``m = b1 m + (1-b1) d``; ``v = b2 v + (1-b2) d^2``;      ``x = x_prev + eta m / (sqrt(v) + tau)``
- fedyogi:    as fedadam with ``v = v - (1-b2) d^2 sign(v - d^2)``
- fedadagrad: ``v = v + d^2``;                                        ``x = x_prev + eta d / (sqrt(v) + tau)``
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Mapping, Sequence

import numpy as np

from ..core import wire
from ..core.errors import AggregationError, InvalidValueError
from ..core.wire import LayerSpec
from .aggregation import LayerReader, NpzLayerReader, Strategy, aggregate_files, cast_like


@dataclass(frozen=True)
class Param:
    """One strategy parameter: its default and the interval it must lie in."""

    default: float
    low: float
    high: float = math.inf
    low_inclusive: bool = False
    meaning: str = ""

    def allowed(self) -> str:
        low = "[" if self.low_inclusive else "("
        high = "inf)" if math.isinf(self.high) else f"{self.high:g})"
        return f"{low}{self.low:g}, {high}"

    def admits(self, value: float) -> bool:
        above = value >= self.low if self.low_inclusive else value > self.low
        return above and value < self.high


_ETA = "server learning rate"
_TAU = "adaptivity: keeps the step finite where v is ~0"
_B1 = "decay of the first moment m"
_B2 = "decay of the second moment v"

#: name -> its parameters (not all Flower's defaults: its FedAdam/FedAdagrad take tau=1e-9, FedAvgM momentum 0)
CATALOGUE: dict[str, dict[str, Param]] = {
    "fedavg": {},
    "fedavgm": {"eta": Param(1.0, 0, meaning=_ETA), "momentum": Param(0.9, 0, 1, True, "server momentum")},
    "fedadam": {"eta": Param(0.01, 0, meaning=_ETA), "beta_1": Param(0.9, 0, 1, True, _B1),
                "beta_2": Param(0.99, 0, 1, True, _B2), "tau": Param(1e-3, 0, meaning=_TAU)},
    "fedyogi": {"eta": Param(0.01, 0, meaning=_ETA), "beta_1": Param(0.9, 0, 1, True, _B1),
                "beta_2": Param(0.99, 0, 1, True, _B2), "tau": Param(1e-3, 0, meaning=_TAU)},
    "fedadagrad": {"eta": Param(0.1, 0, meaning=_ETA), "tau": Param(1e-3, 0, meaning=_TAU)},
    "median": {},
    "trimmed-mean": {"beta": Param(0.1, 0, 0.5, True, "fraction cut at each end of every coordinate")},
}
OPTIMIZERS = frozenset({"fedavgm", "fedadam", "fedyogi", "fedadagrad"})
ROBUST = frozenset({"median", "trimmed-mean"})
DEFAULT_STRATEGY = "fedavg"


def check_strategy(name: object, params: Mapping[str, object] | None = None) -> dict[str, float]:
    """The strategy's full parameters: ``params`` checked, the others at their defaults.

    Raises:
        InvalidValueError: an unknown strategy or parameter name, or a value out of its range; the
            message names the value and what is allowed.

    Example:
        >>> check_strategy("fedadam", {"eta": 0.1})
        {'eta': 0.1, 'beta_1': 0.9, 'beta_2': 0.99, 'tau': 0.001}
        >>> check_strategy("trimmed-mean", {"beta": 0.5})
        Traceback (most recent call last):
        ...
        branchkey_integrations.core.errors.InvalidValueError: Expected trimmed-mean's beta in [0, 0.5). Received: beta=0.5
    """
    if not isinstance(name, str) or name not in CATALOGUE:
        raise InvalidValueError(f"Expected a strategy in {sorted(CATALOGUE)}. Received: strategy={name!r:.80}")
    known = CATALOGUE[name]
    params = dict(params or {})
    unknown = sorted(str(key) for key in params if key not in known)
    if unknown:
        raise InvalidValueError(f"Strategy {name} has no parameter {', '.join(repr(k[:40]) for k in unknown)}; its "
                                f"parameters are {sorted(known) or 'none'}.")
    checked = {}
    for key, spec in known.items():
        value = params.get(key, spec.default)
        number = _number(value)
        if number is None or not spec.admits(number):
            raise InvalidValueError(f"Expected {name}'s {key} in {spec.allowed()}. Received: {key}={value!r:.80}")
        checked[key] = number
    return checked


def _number(value: object) -> float | None:
    """``value`` as a float, or None: not a number (a bool is not one), or too large for a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def describe(name: str) -> str:
    """One line per parameter of ``name``: its default, range and meaning (for ``--help`` and errors)."""
    return "; ".join(f"{key}={p.default:g} in {p.allowed()} ({p.meaning})" for key, p in CATALOGUE[name].items())


# -- robust strategies: unweighted, one layer of every upload at a time --------------------------


class CoordinateWise(Strategy):
    """Base of the robust strategies: stack one layer of each upload (float64) and reduce it over uploads."""

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

    def reduce(self, stack: np.ndarray) -> np.ndarray:
        return np.median(stack, axis=0)


class TrimmedMean(CoordinateWise):
    """Per coordinate: sort the K values, cut ``floor(beta K)`` at each end, average the rest (unweighted)."""

    name = "trimmed-mean"

    def __init__(self, beta: float) -> None:
        self.beta = beta

    def reduce(self, stack: np.ndarray) -> np.ndarray:
        cut = trimmed_count(self.beta, len(stack))
        ordered = np.sort(stack, axis=0)
        return ordered[cut:len(stack) - cut].mean(axis=0)


def trimmed_count(beta: float, uploads: int) -> int:
    """How many values trimmed-mean cuts at each end of a coordinate with ``uploads`` values."""
    return math.floor(beta * uploads)


def robust_strategy(name: str, params: Mapping[str, float]) -> Strategy:
    return Median() if name == "median" else TrimmedMean(params["beta"])


def fallback_reason(name: str, params: Mapping[str, float], uploads: int) -> str | None:
    """Why ``name`` cannot run on a round of ``uploads`` uploads (it then aggregates with FedAvg), or None.

    A trimmed mean with ``beta > 0`` that would trim nothing (``floor(beta K) == 0``) is not the
    robust aggregate that was asked for: the round takes the weighted FedAvg mean and says so.
    ``beta = 0`` asks for no trimming (the unweighted mean) and always runs; the median runs for any K.
    """
    if name == "trimmed-mean" and params["beta"] > 0 and trimmed_count(params["beta"], uploads) == 0:
        needed = math.ceil(1 / params["beta"])
        return (f"trimmed-mean with beta={params['beta']:g} trims floor({params['beta']:g} x {uploads}) = 0 uploads at "
                f"each end of {uploads}; aggregated with fedavg (weighted mean) instead. It needs at least {needed} "
                f"uploads per round.")
    return None


# -- server optimizers ------------------------------------------------------------------------


def optimizer_step(name: str, params: Mapping[str, float], x_prev: np.ndarray, mean: np.ndarray,
                   m: np.ndarray | None, v: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One server step on one float layer: returns ``(x, m, v)`` in float64 (``m``/``v`` None where unused).

    ``m``/``v`` None on input: zero moments (the first step after a run's first round or a
    strategy change).
    """
    x_prev = np.asarray(x_prev, np.float64)
    delta = np.asarray(mean, np.float64) - x_prev
    zeros = np.zeros_like(delta)
    m = zeros if m is None else np.asarray(m, np.float64)
    v = zeros if v is None else np.asarray(v, np.float64)
    eta = params["eta"]
    if name == "fedavgm":
        m = params["momentum"] * m + delta
        return x_prev + eta * m, m, None
    squared = delta * delta
    if name == "fedadagrad":
        v = v + squared
        return x_prev + eta * delta / (np.sqrt(v) + params["tau"]), None, v
    beta_1, beta_2 = params["beta_1"], params["beta_2"]
    m = beta_1 * m + (1 - beta_1) * delta
    if name == "fedadam":
        v = beta_2 * v + (1 - beta_2) * squared
    elif name == "fedyogi":
        v = v - (1 - beta_2) * squared * np.sign(v - squared)
    else:
        raise AggregationError(f"{name!r} is not a server optimizer; expected one of {sorted(OPTIMIZERS)}.")
    return x_prev + eta * m / (np.sqrt(v) + params["tau"]), m, v


def uses_moments(name: str) -> tuple[bool, bool]:
    """Which of ``m`` and ``v`` the optimizer keeps."""
    return name != "fedadagrad", name != "fedavgm"


class ServerOptimizer(Strategy):
    """Steps from the previous aggregate toward the round's mean; writes the new moments as it goes.

    Given to :func:`~.aggregation.aggregate_files` with one "upload", the round's FedAvg mean (already
    written by the running sum), so the result is written, hashed and checked finite as any
    aggregate. ``previous`` is the branch's previous aggregate of the run; ``m_in``/``v_in`` the stored
    moments (None: zeros); ``m_out``/``v_out`` open files that receive ``layer_<i>`` of the new
    moments (an empty float64 placeholder for a layer that does not move).
    """

    def __init__(self, name: str, params: Mapping[str, float], previous: LayerReader,
                 m_in: LayerReader | None, v_in: LayerReader | None,
                 m_out: BinaryIO | None, v_out: BinaryIO | None) -> None:
        self.name = name  # type: ignore[misc]
        self.params = params
        self.previous, self.m_in, self.v_in = previous, m_in, v_in
        self.m_out = wire.ArchiveWriter(m_out) if m_out is not None else None
        self.v_out = wire.ArchiveWriter(v_out) if v_out is not None else None

    def aggregate(self, readers: Sequence[LayerReader], specs: Sequence[LayerSpec]) -> Iterator[np.ndarray]:
        [mean] = readers
        for index, spec in enumerate(specs):
            key = wire.layer_key(index)
            average = mean.read_layer(index)
            if spec.dtype.kind != "f":  # ints, bools, complex: the FedAvg mean, no state
                m = v = None
                layer = average
            else:
                previous = self.previous.read_layer(index)
                if LayerSpec.of(previous) != spec:
                    raise AggregationError(f"{key}: the previous aggregate holds {LayerSpec.of(previous)}, the round's "
                                           f"uploads {spec}; a run keeps one model layout.")
                x, m, v = optimizer_step(self.name, self.params, previous, average,
                                         _moment(self.m_in, index, spec), _moment(self.v_in, index, spec))
                with np.errstate(over="ignore"):  # an overflow is refused just below, with its cause
                    layer = x.astype(spec.dtype)
                if not wire.all_finite(layer):  # say which setting overflowed, not only that the aggregate did
                    raise AggregationError(
                        f"{key}: the {self.name} step leaves {spec.dtype}'s range (max {np.finfo(spec.dtype).max:g}) "
                        f"with eta={self.params['eta']:g}; set a smaller eta ('branchkey-local branch strategy "
                        f"{self.name} --strategy-param eta=...') or train in a wider dtype.")
            for writer, moment in ((self.m_out, m), (self.v_out, v)):
                if writer is not None:
                    writer.add(key, np.zeros(0) if moment is None else moment)
            yield layer
        for writer in (self.m_out, self.v_out):
            if writer is not None:
                writer.close()


def _moment(reader: LayerReader | None, index: int, spec: LayerSpec) -> np.ndarray | None:
    if reader is None:
        return None
    moment = reader.read_layer(index)
    if moment.shape != spec.shape or moment.dtype != np.float64:
        raise AggregationError(f"{wire.layer_key(index)}: the stored optimizer state holds {LayerSpec.of(moment)}, "
                               f"expected {LayerSpec(spec.shape, np.dtype(np.float64))}.")
    return moment


def apply_optimizer(name: str, params: Mapping[str, float], mean: Path, previous: Path,
                    state: tuple[Path | None, Path | None] | None, destination: Path,
                    m_out: Path | None, v_out: Path | None, specs: Sequence[LayerSpec]) -> tuple[int, str]:
    """Write the optimizer's aggregate to ``destination`` and its new moments to ``m_out``/``v_out`` (fsynced);
    return the aggregate's size and SHA-256. ``state`` None (or a missing moment): zero moments.

    Memory: one layer each of the mean, the previous aggregate and the moments at a time.
    """
    m_in, v_in = state or (None, None)
    with contextlib.ExitStack() as stack:
        previous_reader = stack.enter_context(NpzLayerReader(previous, 1.0))
        m_reader, v_reader = (stack.enter_context(NpzLayerReader(path, 1.0)) if path else None for path in (m_in, v_in))
        outs = [stack.enter_context(open(path, "wb")) if path else None for path in (m_out, v_out)]
        optimizer = ServerOptimizer(name, params, previous_reader, m_reader, v_reader, *outs)
        result = aggregate_files([(mean, 1.0)], specs, destination, optimizer)
        for handle in outs:
            if handle is not None:
                handle.flush()
                os.fsync(handle.fileno())
    return result


__all__ = [
    "CATALOGUE", "OPTIMIZERS", "ROBUST", "DEFAULT_STRATEGY", "Param", "check_strategy", "describe", "Median",
    "TrimmedMean", "robust_strategy", "fallback_reason", "trimmed_count", "optimizer_step", "uses_moments",
    "ServerOptimizer", "apply_optimizer",
]
