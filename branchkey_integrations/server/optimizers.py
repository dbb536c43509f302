"""The server optimizers of branchkey-local: ``fedavgm``, ``fedadam``, ``fedyogi``, ``fedadagrad``.

Reddi et al. 2021, "Adaptive Federated Optimization"; FedAvgM: Hsu et al. 2019. Each is one
:class:`ServerOptimizer` subclass (its parameters and its update rule); the base owns what they share:
they fold uploads into the running FedAvg sum like ``fedavg`` and step over the round's weighted mean.
The pseudo-gradient is ``d = mean - x_prev``, where ``x_prev`` is the branch's previous aggregate of the
same run (the model the leaves trained from). A run's first round has no ``x_prev``: its aggregate is
the FedAvg mean, and the optimizer starts from there with zero moments.

Why float64 state: ``m`` and ``v`` are computed and stored in float64 (the moments of tiny
pseudo-gradients underflow float16 and lose digits in float32), and every aggregation reads them
back from the store, so a restarted server computes the same bytes as one that never stopped.
Only float layers move: integer, bool and complex layers (step counters, masks) take the FedAvg
mean (integers rounded half to even), and their state is an empty placeholder. A file the step needs
that is gone from the store (removed by hand, a damaged disk) is said in the round's note, not retried
forever: without the previous aggregate the mean is the aggregate; without the moments they start from zero.

Update rules (``d`` the pseudo-gradient, all in float64, moments starting at zero; the step is
Reddi et al.'s, without the bias correction some libraries add):

- fedavgm:    ``m = momentum m + d``;                                 ``x = x_prev + eta m``
- fedadam:    ``m = b1 m + (1-b1) d``; ``v = b2 v + (1-b2) d^2``;      ``x = x_prev + eta m / (sqrt(v) + tau)``
- fedyogi:    as fedadam with ``v = v - (1-b2) d^2 sign(v - d^2)``
- fedadagrad: ``v = v + d^2``;                                        ``x = x_prev + eta d / (sqrt(v) + tau)``

(Not all Flower's defaults: its FedAdam/FedAdagrad take tau=1e-9, FedAvgM momentum 0.)
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
from pathlib import Path
from typing import BinaryIO, ClassVar, Iterator, Mapping, Sequence

import numpy as np

from ..core import wire
from ..core.errors import AggregationError
from ..core.wire import LayerSpec
from .aggregation import Combiner, LayerReader, NpzLayerReader, aggregate_files
from .records import StateUpdate
from .strategy import Combined, Param, RoundInputs, Strategy, register_strategy, strategy_for

logger = logging.getLogger(__name__)

_ETA = "server learning rate"
_TAU = "adaptivity: keeps the step finite where v is ~0"
_B1 = "decay of the first moment m"
_B2 = "decay of the second moment v"

Moments = tuple[np.ndarray, np.ndarray | None, np.ndarray | None]


class ServerOptimizer(Strategy):
    """A server optimizer: folds like ``fedavg``, then steps from the run's previous aggregate toward the mean.

    A subclass sets ``keeps`` (which of ``m`` and ``v`` it persists) and :meth:`update`.
    """

    #: (keeps m, keeps v)
    keeps: ClassVar[tuple[bool, bool]] = (True, True)

    @abc.abstractmethod
    def update(self, delta: np.ndarray, m: np.ndarray, v: np.ndarray) -> Moments:
        """``(step, m, v)`` in float64 from the pseudo-gradient and the moments (None for one not kept)."""

    def step(self, x_prev: np.ndarray, mean: np.ndarray, m: np.ndarray | None,
             v: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """One server step on one float layer: ``(x, m, v)`` in float64; ``m``/``v`` None on input: zeros."""
        x_prev = np.asarray(x_prev, np.float64)
        delta = np.asarray(mean, np.float64) - x_prev
        zeros = np.zeros_like(delta)
        moved, m, v = self.update(delta, zeros if m is None else np.asarray(m, np.float64),
                                  zeros if v is None else np.asarray(v, np.float64))
        return x_prev + moved, m, v

    def combine(self, round_: RoundInputs) -> Combined:
        """Step from the previous aggregate and the stored moments toward ``round_.mean``; the moments are
        committed with the aggregate."""
        store, where = round_.store, round_.where()
        previous = store.previous_aggregate(round_.branch_id, round_.run_number, round_.round_index)
        if previous is None:
            return Combined.of_mean(round_, f"first round of run {round_.run_number}: {self.name} starts from the "
                                            "FedAvg mean")
        if not previous[1].exists():
            gone = (f"the aggregate of round {previous[0] + 1} of run {round_.run_number}, which {self.name} steps from, is "
                    f"missing from the store ({previous[1].name}): this round's aggregate is the FedAvg mean")
            logger.error("%s: %s", where, gone)
            return Combined.of_mean(round_, gone)
        state_in = store.optimizer_state(round_.branch_id, round_.run_number, previous[0], self.name, self.params)
        lost = [path.name for path in state_in or () if path is not None and not path.exists()]
        note: str | None = None
        if lost:
            note = (f"the {self.name} state after round {previous[0] + 1} of run {round_.run_number} is missing from the "
                    f"store ({', '.join(lost)}): its moments start again from zero")
            logger.error("%s: %s", where, note)
            state_in = None
        destination = store.new_temp_path()
        m_out, v_out = (store.new_state_temp_path() if kept else None for kept in self.keeps)
        round_.temps += [path for path in (m_out, v_out) if path] + [destination]
        size, digest = self.apply(round_.destination, previous[1], state_in, destination, m_out, v_out, round_.specs)
        return Combined(destination, size, digest, self.name, note, StateUpdate(self.name, self.params, m_out, v_out))

    def apply(self, mean: Path, previous: Path, state: tuple[Path | None, Path | None] | None, destination: Path,
              m_out: Path | None, v_out: Path | None, specs: Sequence[LayerSpec]) -> tuple[int, str]:
        """Write the step's aggregate to ``destination`` and the new moments to ``m_out``/``v_out`` (fsynced);
        return the aggregate's size and SHA-256. ``state`` None (or a missing moment): zero moments.

        Memory: one layer each of the mean, the previous aggregate and the moments at a time.
        """
        m_in, v_in = state or (None, None)
        with contextlib.ExitStack() as stack:
            previous_reader = stack.enter_context(NpzLayerReader(previous, 1.0))
            m_reader, v_reader = (stack.enter_context(NpzLayerReader(p, 1.0)) if p else None for p in (m_in, v_in))
            outs = [stack.enter_context(open(path, "wb")) if path else None for path in (m_out, v_out)]
            layers = OptimizerLayers(self, previous_reader, m_reader, v_reader, *outs)
            result = aggregate_files([(mean, 1.0)], specs, destination, layers)
            for handle in outs:
                if handle is not None:
                    handle.flush()
                    os.fsync(handle.fileno())
        return result


@register_strategy
class FedAvgM(ServerOptimizer):
    name = "fedavgm"
    summary = "server momentum over the FedAvg mean"
    parameters = {"eta": Param(1.0, 0, meaning=_ETA), "momentum": Param(0.9, 0, 1, True, "server momentum")}
    keeps = (True, False)

    def update(self, delta: np.ndarray, m: np.ndarray, v: np.ndarray) -> Moments:
        m = self.params["momentum"] * m + delta
        return self.params["eta"] * m, m, None


@register_strategy
class FedAdagrad(ServerOptimizer):
    name = "fedadagrad"
    summary = "Adagrad over the FedAvg mean's pseudo-gradient"
    parameters = {"eta": Param(0.1, 0, meaning=_ETA), "tau": Param(1e-3, 0, meaning=_TAU)}
    keeps = (False, True)

    def update(self, delta: np.ndarray, m: np.ndarray, v: np.ndarray) -> Moments:
        v = v + delta * delta
        return self.params["eta"] * delta / (np.sqrt(v) + self.params["tau"]), None, v


@register_strategy
class FedAdam(ServerOptimizer):
    name = "fedadam"
    summary = "Adam over the FedAvg mean's pseudo-gradient"
    parameters = {"eta": Param(0.01, 0, meaning=_ETA), "beta_1": Param(0.9, 0, 1, True, _B1),
                  "beta_2": Param(0.99, 0, 1, True, _B2), "tau": Param(1e-3, 0, meaning=_TAU)}

    def update(self, delta: np.ndarray, m: np.ndarray, v: np.ndarray) -> Moments:
        m = self.params["beta_1"] * m + (1 - self.params["beta_1"]) * delta
        v = self.second_moment(v, delta * delta)
        return self.params["eta"] * m / (np.sqrt(v) + self.params["tau"]), m, v

    def second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        return self.params["beta_2"] * v + (1 - self.params["beta_2"]) * squared


@register_strategy
class FedYogi(FedAdam):
    name = "fedyogi"
    summary = "Yogi (Adam with an additive second moment) over the FedAvg mean's pseudo-gradient"

    def second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        return v - (1 - self.params["beta_2"]) * squared * np.sign(v - squared)


class OptimizerLayers(Combiner):
    """Steps from the previous aggregate toward the round's mean; writes the new moments as it goes.

    Given to :func:`~.aggregation.aggregate_files` with one "upload", the round's FedAvg mean (already
    written by the running sum), so the result is written, hashed and checked finite as any
    aggregate. ``previous`` is the branch's previous aggregate of the run; ``m_in``/``v_in`` the stored
    moments (None: zeros); ``m_out``/``v_out`` open files that receive ``layer_<i>`` of the new
    moments (an empty float64 placeholder for a layer that does not move).
    """

    def __init__(self, optimizer: ServerOptimizer, previous: LayerReader, m_in: LayerReader | None,
                 v_in: LayerReader | None, m_out: BinaryIO | None, v_out: BinaryIO | None) -> None:
        self.optimizer = optimizer
        self.previous, self.m_in, self.v_in = previous, m_in, v_in
        self.m_out = wire.ArchiveWriter(m_out) if m_out is not None else None
        self.v_out = wire.ArchiveWriter(v_out) if v_out is not None else None

    def aggregate(self, readers: Sequence[LayerReader], specs: Sequence[LayerSpec]) -> Iterator[np.ndarray]:
        [mean] = readers
        name, eta = self.optimizer.name, self.optimizer.params["eta"]
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
                x, m, v = self.optimizer.step(previous, average, _moment(self.m_in, index, spec),
                                              _moment(self.v_in, index, spec))
                with np.errstate(over="ignore"):  # an overflow is refused just below, with its cause
                    layer = x.astype(spec.dtype)
                if not wire.all_finite(layer):  # say which setting overflowed, not only that the aggregate did
                    raise AggregationError(
                        f"{key}: the {name} step leaves {spec.dtype}'s range (max {np.finfo(spec.dtype).max:g}) "
                        f"with eta={eta:g}; set a smaller eta ('branchkey-local branch strategy "
                        f"{name} --strategy-param eta=...') or train in a wider dtype.")
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
    """:meth:`ServerOptimizer.apply` of the optimizer ``name`` with ``params``.

    Raises:
        AggregationError: ``name`` is not a server optimizer.
    """
    optimizer = strategy_for(name, params)
    if not isinstance(optimizer, ServerOptimizer):
        raise AggregationError(f"{name!r} is not a server optimizer.")
    return optimizer.apply(mean, previous, state, destination, m_out, v_out, specs)


__all__ = ["ServerOptimizer", "FedAvgM", "FedAdagrad", "FedAdam", "FedYogi", "OptimizerLayers", "apply_optimizer"]
