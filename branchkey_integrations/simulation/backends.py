"""Where a simulation's leaves run: the simulation-backend seam.

The orchestrator decides *what* runs (which leaf trains which round, which aggregate gets scored); a
:class:`Backend` decides *where*: ``process`` (the default: one worker process per leaf on this machine,
nothing to install) or ``ray`` (:mod:`.ray_backend`: Ray tasks on a local Ray or a cluster, at most
``max_concurrent_leaves`` at once). Both run the same leaf code, :func:`~.turns.run_task`, so the same seed
gives the same aggregates on either.

A backend is told the data once (:meth:`Backend.start`: each worker's shard and the common test set), then
takes tasks (:meth:`Backend.submit`, naming the worker whose data the task trains on), hands back answers as
they finish (:meth:`Backend.poll`, which raises :class:`~branchkey_integrations.core.errors.LeafFailedError`
with the leaf's log when one dies), and stops everything it started (:meth:`Backend.close`, also on Ctrl-C
and SIGTERM).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Protocol

from .data import Split
from .leaf import Inbox
from .supervisor import Supervisor
from .turns import LeafTask

logger = logging.getLogger(__name__)

BACKENDS = ("process", "ray")


class Backend(Protocol):
    """What the orchestrator needs of a place to run leaves."""

    def start(self, shards: dict[str, Split | None], test: Split) -> str:
        """Place each worker's data (``None``: a worker without training data, the evaluator) and the test
        set; return a line that says where the leaves run."""

    def submit(self, task: LeafTask, worker: str) -> None:
        """Run ``task`` on ``worker``'s data, when the backend has room."""

    def poll(self) -> list[dict[str, Any]]:
        """The answers of the tasks that finished since the last call; raise LeafFailedError for a dead one."""

    def close(self) -> None:
        """Stop every task, worker and runtime this backend started (idempotent)."""


class ProcessBackend:
    """One worker process per leaf (plus the evaluator and the centralized baseline), each fed through its
    :class:`~.leaf.Inbox`; a worker runs its tasks one after the other."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.supervisor = Supervisor()
        self.inboxes: dict[str, Inbox] = {}

    def start(self, shards: dict[str, Split | None], test: Split) -> str:
        test.save(self.workdir / "test.npz")
        for name, shard in shards.items():
            if shard is not None:
                shard.save(self.workdir / f"{name}.npz")
            self.inboxes[name] = Inbox(self.workdir / f"{name}.inbox")
            self.supervisor.start(name, ["-m", "branchkey_integrations.simulation.leaf", str(self.workdir), name],
                                  self.workdir / f"{name}.log")
        return f"{len(shards)} worker processes on this machine (pid {os.getpid()}'s children)"

    def submit(self, task: LeafTask, worker: str) -> None:
        self.inboxes[worker].put(task)

    def poll(self) -> list[dict[str, Any]]:
        answers = [answer for inbox in self.inboxes.values() for answer in inbox.answers()]
        self.supervisor.check(set())  # a worker exits only when told to, or stopped: any exit is a failure
        return answers

    def close(self) -> None:
        self.supervisor.stop_all()


def make_backend(name: str, workdir: Path, **ray_options: Any) -> Backend:
    """The backend called ``name``; ``ray_options`` go to :class:`~.ray_backend.RayBackend`."""
    if name == "process":
        return ProcessBackend(workdir)
    if name == "ray":
        from .ray_backend import RayBackend  # imports ray only when asked for

        return RayBackend(**ray_options)
    raise ValueError(f"Expected backend in {BACKENDS}. Received: backend={name!r}")
