"""The ``scaffold`` strategy of branchkey-local: SCAFFOLD's server step (Karimireddy et al. 2020, option II).

The model: ``x = mean`` (the round's weighted FedAvg mean, folded as uploads arrive), or with a server learning
rate ``eta_g`` other than 1, ``x = x_prev + eta_g (mean - x_prev)`` from the run's previous aggregate. The
control variate: ``c = c + (|S| / N) mean_S(delta c_i) = c + sum_S(delta c_i) / N``, ``S`` the round's uploads
and ``N`` the branch's leaves (partial participation, as the paper does: a round closed by ``min_leaves`` or
its deadline counts only the leaves that uploaded, and still divides by ``N``).

What travels (:data:`~branchkey_integrations.core.protocol.CONTROL_PATTERN`): a leaf's upload holds
``control_<n>`` beside ``layer_<n>`` (its ``delta c_i``, same shape and dtype); the aggregate holds ``c`` as
``control_<n>`` in the layers' dtypes. An upload without them (an official client, which knows nothing of
SCAFFOLD) counts with ``delta c_i = 0``, said in the log and in the round's note. ``c`` is kept in float64 in
the store (the optimizer-state record, as the server optimizers keep their moments), committed with the
aggregate; a run starts from ``c = 0``, and a file of it lost from the store restarts it from zero (said).
Integer, bool and complex layers take the FedAvg mean and keep a zero control.
"""

from __future__ import annotations

import contextlib
import logging
import os
import zipfile
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import numpy as np

from ..core import wire
from ..core.errors import AggregationError, ArchiveError
from ..core.wire import LayerSpec
from .aggregation import Combiner, LayerReader, NpzLayerReader, aggregate_files, cast_like
from .records import StateUpdate, UploadInput
from .strategy import Combined, Param, RoundInputs, Strategy, register_strategy

logger = logging.getLogger(__name__)


@register_strategy
class Scaffold(Strategy):
    """SCAFFOLD: FedAvg of the models (or a server step of ``eta_g``) and the server's control variate ``c``."""

    name = "scaffold"
    summary = ("SCAFFOLD: control variates against client drift (the leaves' control updates travel as "
               "control_<n>; official clients count with a zero update)")
    parameters = {"eta_g": Param(1.0, 0, meaning="server learning rate: x = x_prev + eta_g (mean - x_prev)")}
    carries_controls = True

    def combine(self, round_: RoundInputs) -> Combined:
        store, where = round_.store, round_.where()
        previous = store.previous_aggregate(round_.branch_id, round_.run_number, round_.round_index)
        notes: list[str] = []
        if previous is not None and not previous[1].exists():
            notes.append(f"the aggregate of round {previous[0] + 1}, which c and eta_g step from, is missing from the "
                         f"store ({previous[1].name}): c starts again from zero and x is the FedAvg mean")
            previous = None
        c_in = None
        if previous is not None:
            state = store.optimizer_state(round_.branch_id, round_.run_number, previous[0], self.name, self.params)
            c_in = state[0] if state is not None else None
            if c_in is not None and not c_in.exists():
                notes.append(f"the SCAFFOLD control variate after round {previous[0] + 1} is missing from the store "
                             f"({c_in.name}): c starts again from zero")
                c_in = None
        for note in notes:  # a file lost from the store: an error, as the server optimizers say theirs
            logger.error("%s: %s", where, note)
        without = [u.leaf_id for u in round_.uploads if not has_controls(u.path)]
        if without:  # an official client (or any that does not run SCAFFOLD): counted, and said
            notes.append(f"{len(without)} of {len(round_.uploads)} uploads carry no control update (a client that "
                         "does not run SCAFFOLD, such as the official one): counted with delta c = 0")
            logger.info("%s: uploads of leaves %s carry no control_<n> members: counted with delta c = 0", where,
                        ", ".join(without))
        leaves = max(len(store.list_leaves(round_.branch_id)), len(round_.uploads))
        destination, c_out = store.new_temp_path(), store.new_state_temp_path()
        round_.temps += [c_out, destination]
        x_prev = previous[1] if previous is not None and self.params["eta_g"] != 1 else None
        size, digest = self.apply(round_.destination, x_prev, c_in, round_.uploads, leaves, destination, c_out,
                                  round_.specs)
        return Combined(destination, size, digest, self.name, "; ".join(notes) or None,
                        StateUpdate(self.name, self.params, c_out, None))

    def apply(self, mean: Path, previous: Path | None, c_in: Path | None, uploads: Sequence[UploadInput],
              leaves: int, destination: Path, c_out: Path, specs: Sequence[LayerSpec]) -> tuple[int, str]:
        """Write the aggregate (layers, then ``control_<n>``) to ``destination`` and the new ``c`` (float64
        ``layer_<n>``) to ``c_out`` (fsynced); return the aggregate's size and SHA-256. ``previous`` None: the
        layers are the mean; ``c_in`` None: ``c`` was zero. Memory: one layer of each upload at a time."""
        with contextlib.ExitStack() as stack:
            previous_reader = stack.enter_context(NpzLayerReader(previous, 1.0)) if previous is not None else None
            c_reader = stack.enter_context(NpzLayerReader(c_in, 1.0)) if c_in is not None else None
            zips = [stack.enter_context(zipfile.ZipFile(u.path)) for u in uploads]
            handle = stack.enter_context(open(c_out, "wb"))
            controls = ControlStep(c_reader, zips, leaves, handle, specs)
            step = ServerStep(self.params["eta_g"], previous_reader)
            result = aggregate_files([(mean, 1.0)], specs, destination, step, controls.members)
            handle.flush()
            os.fsync(handle.fileno())
        return result


