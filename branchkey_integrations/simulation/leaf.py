"""One simulated site in a process of its own: ``python -m branchkey_integrations.simulation.leaf JOB.json``.

A ``leaf`` job trains federated through the framework's real callback, then (unless ``local_only`` is
off) trains the same model on its own data alone (the local-only comparison); a ``centralized`` job
trains on all the data. Every round's test accuracy is appended to the job's events file as one JSON
line, which the parent polls.
A process of its own, because that is what a leaf is: separate memory, its own client, its own
sockets, and a crash that cannot take the others down.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .data import Split
from .frameworks import FederationTarget, TrainPlan, load_framework

logger = logging.getLogger(__name__)

ROLES = ("leaf", "centralized")
_ORPHAN_EXIT = 70  # the parent vanished (kill -9): nobody would ever read our results


@dataclass(frozen=True)
class LeafJob:
    """Everything a leaf process needs, written by the parent as JSON."""

    role: str
    name: str
    framework: str
    data: str
    test: str
    events: str
    plan: TrainPlan
    federation: FederationTarget | None = None
    parent_pid: int = 0
    local_only: bool = True  # a leaf also trains alone afterwards (the local-only baseline)

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LeafJob":
        raw: dict[str, Any] = json.loads(Path(path).read_text(encoding="utf-8"))
        federation = raw.pop("federation")
        plan = TrainPlan(**raw.pop("plan"))
        return cls(**raw, plan=plan, federation=FederationTarget(**federation) if federation else None)


class EventWriter:
    """Appends one JSON object per line and flushes it, so the parent sees each round as it ends."""

    def __init__(self, path: str | Path) -> None:
        self._handle = open(path, "a", encoding="utf-8")

    def write(self, **event: Any) -> None:
        self._handle.write(json.dumps(event) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


class EventReader:
    """Reads the lines a leaf has appended since the last call; a half-written last line waits."""

    def __init__(self, path: str | Path) -> None:
        self.path, self._offset = Path(path), 0

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


def _exit_when_orphaned(parent_pid: int) -> None:
    """The parent cleans up its children; if it is killed outright, a leaf must not train on forever."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(_ORPHAN_EXIT)

    if parent_pid:
        threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def _exit_on_sigterm() -> None:
    """Exit at once on SIGTERM: the parent sends it to stop the simulation, and a leaf has nothing to save.
    (Lightning's own handler only notes the signal, and a leaf waiting for an aggregate would linger.)"""
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(128 + signum))


def run_job(job: LeafJob) -> None:
    """Run a job to the end; every round's accuracy goes to the events file."""
    framework = load_framework(job.framework)
    data, test = Split.load(job.data), Split.load(job.test)
    events = EventWriter(job.events)
    try:
        if job.role == "leaf":
            framework.train(data, test, job.plan, lambda r, a: events.write(kind="federated", round=r, accuracy=a),
                            federation=job.federation)
            if job.local_only:
                framework.train(data, test, job.plan, lambda r, a: events.write(kind="local", round=r, accuracy=a))
        elif job.role == "centralized":
            framework.train(data, test, job.plan, lambda r, a: events.write(kind="centralized", round=r, accuracy=a))
        else:
            raise ValueError(f"Expected role in {ROLES}. Received: role={job.role!r}")
        events.write(kind="done")
    finally:
        events.close()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        raise SystemExit("usage: python -m branchkey_integrations.simulation.leaf JOB.json")
    job = LeafJob.load(argv[0])
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {job.name} %(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", module="lightning")  # framework chatter would bury the errors in the log
    _exit_when_orphaned(job.parent_pid)
    _exit_on_sigterm()
    run_job(job)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
