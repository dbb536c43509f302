"""Live progress of a simulation: what the parent learns each poll, turned into events, and a printer
for them. The library only emits events; printing is the terminal's (CLI) or the notebook's choice."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, TextIO, Union


@dataclass(frozen=True)
class Stage:
    """A step outside the rounds (starting the server, training the baselines); ``link``: the dashboard's."""

    text: str
    link: str | None = None


@dataclass(frozen=True)
class RoundProgress:
    """Where round ``round`` stands: who uploaded, how long the first uploader has waited, and, once the
    aggregate is in and evaluated, the global model's accuracy on the common test set."""

    round: int
    rounds: int
    uploaded: tuple[str, ...]
    leaves: int
    wait_s: float
    global_accuracy: float | None = None

    @property
    def complete(self) -> bool:
        return self.global_accuracy is not None


Event = Union[Stage, RoundProgress]
ProgressHook = Callable[[Event], None]


class RoundTracker:
    """Joins the server's rounds and uploads (admin API) with the accuracies leaves report, and yields
    a :class:`RoundProgress` only when something about a round changed."""

    def __init__(self, rounds: int, leaf_names: dict[str, str], per_round: int | None = None) -> None:
        self.rounds, self.leaf_names = rounds, leaf_names
        self.per_round = len(leaf_names) if per_round is None else per_round  # uploads that complete a round
        self.accuracy: dict[int, float] = {}
        self.wait_s: dict[int, float] = {}
        self.completed: set[int] = set()  # rounds already reported with their accuracy
        self._shown: dict[int, tuple[Any, ...]] = {}

    def update(self, server_rounds: list[dict[str, Any]], uploads: list[dict[str, Any]],
               now: float) -> list[RoundProgress]:
        first_index = min((r["round_index"] for r in server_rounds), default=0)
        changed = []
        for row in server_rounds:
            number = row["round_index"] - first_index + 1
            if number > self.rounds:
                continue  # the round the server opened after the last one: nobody will upload to it
            names = tuple(sorted(self.leaf_names.get(u["leaf_id"], u["leaf_id"]) for u in uploads
                                 if u["round_index"] == row["round_index"]))
            wait = _round_wait(row, now)
            if row["status"] == "aggregated":
                self.wait_s[number] = wait
            progress = RoundProgress(number, self.rounds, names, self.per_round, wait, self.accuracy.get(number))
            key = (names, row["status"], progress.global_accuracy, round(wait))
            if self._shown.get(number) != key:
                self._shown[number] = key
                changed.append(progress)
                if progress.complete:
                    self.completed.add(number)
        return changed


def _round_wait(row: dict[str, Any], now: float) -> float:
    """Seconds from the round's first upload to its aggregate (or to now, while it is open)."""
    if row.get("first_upload_at") is None:
        return 0.0
    end = now if row.get("closed_at") is None else datetime.fromisoformat(row["closed_at"]).timestamp()
    return max(0.0, end - float(row["first_upload_at"]))


class TerminalProgress:
    """Prints events: on a terminal the open round's line is rewritten in place; elsewhere (a pipe, a
    notebook) only finished rounds and stages are printed, one line each."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()

    def __call__(self, event: Event) -> None:
        if isinstance(event, Stage):
            self._line(event.text, final=True)
        elif event.complete or self.live:
            self._line(self._format(event), final=event.complete)

    @staticmethod
    def _format(event: RoundProgress) -> str:
        shown = event.uploaded if len(event.uploaded) <= 10 else (*event.uploaded[:5], f"... {len(event.uploaded) - 5} more")
        uploaded = ", ".join(shown) or "-"  # 100 names would bury the line
        text = (f"round {event.round:>2}/{event.rounds}  uploaded {len(event.uploaded)}/{event.leaves} "
                f"[{uploaded}]  wait {event.wait_s:5.1f} s")
        if event.global_accuracy is not None:
            text += f"  global accuracy {event.global_accuracy:.1%}"
        return text

    def _line(self, text: str, final: bool) -> None:
        if self.live:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        elif final:
            self.stream.write(text + "\n")
        self.stream.flush()
