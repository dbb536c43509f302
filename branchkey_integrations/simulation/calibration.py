"""The calibration round of a simulation (``calibrate_head``): after the last round, the leaves of that round
send their class statistics of the last aggregate's features (their ``score`` task does it, as one analytics
upload each); once the server has combined them, every leaf and the evaluator get a ``calibrate`` task that
refits the final layer from the combined statistics. The leaves answer the digest of their layer, the evaluator
also the calibrated model's accuracy on the common test set; :meth:`CalibrationRound.report` says whether every
digest is the same.

Example:
    >>> CalibrationRound.summary([{"digest": "ab", "refit": [0, 1], "untouched": [2]},
    ...                           {"digest": "ab", "refit": [0, 1], "untouched": [2], "accuracy": 0.9}])
    {'accuracy': 0.9, 'identical': True, 'digest': 'ab', 'refit': [0, 1], 'untouched': [2]}
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..core.protocol import ADMIN_PREFIX
from .progress import Stage

logger = logging.getLogger(__name__)


class CalibrationRound:
    """Follows one simulation's calibration round. ``run`` is the simulation's loop (its server, backend,
    credentials and task factory); :meth:`start` is called with the last aggregate, :meth:`poll` until the
    analytics aggregate is there, :meth:`take` with each ``calibrate`` answer."""

    def __init__(self, run: Any) -> None:
        self.run = run
        self.aggregate_id: str | None = None
        self.analytics_id: str | None = None
        self.senders = 0
        self.upload_bytes: list[int] = []
        self.answers: list[dict[str, Any]] = []
        self.statistics_seconds: list[float] = []  # each sender's computing and sending of its statistics
        self.started = 0.0
        self.seconds = 0.0
        self.waited_from: float | None = None  # when every score task (and so every statistics upload) was done
        self.added_seconds = 0.0

    def start(self, aggregate_id: str, senders: int) -> None:
        self.aggregate_id, self.senders, self.started = aggregate_id, senders, time.monotonic()

    @property
    def done(self) -> bool:
        return self.analytics_id is not None and len(self.answers) == len(self.run.credentials) + 1

    def poll(self) -> None:
        """Hand out the refits once the server has combined the statistics."""
        if self.analytics_id is not None:
            return
        if self.waited_from is None:  # said now, after the last round's line (a round's line waits for its score)
            self.waited_from = time.monotonic()
            self.run.sim.emit(Stage(f"calibration: {self.senders} leaves sent the class statistics of the last "
                                    "aggregate's features; the server combines them"))
        server, branch = self.run.server, self.run.sim.branch_id
        rows = server.admin("GET", f"{ADMIN_PREFIX}/branches/{branch}/analytics")["analytics"]
        done = [row for row in rows if row["status"] == "aggregated" and row.get("aggregate_id")]
        if not done:
            return
        self.analytics_id = str(done[0]["aggregate_id"])  # newest first: a run has one calibration round
        sim, number, url = self.run.sim, self.run.config.rounds, server.url
        for index, creds in enumerate(self.run.credentials):
            self.run.backend.submit(sim.task("calibrate", creds["name"], number, index + 1, creds, url,
                                             self.aggregate_id, analytics_id=self.analytics_id), creds["name"])
        first = self.run.credentials[0]
        self.run.backend.submit(sim.task("calibrate", "evaluate", number, 0, first, url, self.aggregate_id,
                                         analytics_id=self.analytics_id), "evaluate")

    def take(self, answer: dict[str, Any]) -> None:
        self.answers.append(answer)
        if self.done:
            now = time.monotonic()
            self.seconds = now - self.started
            # what the run waits for because of calibration: the round and the refits after the scores, and the
            # slowest leaf's statistics inside its score task
            self.added_seconds = now - (self.waited_from or now) + max(self.statistics_seconds, default=0.0)
            summary = self.summary(self.answers)
            self.run.sim.emit(Stage(f"calibration: final layer refit on every leaf "
                                    f"({'identical' if summary['identical'] else 'NOT identical'}); "
                                    f"accuracy {100 * summary['accuracy']:.1f}%"
                                    + (f"; classes sent by no leaf, left as they were: {summary['untouched']}"
                                       if summary["untouched"] else "")))

    @staticmethod
    def summary(answers: list[dict[str, Any]]) -> dict[str, Any]:
        """The evaluator's accuracy (and per class, before and after), its digest, and whether every answer has that
        digest."""
        evaluator = next(answer for answer in answers if "accuracy" in answer)
        return {"accuracy": evaluator["accuracy"],
                "identical": all(answer["digest"] == evaluator["digest"] for answer in answers),
                "digest": evaluator["digest"], "refit": evaluator["refit"], "untouched": evaluator["untouched"],
                **{key: evaluator[key] for key in ("class_accuracy_before", "class_accuracy") if key in evaluator}}

    def report(self) -> dict[str, Any]:
        return self.summary(self.answers) | {
            "leaves": len(self.answers) - 1, "senders": self.senders,
            "upload_bytes": max(self.upload_bytes, default=0), "seconds": round(self.seconds, 2),
            "added_seconds": round(self.added_seconds, 2),
            "statistics_seconds": round(max(self.statistics_seconds, default=0.0), 3),
            "task_seconds": round(sum(answer.get("seconds", 0.0) for answer in self.answers), 2)}


__all__ = ["CalibrationRound"]
