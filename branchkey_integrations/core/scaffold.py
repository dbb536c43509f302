"""SCAFFOLD on the leaf (Karimireddy et al. 2020, option II), framework-free: the leaf's control variate, the
server's, and the update of each round. The callbacks hold one :class:`ScaffoldLeaf` in branches whose
algorithm (``service.algorithm`` of the branch config) is SCAFFOLD and apply its correction to local training.

Each local step uses the corrected gradient ``g - c_i + c`` (the callbacks add :meth:`ScaffoldLeaf.correction`,
``c - c_i``). After the round's K local steps with learning rates ``lr_k`` the leaf's control variate becomes
``c_i+ = c_i - c + (x - y) / sum_k lr_k`` (``x`` the model the round started from, ``y`` the trained one); the
upload carries ``y`` (the layers, as always) and ``delta c_i = c_i+ - c_i`` (``control_<n>`` members, in the
layers' dtypes); the aggregate brings the server's new ``c``. Why per layer sums of the learning rate: a
parameter is stepped only by the optimizer that holds it, at its own group's rate.

``c_i`` changes only when the round's aggregate arrives (:meth:`ScaffoldLeaf.commit`): a round that times out
keeps training from the same ``x``, and the next upload divides by every step since. State that survives a
restart (:meth:`ScaffoldLeaf.state_dict`): ``c_i`` and ``c``, float64 arrays; ``x`` and the sums restart with
the fit, from the model it resumes with.

Example:
    >>> leaf = ScaffoldLeaf()
    >>> leaf.start([np.array([1.0, 1.0], np.float32)])
    >>> leaf.step([0.5]); leaf.step([0.5])
    >>> pending = leaf.prepare([np.array([0.0, 0.5], np.float32)])
    >>> pending.delta[0].tolist(), pending.delta[0].dtype.name
    ([1.0, 0.5], 'float32')
    >>> leaf.commit(pending, [np.array([0.25, 0.0], np.float32)], [np.zeros(2, np.float32)])
    >>> leaf.correction()[0].tolist()
    [-0.75, -0.5]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .protocol import CONTROLLED_ALGORITHMS

logger = logging.getLogger(__name__)


def runs_scaffold(branch_config: dict[str, Any]) -> bool:
    """Whether a branch config (``GET /api/v1/config/branch/{id}``'s data) names a SCAFFOLD algorithm.

    >>> runs_scaffold({"service": {"algorithm": "scaffold"}}), runs_scaffold({"service": {"algorithm": "fedavg"}})
    (True, False)
    >>> runs_scaffold({})
    False
    """
    service = branch_config.get("service") if isinstance(branch_config, dict) else None
    return isinstance(service, dict) and service.get("algorithm") in CONTROLLED_ALGORITHMS


@dataclass(frozen=True)
class PendingControls:
    """A round's control update, made before the upload: ``c_i``, the leaf's control variate after the round
    (float64), and ``delta``, what the upload carries (``c_i+ - c_i`` in the layers' dtypes)."""

    c_i: list[np.ndarray]
    delta: list[np.ndarray]


class ScaffoldLeaf:
    """A leaf's SCAFFOLD state: ``c_i`` and ``c`` (float64, None before any: zeros), the round's start ``x`` and the
    sums of the learning rates of the local steps since, per layer.

    ``trained`` (given to :meth:`start`): which layers the optimizer steps (parameters); the others (buffers that
    travel, integer layers) keep zero controls and get no correction.
    """

    def __init__(self) -> None:
        self.c: list[np.ndarray] | None = None
        self.c_i: list[np.ndarray] | None = None
        self.x: list[np.ndarray] | None = None
        self.lr_sums: np.ndarray = np.zeros(0)
        self.trained: list[bool] = []

    def start(self, x: Sequence[np.ndarray], trained: Sequence[bool] | None = None) -> None:
        """The model local training starts from now (fit start, or an aggregate just loaded); sums from zero.

        Raises:
            ValueError: the stored control variates do not fit the model (restored from another model's state).
        """
        self.x = [np.array(a, np.float64) for a in x]
        trained = list(trained) if trained is not None else [True] * len(self.x)
        self.trained = [bool(t) and a.dtype.kind == "f" for t, a in zip(trained, x)]
        self.lr_sums = np.zeros(len(self.x))
        for name, held in (("c", self.c), ("c_i", self.c_i)):
            if held is not None and [h.shape for h in held] != [a.shape for a in self.x]:
                raise ValueError(f"SCAFFOLD's {name} holds shapes {[h.shape for h in held]}, the model "
                                 f"{[a.shape for a in self.x]}: the restored state belongs to another model.")

    def step(self, lrs: Sequence[float] | np.ndarray) -> None:
        """One local step (or several, summed) at the learning rate of each layer (0: the layer was not stepped)."""
        self.lr_sums += np.asarray(lrs, np.float64)

    def correction(self) -> list[np.ndarray | None] | None:
        """``c - c_i`` per layer (float64; None for a layer without correction), or None while both are zero."""
        if self.c is None and self.c_i is None or self.x is None:
            return None
        zeros = [np.zeros_like(a) for a in self.x]
        c, c_i = self.c or zeros, self.c_i or zeros
        return [c[j] - c_i[j] if self.trained[j] else None for j in range(len(self.x))]

    def prepare(self, y: Sequence[np.ndarray]) -> PendingControls:
        """The round's control update for the trained model ``y`` (nothing changes until :meth:`commit`).

        A layer not stepped this round (sum of rates 0), or not trained, keeps its ``c_i`` (delta 0).
        """
        if self.x is None:
            raise RuntimeError("ScaffoldLeaf.prepare before start(): the round's starting model is unknown.")
        c_i_plus, delta = [], []
        for j, (x, layer) in enumerate(zip(self.x, y)):
            old = self.c_i[j] if self.c_i is not None else np.zeros_like(x)
            if self.trained[j] and self.lr_sums[j] > 0:
                c = self.c[j] if self.c is not None else 0.0
                new = old - c + (x - np.asarray(layer, np.float64)) / self.lr_sums[j]
            else:
                new = old
            c_i_plus.append(new)
            delta.append((new - old).astype(np.asarray(layer).dtype))
        return PendingControls(c_i_plus, delta)

    def commit(self, pending: PendingControls | None, controls: Sequence[np.ndarray] | None,
               aggregate: Sequence[np.ndarray]) -> None:
        """The round's aggregate arrived: ``c_i`` becomes the pending one (None: a catch-up, no upload of ours),
        ``c`` the aggregate's controls (None: the aggregate carried none, ``c`` stays), and the next round
        starts from ``aggregate``."""
        if pending is not None:
            self.c_i = pending.c_i
        if controls is not None:
            self.c = [np.array(a, np.float64) for a in controls]
        else:
            logger.warning("The aggregate carries no control variate (control_<n>) although the branch runs "
                           "SCAFFOLD; the server's c stays as it was.")
        self.start(aggregate, self.trained or None)

    def state_dict(self) -> dict[str, list[np.ndarray] | None]:
        """``c_i`` and ``c`` (float64 arrays, None before the first): what a checkpoint keeps."""
        return {"c_i": self.c_i, "c": self.c}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("c_i", "c"):
            held = state.get(name)
            setattr(self, name, None if held is None else [np.array(a, np.float64) for a in held])


__all__ = ["ScaffoldLeaf", "PendingControls", "runs_scaffold"]
