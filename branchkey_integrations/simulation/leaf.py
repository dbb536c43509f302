"""A leaf worker of the process backend: ``python -m branchkey_integrations.simulation.leaf WORKDIR NAME``.

The worker loads its data once (``WORKDIR/NAME.npz``, and ``WORKDIR/test.npz``), then runs the tasks the
parent drops into ``WORKDIR/NAME.inbox/`` (``000001.json``, ``000002.json``, ...) in order, each through
:func:`~.turns.run_task`, and writes each answer next to it (``000001.answer.json``, renamed into place, so
the parent never reads half of one). An ``exit`` task ends it. Any error ends it with status 1 and the
traceback in its log, which the parent reports.
A process of its own, because that is what a leaf is: separate memory, its own client, its own sockets, and
a crash that cannot take the others down; one per leaf for the whole run, so the framework is imported once.
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
from pathlib import Path
from typing import Any

from .data import Split
from .turns import LeafTask, run_task

logger = logging.getLogger(__name__)

_ORPHAN_EXIT = 70  # the parent vanished (kill -9): nobody would ever read our results
_POLL_S = 0.05


class Inbox:
    """The parent's side and the worker's side of one worker's task folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.sent = 0  # parent: tasks written
        self.read = 0  # parent: answers taken

    def put(self, task: LeafTask) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.sent += 1
        path = self.folder / f"{self.sent:06d}.json"
        path.with_suffix(".tmp").write_text(json.dumps(task.as_dict()), encoding="utf-8")
        path.with_suffix(".tmp").replace(path)

    def answers(self) -> list[dict[str, Any]]:
        """Answers that arrived since the last call, in task order."""
        found = []
        while self.read < self.sent:
            path = self.folder / f"{self.read + 1:06d}.answer.json"
            if not path.exists():
                break
            found.append(json.loads(path.read_text(encoding="utf-8")))
            self.read += 1
        return found

    @property
    def pending(self) -> int:
        return self.sent - self.read


def _exit_when_orphaned(parent_pid: int) -> None:
    """The parent cleans up its children; if it is killed outright, a leaf must not train on forever."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(_ORPHAN_EXIT)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def serve(workdir: Path, name: str) -> None:
    """Run the tasks of ``WORKDIR/NAME.inbox`` in order until an ``exit`` task."""
    data_path, test_path = workdir / f"{name}.npz", workdir / "test.npz"
    data = Split.load(data_path) if data_path.exists() else None
    test = Split.load(test_path) if test_path.exists() else None
    folder, number, state = workdir / f"{name}.inbox", 1, None
    while True:
        path = folder / f"{number:06d}.json"
        if not path.exists():
            time.sleep(_POLL_S)
            continue
        task = LeafTask.from_dict(json.loads(path.read_text(encoding="utf-8")))
        if task.role == "exit":
            return
        answer, new_state = run_task(task, data, test, state)
        state = new_state if task.role == "turn" else state  # the optimizer's, for this leaf's next turn
        done = folder / f"{number:06d}.answer.json"
        done.with_suffix(".tmp").write_text(json.dumps(answer), encoding="utf-8")
        done.with_suffix(".tmp").replace(done)
        number += 1


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        raise SystemExit("usage: python -m branchkey_integrations.simulation.leaf WORKDIR NAME")
    workdir, name = Path(argv[0]), argv[1]
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", module="lightning")  # framework chatter would bury the errors in the log
    _exit_when_orphaned(os.getppid())
    # exit at once on SIGTERM: the parent sends it to stop the simulation, and a leaf has nothing to save
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(128 + signum))
    serve(workdir, name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
