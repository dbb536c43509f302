"""One simulation run: data to leaves, the embedded server and its branch, the rounds driven turn by turn
on a backend (:mod:`.backends`), the polling loop that turns the server's rounds into progress events, and
the numbers that become the report.

Each round, the round's leaves (all of them, or ``leaves_per_round`` drawn by the seed) get a turn that
starts from the latest aggregate; when the server has aggregated the round, the next round's turns go out
and the aggregate is scored on the common test set. The baselines (each leaf alone, all the data) run
beside the rounds.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from ..core.protocol import CONTROLLED_ALGORITHMS
from .backends import Backend, make_backend
from .config import SimulationConfig
from .data import Split, load_digits_split, partition
from .local_server import EmbeddedServer
from .progress import ProgressHook, RoundTracker, Stage
from .report import LeafSummary, Report, RoundRow, strategy_label
from .calibration import CalibrationRound
from .supervisor import raise_if_stopped
from .turns import LeafTask
from ..core.errors import SimulationError
from ..core.protocol import ADMIN_PREFIX

logger = logging.getLogger(__name__)

CENTRALIZED = "centralized"
EVALUATOR = "evaluate"
_POLL_S = 0.2


class Simulation:
    """Runs ``config`` in ``workdir`` (data, credentials, logs) and reports each step to ``emit``."""

    def __init__(self, config: SimulationConfig, workdir: Path, emit: ProgressHook,
                 hold: Callable[[Report], None] | None = None) -> None:
        self.config, self.workdir, self.emit, self.hold = config, workdir, emit, hold
        self.branch_id = ""
        self.strategy_params: dict[str, float] = {}  # all of them, as the server applies them (defaults included)
        self.schedule = config.sample()  # per round, the indexes of the leaves that train it

    def run(self) -> Report:
        config = self.config
        train, test = load_digits_split(seed=config.seed)
        parts = partition(train, config.leaves, config.partition, alpha=config.alpha,
                          min_samples=config.min_samples, seed=config.seed)
        sizes = [len(p) for p in parts]
        self.emit(Stage(f"{config.framework}: {config.leaves} leaves"
                        + (f" ({config.per_round} a round, drawn by the seed)" if config.per_round < config.leaves else "")
                        + f" x {config.rounds} rounds x {config.epochs_per_round} epoch(s), {config.partition} "
                        f"partition, samples per leaf {sizes if len(sizes) <= 20 else f'{min(sizes)}-{max(sizes)}'}, "
                        f"common test set {len(test)}; {strategy_label(config.as_dict())}"))
        backend = make_backend(config.backend, self.workdir, address=config.ray_address, leaf_cpus=config.leaf_cpus,
                               leaf_gpus=config.leaf_gpus, max_concurrent_leaves=config.max_concurrent_leaves)
        # every aggregate kept (a throwaway store): the evaluator may score a round after later ones closed
        with EmbeddedServer(self.workdir / "server", config.amqp_url, serve_args=("--keep-rounds", "0"),
                            host=config.advertise_host) as server:
            min_leaves = config.per_round if config.per_round < config.leaves else None
            branch, credentials = server.create_branch(config.leaves, config.strategy, config.strategy_params,
                                                       min_leaves=min_leaves)
            self.branch_id, self.strategy_params = branch["id"], branch["strategy_params"]
            if config.quantize is not None:  # the branch advertises the codec, so the leaves' quantize= applies
                server.admin("PUT", f"{ADMIN_PREFIX}/branches/{branch['id']}/codecs", {"codecs": [config.quantize]})
            names = [c["name"] for c in credentials]
            if config.dashboard:
                link = server.dashboard_link()
                data = server.data_dir  # where a locked-out user finds the admin token and a new link
                self.emit(Stage(f"dashboard {link} (one-time login link; a new one: 'branchkey-local login "
                                f"--data-dir {data}'; the admin token is in {data / 'admin_token'})", link=link))
            shards: dict[str, Split | None] = {**dict(zip(names, parts)), EVALUATOR: None}
            if config.baselines:
                shards[CENTRALIZED] = train
            try:
                where = backend.start(shards, test)
                self.emit(Stage(f"branchkey-local at {server.url}; leaves run as {where}"
                                + ("" if config.baselines else " (no baselines)")))
                tracker = RoundTracker(config.rounds, {c["id"]: c["name"] for c in credentials}, config.per_round)
                run = _Run(self, server, backend, credentials, tracker)
                run.drive()
                # every round is in: the run reads as finished (stopped after N rounds) in status and the
                # dashboard, not as a next round that every leaf is missing
                server.admin("POST", f"{ADMIN_PREFIX}/branches/{self.branch_id}/run", {"run_status": "stop"})
            finally:
                backend.close()
                server.forget_broker_leaves(credentials)
            report = self._report(run, names, parts)
            if self.hold is not None:  # the server, and so its dashboard, stays up until it returns
                self.hold(report)
        return report

    def task(self, role: str, name: str, number: int, index: int = 0, credentials: dict[str, str] | None = None,
             host: str = "", aggregate_id: str | None = None, **calibration: Any) -> LeafTask:
        plan = dataclasses.replace(self.config.plan(), data_seed=self.config.seed * 1000 + index)
        gpu = self.config.backend == "ray" and self.config.leaf_gpus > 0 and role == "turn"
        return LeafTask(role=role, name=name, framework=self.config.framework, round=number, plan=plan,
                        credentials=credentials or {}, host=host, aggregate_id=aggregate_id,
                        proximal_mu=self.config.proximal_mu, accelerator="gpu" if gpu else "cpu",
                        scaffold=self.config.strategy in CONTROLLED_ALGORITHMS, quantize=self.config.quantize,
                        error_feedback=self.config.error_feedback, min_class_count=self.config.min_class_count,
                        **calibration)

    def _report(self, run: "_Run", names: list[str], parts: list[Split]) -> Report:
        config = self.config
        rows = []
        for number in range(1, config.rounds + 1):
            local = statistics.fmean(run.local[name][number - 1] for name in names) if config.baselines else None
            centralized = run.centralized[number - 1] if config.baselines else None
            rows.append(RoundRow(number, run.tracker.accuracy[number], local, centralized,
                                 run.tracker.wait_s.get(number, 0.0),
                                 [names[i] for i in self.schedule[number - 1]]))
        leaves = [LeafSummary(name, len(part), part.label_counts(),
                              run.local[name][-1] if config.baselines else None,
                              rounds=sum(index in chosen for chosen in self.schedule),
                              nodes=sorted(run.nodes[name]))
                  for index, (name, part) in enumerate(zip(names, parts))]
        return Report(config=config.as_dict() | {"amqp_url": bool(config.amqp_url),
                                                 "strategy_params": self.strategy_params}, rounds=rows, leaves=leaves,
                      calibration=run.calibration.report() if run.calibration is not None else None)


class _Run:
    """The loop of one run: hand out turns round by round, collect answers, follow the server's rounds."""

    def __init__(self, simulation: Simulation, server: EmbeddedServer, backend: Backend,
                 credentials: list[dict[str, str]], tracker: RoundTracker) -> None:
        self.sim, self.server, self.backend, self.credentials, self.tracker = (
            simulation, server, backend, credentials, tracker)
        self.config = simulation.config
        self.nodes: dict[str, set[str]] = defaultdict(set)
        self.local: dict[str, list[float]] = {}
        self.centralized: list[float] = []
        self.turns_left = sum(len(chosen) for chosen in simulation.schedule)
        self.handed = 0  # the last round whose turns went out
        self.calibration = CalibrationRound(self) if self.config.calibrate_head else None

    def drive(self) -> None:
        config, sim = self.config, self.sim
        if config.baselines:
            self.backend.submit(sim.task(CENTRALIZED, CENTRALIZED, config.rounds), CENTRALIZED)
        self._hand_out(1, None)
        deadline = time.monotonic() + config.timeout_s
        announced = False
        while not self._finished():
            raise_if_stopped()  # a Ctrl-C or SIGTERM whose exception a finalizer swallowed still stops the run
            for answer in self.backend.poll():
                self._take(answer)
            self.server.check_alive()
            if len(self.tracker.completed) < config.rounds:
                self._poll_rounds()
            elif self.calibration is not None and self.turns_left == 0:
                self.calibration.poll()
            elif not announced and config.baselines:
                announced = True
                self.sim.emit(Stage("federated rounds done; waiting for the local-only and centralized baselines"))
            if time.monotonic() > deadline:
                raise SimulationError(f"the simulation did not finish within timeout_s={config.timeout_s} s "
                                      f"(rounds done: {len(self.tracker.completed)} of {config.rounds}). Raise "
                                      "timeout_s, or use fewer leaves, rounds or epochs.")
            time.sleep(_POLL_S)

    def _finished(self) -> bool:
        baselines = not self.config.baselines or (
            len(self.local) == self.config.leaves and len(self.centralized) == self.config.rounds)
        calibrated = self.calibration is None or self.calibration.done
        return len(self.tracker.completed) == self.config.rounds and self.turns_left == 0 and baselines and calibrated

    def _hand_out(self, number: int, aggregate_id: str | None) -> None:
        self.handed = number
        for index in self.sim.schedule[number - 1]:
            creds = self.credentials[index]
            self.backend.submit(self.sim.task("turn", creds["name"], number, index + 1, creds, self.server.url,
                                              aggregate_id), creds["name"])

    def _take(self, answer: dict[str, Any]) -> None:
        role, name = answer["role"], answer["name"]
        if role in ("turn", "score"):
            self.turns_left -= 1
            if "calibration_bytes" in answer and self.calibration is not None:
                self.calibration.upload_bytes.append(answer["calibration_bytes"])
                self.calibration.statistics_seconds.append(answer["statistics_seconds"])
            if role == "turn":  # where the leaf trained
                self.nodes[name].add(answer["node"])
        elif role == "calibrate":
            assert self.calibration is not None
            self.calibration.take(answer)
        elif role == "evaluate":
            self.tracker.accuracy[answer["round"]] = answer["accuracy"]
        elif role == "local":
            self.local[name] = answer["accuracy"]
        elif role == CENTRALIZED:
            self.centralized = answer["accuracy"]

    def _poll_rounds(self) -> None:
        server, branch = self.server, self.sim.branch_id
        rounds = server.admin("GET", f"{ADMIN_PREFIX}/branches/{branch}/rounds")["rounds"]
        uploads = server.admin("GET", f"{ADMIN_PREFIX}/branches/{branch}/uploads")["uploads"]
        first = min((r["round_index"] for r in rounds), default=0)
        for row in rounds:
            number = row["round_index"] - first + 1
            if row["status"] == "aggregated" and number == self.handed and row.get("aggregate_id"):
                self._round_done(number, row["aggregate_id"])
        for progress in self.tracker.update(rounds, uploads, time.time()):
            self.sim.emit(progress)

    def _round_done(self, number: int, aggregate_id: str) -> None:
        """Round ``number`` is aggregated: score it, and start the next round from it (or the baselines)."""
        first = self.credentials[0]
        self.backend.submit(self.sim.task(EVALUATOR, EVALUATOR, number, 0, first, self.server.url, aggregate_id),
                            EVALUATOR)
        if number < self.config.rounds:
            self._hand_out(number + 1, aggregate_id)
            return
        self.handed = self.config.rounds + 1  # nothing more to hand out
        last = set(self.sim.schedule[-1])  # with calibrate_head, the last round's leaves send their statistics
        if self.calibration is not None:
            self.calibration.start(aggregate_id, len(last))
        for index, creds in enumerate(self.credentials):  # the last aggregate, scored by each leaf as turns do
            self.turns_left += 1
            self.backend.submit(self.sim.task("score", creds["name"], number, index + 1, creds, self.server.url,
                                              aggregate_id, calibrate=self.config.calibrate_head and index in last),
                                creds["name"])
        if self.config.baselines:
            for index, creds in enumerate(self.credentials):
                self.backend.submit(self.sim.task("local", creds["name"], self.config.rounds, index + 1),
                                    creds["name"])


