"""The one leaf implementation every simulation backend runs: a *task* is one turn of one leaf (load the
branch's latest aggregate, train ``epochs_per_round`` epochs, upload), the scoring of one round's aggregate,
or a baseline (a leaf alone, or all the data); :func:`run_task` runs any of them and returns a plain dict.

Why turns and not one long ``fit`` per leaf: a turn ends with its upload, so a leaf that waits for its
round holds no process, no model and no core (only its optimizer's state, a few hundred kB, which the
backend keeps and hands to its next turn). That is what lets 100 leaves share 4 training slots
(``max_concurrent_leaves``) and lets a leaf sit out the rounds it was not sampled for: its next turn starts
from the branch's latest aggregate, whatever round that was. A turn is a pure function of (its leaf's data,
the aggregate it starts from, the round, the seed), so the process and the Ray backend give the same
aggregates for the same seed. Tasks travel as JSON (never pickled by us); the data as ``.npz`` files
(process backend) or as arrays in Ray's object store (Ray backend).

Example:
    >>> task = LeafTask(role="evaluate", name="evaluate", framework="lightning", round=2,
    ...                 plan=TrainPlan(rounds=2, epochs_per_round=1, seed=0), aggregate_id="f1")
    >>> LeafTask.from_dict(task.as_dict()) == task
    True
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from ..core.errors import RequestRejectedError
from ..core.head_refit import HeadRefit, class_accuracy, refit_head
from ..core.head_statistics import HeadStatistics, head_statistics
from ..core.scaffold import ScaffoldLeaf
from .data import Split, holdout
from .frameworks import TrainPlan, load_framework

logger = logging.getLogger(__name__)

#: ``turn``: one federated round of one leaf; ``evaluate``: score an aggregate on the common test set; ``score``: a
#: leaf scores the last round's aggregate on its own data and sends it as metrics (turns do it for the others);
#: ``local``: a leaf trains alone for the whole budget; ``centralized``: all the data, the whole budget;
#: ``calibrate``: refit the final layer of the last aggregate from the calibration round's combined statistics
#: (a leaf: answers the layer's digest; the evaluator: also its accuracy on the common test set);
#: ``exit``: a process-backend worker ends (a Ray task is never given it)
ROLES = ("turn", "evaluate", "score", "calibrate", "local", "centralized", "exit")

#: the ``test`` metrics a simulation sends: each leaf's accuracy on the held-out part of its own data, and the
#: evaluator's on the common test set (the report's figure)
HELDOUT_METRIC = "heldout_accuracy"
COMMON_TEST_METRIC = "common_test_accuracy"


@dataclass(frozen=True)
class LeafTask:
    """One unit of work. ``credentials`` (a leaf's, as the server issued them) and ``host`` are set for the
    roles that talk to the server (``turn``, ``evaluate``); ``aggregate_id`` is the aggregate a turn starts
    from (None: the initial model) or the one ``evaluate`` scores."""

    role: str
    name: str
    framework: str
    round: int
    plan: TrainPlan
    credentials: dict[str, str] = field(default_factory=dict)
    host: str = ""
    aggregate_id: str | None = None
    proximal_mu: float = 0.0
    accelerator: str = "cpu"  # "gpu": a turn of the ray backend given a GPU (--leaf-gpus)
    scaffold: bool = False  # the branch runs SCAFFOLD: the turn corrects its steps and uploads its control update
    calibrate: bool = False  # ``score``: also send this leaf's calibration statistics of the last aggregate
    min_class_count: int = 1  # with ``calibrate``: a class with fewer samples here is not sent
    analytics_id: str | None = None  # ``calibrate``: the calibration round's analytics aggregate
    quantize: str | None = None  # the client's quantize= (the branch advertises that codec); None: float32
    error_feedback: bool = True  # with quantize: the residual goes on from turn to turn in the leaf's state

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"Expected role in {ROLES}. Received: role={self.role!r}")

    @property
    def key(self) -> str:
        """Unique within a run: the task's name and round (``leaf_3.r2``)."""
        return f"{self.name}.{self.role}.r{self.round}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "LeafTask":
        return cls(**{**raw, "plan": TrainPlan(**raw["plan"])})


def run_task(task: LeafTask, data: Split | None, test: Split | None, state: Any = None) -> tuple[dict[str, Any], Any]:
    """Run ``task`` to its end; return its answer, which says what it did and where (``node``: the machine's
    name), and the leaf's optimizer state for its next turn (``turn`` only; else None).

    ``turn`` answers ``{"samples": n}`` after its upload, ``evaluate`` ``{"accuracy": a}``, the baselines
    ``{"accuracy": [a_1, ..., a_R]}`` (one per round's worth of epochs). ``state`` is what this leaf's
    previous turn returned (None on its first): the optimizer goes on from it, as it does under the callbacks.
    """
    started = time.monotonic()
    framework = load_framework(task.framework)
    answer: dict[str, Any] = {"key": task.key, "role": task.role, "name": task.name, "round": task.round,
                              "node": platform.node()}
    held: Split | None = None
    if data is not None and task.role in ("turn", "score", "local"):  # a leaf's own data: held-out part kept out
        data, held = holdout(data, seed=task.plan.data_seed)
    if task.role == "turn":
        assert data is not None and held is not None
        answer["samples"], state = _turn(task, framework, data, held, state)
    elif task.role == "score":
        assert data is not None and held is not None
        with _client(task) as client:
            layers = _download(client, task.aggregate_id)
            answer["accuracy"] = _score_own(client, framework, task, layers, held)
            if task.calibrate:  # the statistics of the data the leaf trained on (not its held-out part)
                sending = time.monotonic()
                answer["calibration_bytes"] = _send_statistics(client, framework, task, layers, data)
                answer["statistics_seconds"] = round(time.monotonic() - sending, 3)
    elif task.role == "calibrate":
        with _client(task) as client:
            start, layers, refit = _calibrated(client, framework, task)
        answer |= {"digest": refit.digest(), "refit": refit.refit, "untouched": refit.untouched}
        if data is None and test is not None:  # the evaluator (no shard): the calibrated model on the test set
            answer["accuracy"] = framework.score(layers, test, task.plan)
            # per class, before and after: what calibration changed (the features are the same, only the head moved)
            inputs = framework.features(start, test, task.plan)
            answer["class_accuracy_before"] = class_accuracy(inputs, test.y, *framework.head(start))
            answer["class_accuracy"] = class_accuracy(inputs, test.y, refit.weight, refit.bias)
    elif task.role == "evaluate":
        assert test is not None
        with _client(task) as client:
            layers = _download(client, task.aggregate_id)
            answer["accuracy"] = framework.score(layers, test, task.plan)
            # the terminal's figure, for the dashboard to plot beside the leaves' (sent with the evaluator's
            # credentials, the first leaf's: the dashboard shows this metric as one line, not per leaf)
            client.send_performance_metrics(str(task.aggregate_id), {COMMON_TEST_METRIC: answer["accuracy"]}, "test")
    elif task.role in ("local", "centralized"):
        assert data is not None and test is not None
        scores: dict[int, float] = {}
        framework.train(data, test, task.plan, lambda number, accuracy: scores.__setitem__(number, accuracy))
        answer["accuracy"] = [scores[number] for number in sorted(scores)]
    else:
        state = None
    answer["seconds"] = round(time.monotonic() - started, 3)
    return answer, state


def _turn(task: LeafTask, framework: Any, data: Split, held: Split, state: Any) -> tuple[int, Any]:
    """Start from the latest aggregate (or the seeded initial model), score it on this leaf's held-out data (the
    ``test`` metrics the dashboard plots per leaf), train one round's epochs on the rest, upload.

    ``state`` (this leaf's previous turn's): the optimizer's state and, in a SCAFFOLD branch, the leaf's control
    variates and the control update its last upload carried (committed now that an aggregate holds it).
    """
    state = state if isinstance(state, dict) else {"optimizer": state}
    with _client(task) as client:
        start, controls = _download(client, task.aggregate_id, controls=True) if task.aggregate_id else (None, [])
        if start is not None:
            _score_own(client, framework, task, start, held)
        scaffold = None
        if task.scaffold:
            scaffold = ScaffoldLeaf()
            scaffold.load_state_dict(state.get("scaffold") or {})
            if start is not None:
                scaffold.commit(state.get("pending"), controls or None, start)
        # each round its own batch order, the same on every backend
        plan = replace(task.plan, data_seed=task.plan.data_seed * 1000 + task.round)
        layers, optimizer = framework.train_turn(data, plan, task.round, start, task.proximal_mu,
                                                 state.get("optimizer"), accelerator=task.accelerator,
                                                 scaffold=scaffold)
        pending = scaffold.prepare(layers) if scaffold is not None else None
        client.encoding.load_state_dict(state.get("feedback") or {})  # error feedback: the leaf's residual so far
        _upload(client, len(data), layers, pending.delta if pending is not None else ())
        feedback = client.encoding.state_dict()
    logger.info("%s uploaded round %d (%d samples)", task.name, task.round, len(data))
    return len(data), {"optimizer": optimizer, "pending": pending, "feedback": feedback,
                       "scaffold": scaffold.state_dict() if scaffold is not None else None}


def _send_statistics(client: Any, framework: Any, task: LeafTask, layers: list[np.ndarray], data: Split) -> int:
    """Send this leaf's calibration statistics of ``layers`` (the last aggregate) as an analytics upload; return
    the bytes of values it carries. The simulation waits for the round, not the leaf (a turn never blocks)."""
    weight, _ = framework.head(layers)
    fields, _ = head_statistics(framework.features(layers, data, task.plan), data.y, num_classes=weight.shape[0],
                                min_class_count=task.min_class_count)
    client.upload_fields(fields)
    return sum(value.nbytes for value in fields.values())


def _calibrated(client: Any, framework: Any, task: LeafTask) -> tuple[list[np.ndarray], list[np.ndarray], HeadRefit]:
    """The last aggregate, and it with its final layer refit from the calibration round's statistics (float64
    NumPy, closed-form: the same bytes on every leaf)."""
    layers = _download(client, task.aggregate_id)
    stats = HeadStatistics.from_fields(client.download_analytics(str(task.analytics_id)).fields)
    weight, bias = framework.head(layers)
    refit = refit_head(stats, weight, bias)
    return layers, framework.with_head(layers, refit.weight, refit.bias), refit


def _upload(client: Any, weighting: float, layers: list[np.ndarray], controls: Any) -> None:
    """Upload the turn's model; a run paused meanwhile (409) holds it until the run starts again (the client
    waits for the run: ``wait_for_run``), as the callbacks' wait does."""
    while True:
        try:
            client.upload_arrays(weighting, layers, controls=controls)
            return
        except RequestRejectedError as exc:
            if exc.status_code != 409:
                raise
            logger.info("upload refused while the run is not started (%s); waiting for the run", exc)
            client.get_run_details()  # the run's status now: the next upload_arrays waits while it is not 'start'
            time.sleep(0.2)  # a 409 that persists while the run says 'start' must not spin


def _score_own(client: Any, framework: Any, task: LeafTask, layers: list[np.ndarray], held: Split) -> float:
    """The aggregate ``task.aggregate_id`` (``layers``) on the held-out part of this leaf's own data (never
    trained on), sent as the round's ``test`` metrics: the dashboard's per-leaf accuracy."""
    accuracy = float(framework.score(layers, held, task.plan))
    client.send_performance_metrics(str(task.aggregate_id), {HELDOUT_METRIC: accuracy}, "test")
    return accuracy


def _client(task: LeafTask) -> Any:
    from ..core.client import Client  # the core, not the callbacks: a turn needs no wait and no notifications

    # a few retries only: a simulation's server is local, and a failure must show in the report, not hang
    # a paused run (the dashboard's pause button) holds the turn's upload until it starts again
    return Client(task.credentials, host=task.host, transport="none", max_retries=3, wait_for_run=True,
                  quantize=task.quantize, error_feedback=task.error_feedback)


def _download(client: Any, aggregate_id: str | None, controls: bool = False) -> Any:
    """The aggregate's layers (with ``controls``: and its SCAFFOLD controls), in memory of their own."""
    if aggregate_id is None:
        raise ValueError("Expected an aggregate id to download. Received: None")
    archive = client.download_aggregate(aggregate_id, expected_bytes=64 * 1024 * 1024)
    layers = [np.array(layer, copy=True) for layer in archive.layers]  # own memory: the buffer is the client's
    return (layers, [np.array(c, copy=True) for c in archive.controls]) if controls else layers