class ServerStep(Combiner):
    """The layers: the round's mean, or for float layers ``x_prev + eta_g (mean - x_prev)`` when ``previous`` is
    given."""

    def __init__(self, eta_g: float, previous: LayerReader | None) -> None:
        self.eta_g, self.previous = eta_g, previous

    def aggregate(self, readers: Sequence[LayerReader], specs: Sequence[LayerSpec]) -> Iterator[np.ndarray]:
        [mean] = readers
        for index, spec in enumerate(specs):
            average = mean.read_layer(index)
            if self.previous is None or spec.dtype.kind != "f":
                yield average
                continue
            x_prev = np.asarray(self.previous.read_layer(index), np.float64)
            if x_prev.shape != spec.shape:
                raise AggregationError(f"{wire.layer_key(index)}: the previous aggregate holds shape {x_prev.shape}, "
                                       f"the round's uploads {spec}; a run keeps one model layout.")
            with np.errstate(over="ignore"):
                yield cast_like(x_prev + self.eta_g * (np.asarray(average, np.float64) - x_prev), spec.dtype)


class ControlStep:
    """``c + sum(delta c_i) / N`` layer by layer, written to the state file (float64) as it goes and yielded as the
    aggregate's ``control_<n>`` members (in each layer's dtype)."""

    def __init__(self, c_in: LayerReader | None, uploads: Sequence[zipfile.ZipFile], leaves: int, c_out: BinaryIO,
                 specs: Sequence[LayerSpec]) -> None:
        self.c_in, self.uploads, self.leaves, self.specs = c_in, uploads, leaves, specs
        self.writer = wire.ArchiveWriter(c_out)

    def members(self) -> Iterator[tuple[str, np.ndarray]]:
        for index, spec in enumerate(self.specs):
            c = self.control(index, spec)
            self.writer.add(wire.layer_key(index), c)
            yield wire.control_key(index), cast_like(c, spec.dtype) if spec.dtype.kind == "f" else np.zeros(
                spec.shape, spec.dtype)
        self.writer.close()

    def control(self, index: int, spec: LayerSpec) -> np.ndarray:
        """The new ``c`` of one layer, float64 (zeros for a layer that is not float)."""
        c = np.zeros(spec.shape, np.float64)
        if spec.dtype.kind != "f":
            return c
        if self.c_in is not None:
            stored = self.c_in.read_layer(index)
            if stored.shape != spec.shape or stored.dtype != np.float64:
                expected = LayerSpec(spec.shape, np.dtype(np.float64))
                raise AggregationError(f"{wire.layer_key(index)}: the stored control variate holds "
                                       f"{LayerSpec.of(stored)}, expected {expected}.")
            c += stored
        total = np.zeros(spec.shape, np.float64)
        for upload in self.uploads:
            try:
                delta = wire.read_control(upload, index)
            except ArchiveError as exc:
                raise AggregationError(f"{Path(str(upload.filename)).name}: {exc}") from exc
            if delta is not None:
                if LayerSpec.of(delta) != spec:
                    raise AggregationError(f"{wire.control_key(index)}: an upload holds {LayerSpec.of(delta)}, "
                                           f"expected {spec}.")
                total += delta
        return c + total / self.leaves


def has_controls(path: Path) -> bool:
    """Whether a stored upload holds SCAFFOLD's control members (from its zip directory alone)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(name.startswith("control_") for name in zf.namelist())
    except (OSError, zipfile.BadZipFile) as exc:
        raise AggregationError(f"{path.name} is not a readable archive: {exc}") from exc


__all__ = ["Scaffold", "ServerStep", "ControlStep", "has_controls"]
