"""The settings of one simulation, validated when set."""

from __future__ import annotations

import math
from dataclasses import dataclass

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
        amqp_url: have the server publish to this RabbitMQ and the leaves listen over AMQP
            (default: WebSocket notifications, which need nothing but the server).
        min_samples: the fewest training samples a leaf may get.
        round_timeout_s: how long a leaf waits for one round's aggregate before failing.
        timeout_s: how long the whole simulation may take.
        dashboard: announce the embedded server's dashboard (a :class:`~.progress.Stage` with a one-time
            login ``link``) once the branch exists.
        baselines: also train the local-only and centralized baselines. They do not depend on the
            strategy, so a sweep over strategies computes them once per seed and turns them off elsewhere;
            the report then holds ``None`` for them.
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

    def __post_init__(self) -> None:
        if self.framework not in FRAMEWORKS:
            raise ValueError(f"Expected framework in {tuple(FRAMEWORKS)}. Received: framework={self.framework!r}")
        if self.partition not in PARTITIONS:
            raise ValueError(f"Expected partition in {PARTITIONS}. Received: partition={self.partition!r}")
        for name in ("leaves", "rounds", "epochs_per_round", "min_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected {name} to be an int >= 1. Received: {name}={value!r}")
        for name in ("alpha", "round_timeout_s", "timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"Expected {name} to be a number > 0. Received: {name}={value!r}")
        if self.amqp_url is not None and not self.amqp_url.startswith(("amqp://", "amqps://")):
            raise ValueError("Expected amqp_url like 'amqp://guest:guest@127.0.0.1:5672/'. "
                             f"Received: amqp_url={self.amqp_url!r}")

    def plan(self) -> TrainPlan:
        return TrainPlan(rounds=self.rounds, epochs_per_round=self.epochs_per_round, seed=self.seed)
