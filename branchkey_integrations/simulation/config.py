"""The settings of one simulation, validated when set."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

from ..core.client_options import QUANTIZE
from .data import PARTITIONS
from .frameworks import FRAMEWORKS, TrainPlan


@dataclass(frozen=True)
class SimulationConfig:
    """One simulation. Checked on construction, so a typo fails before any process starts.

    Args:
        framework: ``"lightning"`` or ``"keras"``.
        leaves: number of leaf processes (sites).
        rounds: federated rounds; every way of training gets ``rounds * epochs_per_round`` epochs.
        epochs_per_round: local epochs between two aggregations.
        partition: ``"iid"`` (equal random shares) or ``"dirichlet"`` (label skew, see ``alpha``).
        alpha: Dirichlet concentration: 0.1 gives each leaf few classes, 100 is close to IID.
        seed: seeds the test split, the partition and the initial model.
        amqp_url: have the server publish its notifications to this RabbitMQ (default: WebSocket only). The
            leaves' turns listen to neither: the simulation hands out a round once the server has aggregated
            the one before.
        min_samples: the fewest training samples a leaf may get.
        round_timeout_s: how long a leaf waits for one round's aggregate before failing.
        timeout_s: how long the whole simulation may take.
        dashboard: announce the embedded server's dashboard (a :class:`~.progress.Stage` with a one-time
            login ``link``) once the branch exists.
        strategy: the server strategy the branch aggregates with (``branchkey-local init --strategy``):
            ``fedavg``, ``fedavgm``, ``fedadam``, ``fedyogi``, ``fedadagrad``, ``median``, ``trimmed-mean``.
        strategy_params: that strategy's parameters by name (``{"eta": 0.1}``); the others keep their
            defaults. Names and ranges are the server's to check: :func:`~branchkey_integrations.simulate.run`
            has it check them before any process starts.
        proximal_mu: FedProx on every leaf (the callbacks' ``proximal_mu``): 0 trains plain FedAvg leaves.
        quantize, error_feedback: the leaves' client options of those names (the branch advertises the codec);
            None: float32 uploads.
        baselines: also train the local-only and centralized baselines. They do not depend on the
            strategy, so a sweep over strategies computes them once per seed and turns them off elsewhere;
            the report then holds ``None`` for them.
        leaves_per_round: how many of the leaves train and upload each round, chosen by the seed (None:
            all of them); the branch's rounds complete with that many uploads.
        backend: where the leaves run: ``"process"`` (a worker process per leaf, this machine) or ``"ray"``.
        ray_address: the ray backend's cluster: None starts a local Ray for the run and stops it after;
            ``"auto"`` or ``"HOST:PORT"`` joins a running one.
        leaf_cpus, leaf_gpus: what one leaf task asks Ray for.
        max_concurrent_leaves: how many leaves the ray backend trains at once; the others wait their turn.
        calibrate_head: after the last round, calibrate the final layer (:mod:`~..core.head_refit`): the leaves
            of the last round send their class statistics of the last aggregate's features as one analytics
            round, then every leaf (and the evaluator) refits the final layer from the combined statistics; the
            report's ``calibration`` holds the calibrated accuracy and whether every leaf's layer is identical.
        min_class_count: with ``calibrate_head``, a class with fewer samples on a leaf is not sent by that leaf.
        advertise_host: the address the embedded server listens on and the leaves dial: loopback by
            default; a cluster's workers on other machines need one they can reach.
    """

    framework: str = "lightning"
    leaves: int = 3
    rounds: int = 5
    epochs_per_round: int = 5
    partition: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    amqp_url: str | None = None
    min_samples: int = 10
    round_timeout_s: float = 300.0
    timeout_s: float = 1800.0
    dashboard: bool = False
    baselines: bool = True
    strategy: str = "fedavg"
    strategy_params: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    proximal_mu: float = 0.0
    quantize: str | None = None
    error_feedback: bool = True
    leaves_per_round: int | None = None
    backend: str = "process"
    ray_address: str | None = None
    leaf_cpus: float = 1.0
    leaf_gpus: float = 0.0
    max_concurrent_leaves: int = 4
    advertise_host: str = "127.0.0.1"
    calibrate_head: bool = False
    min_class_count: int = 1

    def __post_init__(self) -> None:
        self._check_strategy_types()
        self._check_backend()
        if self.framework not in FRAMEWORKS:
            raise ValueError(f"Expected framework in {tuple(FRAMEWORKS)}. Received: framework={self.framework!r}")
        if self.partition not in PARTITIONS:
            raise ValueError(f"Expected partition in {PARTITIONS}. Received: partition={self.partition!r}")
        if not isinstance(self.calibrate_head, bool):
            raise ValueError(f"Expected calibrate_head to be True or False. Received: {self.calibrate_head!r}")
        for name in ("leaves", "rounds", "epochs_per_round", "min_samples", "min_class_count"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected {name} to be an int >= 1. Received: {name}={value!r}")
        for name in ("alpha", "round_timeout_s", "timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"Expected {name} to be a number > 0. Received: {name}={value!r}")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"Expected quantize in {QUANTIZE}. Received: quantize={self.quantize!r}")
        if self.amqp_url is not None and not self.amqp_url.startswith(("amqp://", "amqps://")):
            raise ValueError("Expected amqp_url like 'amqp://guest:guest@127.0.0.1:5672/'. "
                             f"Received: amqp_url={self.amqp_url!r}")

    def _check_strategy_types(self) -> None:
        """Shapes only: which names and values a strategy takes is the server's catalogue."""
        if not isinstance(self.strategy, str) or not self.strategy:
            raise ValueError(f"Expected strategy to be a name like 'fedadam'. Received: strategy={self.strategy!r}")
        if not isinstance(self.strategy_params, Mapping):
            raise ValueError("Expected strategy_params to be a mapping like {'eta': 0.1}. "
                             f"Received: strategy_params={self.strategy_params!r}")
        for key, value in self.strategy_params.items():
            if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise ValueError("Expected strategy_params to map names to finite numbers. "
                                 f"Received: {key!r}={value!r}")
        # a read-only copy: the frozen config must not change under a running simulation
        object.__setattr__(self, "strategy_params", MappingProxyType(dict(self.strategy_params)))
        mu = self.proximal_mu
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not 0 <= mu < math.inf:
            raise ValueError("Expected proximal_mu to be a number >= 0 (0: no proximal term). "
                             f"Received: proximal_mu={mu!r}")

    def _check_backend(self) -> None:
        if self.backend not in ("process", "ray"):
            raise ValueError(f"Expected backend in ('process', 'ray'). Received: backend={self.backend!r}")
        per_round = self.leaves_per_round
        if per_round is not None and (isinstance(per_round, bool) or not isinstance(per_round, int)
                                      or not 1 <= per_round <= self.leaves):
            raise ValueError(f"Expected leaves_per_round from 1 to leaves={self.leaves}, or None (every leaf). "
                             f"Received: leaves_per_round={per_round!r}")
        concurrent = self.max_concurrent_leaves
        if isinstance(concurrent, bool) or not isinstance(concurrent, int) or concurrent < 1:
            raise ValueError(f"Expected max_concurrent_leaves to be an int >= 1. Received: {concurrent!r}")
        for name in ("leaf_cpus", "leaf_gpus"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"Expected {name} to be a number >= 0. Received: {name}={value!r}")
        if not isinstance(self.advertise_host, str) or not self.advertise_host:
            raise ValueError(f"Expected advertise_host like '10.0.0.5'. Received: {self.advertise_host!r}")

    @property
    def per_round(self) -> int:
        """How many leaves train each round."""
        return self.leaves if self.leaves_per_round is None else self.leaves_per_round

    def sample(self) -> list[list[int]]:
        """Per round, the indexes (from 0, sorted) of the leaves that train it: all of them, or
        ``leaves_per_round`` drawn by the seed without replacement within a round.

        Example:
            >>> SimulationConfig(leaves=5, rounds=2, leaves_per_round=2, seed=0).sample()
            [[1, 3], [2, 3]]
        """
        if self.per_round == self.leaves:
            return [list(range(self.leaves)) for _ in range(self.rounds)]
        rng = np.random.default_rng([self.seed, 27])
        return [sorted(rng.choice(self.leaves, self.per_round, replace=False).tolist()) for _ in range(self.rounds)]

    def as_dict(self) -> dict[str, Any]:
        """The settings as plain JSON-ready values (``dataclasses.asdict`` cannot copy the read-only mapping)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return fields | {"strategy_params": dict(self.strategy_params)}

    def plan(self) -> TrainPlan:
        return TrainPlan(rounds=self.rounds, epochs_per_round=self.epochs_per_round, seed=self.seed)
