"""One simulation run: data to leaves, the embedded server and its branch, the leaf processes, the
polling loop that turns their progress into events, and the numbers that become the report."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

from .config import SimulationConfig
from .data import Split, load_digits_split, partition
from .frameworks import FederationTarget
from .leaf import EventReader, LeafJob
from .local_server import EmbeddedServer
from .progress import ProgressHook, RoundTracker, Stage
from .report import LeafSummary, Report, RoundRow, strategy_label
from ..core.errors import SimulationError
from ..core.protocol import ADMIN_PREFIX
from .supervisor import Supervisor

logger = logging.getLogger(__name__)

CENTRALIZED = "centralized"
_POLL_S = 0.2

#: job name -> event kind ("federated", "local", "centralized") -> round -> test accuracy
Results = dict[str, dict[str, dict[int, float]]]


class Simulation:
    """Runs ``config`` in ``workdir`` (data, credentials, logs) and reports each step to ``emit``."""

    def __init__(self, config: SimulationConfig, workdir: Path, emit: ProgressHook,
                 hold: Callable[[Report], None] | None = None) -> None:
        self.config, self.workdir, self.emit, self.hold = config, workdir, emit, hold
        self.branch_id = ""
        self.strategy_params: dict[str, float] = {}  # all of them, as the server applies them (defaults included)

    def run(self) -> Report:
        config = self.config
        train, test = load_digits_split(seed=config.seed)
        parts = partition(train, config.leaves, config.partition, alpha=config.alpha,
                          min_samples=config.min_samples, seed=config.seed)
        self.emit(Stage(f"{config.framework}: {config.leaves} leaves x {config.rounds} rounds x "
                        f"{config.epochs_per_round} epoch(s), {config.partition} partition, samples per leaf "
                        f"{[len(p) for p in parts]}, common test set {len(test)}; "
                        f"{strategy_label(config.as_dict())}"))
        test_path = test.save(self.workdir / "test.npz")
        with EmbeddedServer(self.workdir / "server", config.amqp_url) as server, Supervisor() as supervisor:
            branch, credentials = server.create_branch(config.leaves, config.strategy, config.strategy_params)
            self.branch_id, self.strategy_params = branch["id"], branch["strategy_params"]
            names = [c["name"] for c in credentials]
            if config.dashboard:
                link = server.dashboard_link()
                self.emit(Stage(f"dashboard {link} (one-time login link)", link=link))
            self.emit(Stage(f"branchkey-local at {server.url}; starting {len(names)} leaf processes"
                            + (" and the centralized baseline" if config.baselines else " (no baselines)")))
            readers = self._start(supervisor, server, credentials, parts, train, test_path)
            tracker = RoundTracker(config.rounds, {c["id"]: c["name"] for c in credentials})
            try:
                results = self._watch(server, supervisor, readers, tracker, names)
            finally:
                server.forget_broker_leaves(credentials)
            report = self._report(results, names, parts, tracker)
            if self.hold is not None:  # the server, and so its dashboard, stays up until it returns
                self.hold(report)
        return report

    def _start(self, supervisor: Supervisor, server: EmbeddedServer, credentials: list[dict[str, str]],
               parts: list[Split], train: Split, test_path: Path) -> dict[str, EventReader]:
        transport = "amqp" if self.config.amqp_url else "websocket"
        readers = {}
        for index, (creds, part) in enumerate(zip(credentials, parts)):
            creds_path = self.workdir / f"{creds['name']}.credentials.json"
            creds_path.write_text(json.dumps(creds), encoding="utf-8")
            creds_path.chmod(0o600)
            target = FederationTarget(str(creds_path), server.url, transport, self.config.round_timeout_s,
                                      self.config.proximal_mu)
            readers[creds["name"]] = self._launch(supervisor, creds["name"], "leaf", part, test_path, index + 1,
                                                  target)
        if self.config.baselines:
            readers[CENTRALIZED] = self._launch(supervisor, CENTRALIZED, CENTRALIZED, train, test_path, 0, None)
        return readers

    def _launch(self, supervisor: Supervisor, name: str, role: str, data: Split, test_path: Path, index: int,
                federation: FederationTarget | None) -> EventReader:
        plan = dataclasses.replace(self.config.plan(), data_seed=self.config.seed * 1000 + index)
        job = LeafJob(role=role, name=name, framework=self.config.framework,
                      data=str(data.save(self.workdir / f"{name}.npz")), test=str(test_path),
                      events=str(self.workdir / f"{name}.events.jsonl"), plan=plan, federation=federation,
                      parent_pid=os.getpid(), local_only=self.config.baselines)
        job_path = job.save(self.workdir / f"{name}.job.json")
        supervisor.start(name, ["-m", "branchkey_integrations.simulation.leaf", str(job_path)],
                         self.workdir / f"{name}.log")
        return EventReader(job.events)

    def _watch(self, server: EmbeddedServer, supervisor: Supervisor, readers: dict[str, EventReader],
               tracker: RoundTracker, names: list[str]) -> Results:
        """Poll events, processes and the server until every job is done; raise on the first failure."""
        results: Results = defaultdict(lambda: defaultdict(dict))
        finished: set[str] = set()
        deadline = time.monotonic() + self.config.timeout_s
        baselines_announced = False
        while len(finished) < len(readers):
            for name, reader in readers.items():
                for event in reader.read():
                    if event["kind"] == "done":
                        finished.add(name)
                    else:
                        results[name][event["kind"]][event["round"]] = event["accuracy"]
            supervisor.check(finished)
            server.check_alive()
            for number, accuracy in results[names[0]]["federated"].items():
                tracker.accuracy[number] = accuracy
            if len(tracker.completed) < self.config.rounds:
                self._poll_rounds(server, tracker)
            elif not baselines_announced and self.config.baselines:
                baselines_announced = True
                self.emit(Stage("federated rounds done; waiting for the local-only and centralized baselines"))
            if time.monotonic() > deadline:
                raise SimulationError(f"the simulation did not finish within timeout_s={self.config.timeout_s} s "
                                      f"(finished: {sorted(finished) or 'none'}). Raise timeout_s, or use fewer "
                                      "leaves, rounds or epochs.")
            time.sleep(_POLL_S)
        if len(tracker.completed) < self.config.rounds:
            self._poll_rounds(server, tracker)  # the last accuracy came in with the leaves' final events
        supervisor.join(finished)
        return results

    def _poll_rounds(self, server: EmbeddedServer, tracker: RoundTracker) -> None:
        rounds = server.admin("GET", f"{ADMIN_PREFIX}/branches/{self.branch_id}/rounds")["rounds"]
        uploads = server.admin("GET", f"{ADMIN_PREFIX}/branches/{self.branch_id}/uploads")["uploads"]
        for progress in tracker.update(rounds, uploads, time.time()):
            self.emit(progress)

    def _report(self, results: Results, names: list[str], parts: list[Split], tracker: RoundTracker) -> Report:
        config = self.config
        _check_leaves_agree(results, names)
        rows = []
        for number in range(1, config.rounds + 1):
            local = statistics.fmean(results[name]["local"][number] for name in names) if config.baselines else None
            centralized = results[CENTRALIZED][CENTRALIZED][number] if config.baselines else None
            rows.append(RoundRow(number, results[names[0]]["federated"][number], local, centralized,
                                 tracker.wait_s.get(number, 0.0)))
        leaves = [LeafSummary(name, len(part), part.label_counts(),
                              results[name]["local"][config.rounds] if config.baselines else None)
                  for name, part in zip(names, parts)]
        return Report(config=config.as_dict() | {"amqp_url": bool(config.amqp_url),
                                                 "strategy_params": self.strategy_params}, rounds=rows, leaves=leaves)


def _check_leaves_agree(results: Results, names: list[str]) -> None:
    """Every leaf loaded the same aggregate, so every leaf must score it the same; say so if not."""
    for name in names[1:]:
        if results[name]["federated"] != results[names[0]]["federated"]:
            logger.warning("%s scored the global model differently from %s: %s vs %s", name, names[0],
                           results[name]["federated"], results[names[0]]["federated"])

