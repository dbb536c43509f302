"""What a branch's open round looks like: who has uploaded, who is missing, whose upload was refused.

:func:`round_progress` reads one consistent picture of a branch from the store: its run, the open
round (uploaded and missing leaves, by name; the uploads refused in that round with their reasons;
when it opened and, with a round deadline, when it will be aggregated), and the branch's latest
aggregate. The leaf route ``GET`` :data:`~branchkey_integrations.core.protocol.ROUND_PATH`, the
server log and ``branchkey-local status`` all show this same picture, so a waiting leaf and the
operator see why a round is not complete.

Leaves are named by their names, never by their tokens. The module knows nothing of HTTP.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from ..core.protocol import KIND_FEDERATED_ANALYTICS, KIND_FEDERATED_LEARNING
from .records import Branch
from .store import Store


@dataclass(frozen=True)
class Refusal:
    """An upload the server refused in the open round (the latest per leaf)."""

    leaf: str
    reason: str
    at: str


@dataclass(frozen=True)
class RoundProgress:
    """The open round of one branch and its latest aggregate; :meth:`to_dict` is the wire form.

    ``round_index`` and ``opened_at`` are None while no round is open (the run is stopped);
    ``deadline_at`` is None unless the branch has a round deadline and the round an upload.
    ``strategy``/``strategy_params``: how the branch aggregates; ``latest_aggregate`` also says what
    aggregated that round (``strategy``) and, when it was not the branch's strategy, why (``strategy_note``).
    ``kind``: the learning round's payload kind; ``analytics``: the branch's analytics rounds
    (:func:`analytics_progress`), or None.
    """

    branch_id: str
    run_status: str
    run_number: int
    round_index: int | None
    required: int
    uploaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    opened_at: str | None = None
    deadline_at: str | None = None
    latest_aggregate: dict[str, Any] | None = None
    strategy: str = "fedavg"
    strategy_params: dict[str, float] = field(default_factory=dict)
    kind: str = KIND_FEDERATED_LEARNING
    analytics: dict[str, Any] | None = None
    brief: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The ``data`` of the ROUND_PATH answer (without ``branch_id``, which the path names); a brief one has
        ``uploaded_count`` instead of the ``uploaded``, ``missing`` and ``refused`` lists."""
        data = asdict(self)
        del data["branch_id"], data["brief"]
        if self.brief:
            data["uploaded_count"] = len(data.pop("uploaded"))
            del data["missing"], data["refused"]
            if data["analytics"] is not None:
                data["analytics"]["uploaded_count"] = len(data["analytics"].pop("uploaded"))
                del data["analytics"]["missing"]
        return data

    @property
    def round(self) -> int | None:
        """The open round as people read it, from 1 within the run (``round_index`` + 1), or None."""
        return None if self.round_index is None else self.round_index + 1

    @property
    def aggregated(self) -> int:
        """How many rounds of the current run were aggregated (by the latest aggregate's round)."""
        latest = self.latest_aggregate or {}
        if latest.get("run_number") != self.run_number or latest.get("round_index") is None:
            return 0
        return int(latest["round_index"]) + 1

    def state(self) -> str:
        """Where the run stands, in words: ``"run 1 stopped after 8 aggregated rounds"``, ``"round 9 of run 1
        waits for its first upload (8 aggregated)"`` (a run whose leaves are done reads so, not as stuck), or
        ``"round 3 of run 1: 1/2 uploaded; missing leaf_2"``."""
        done = self.aggregated
        if self.round_index is None:
            state = {"stop": "stopped", "pause": "paused"}.get(self.run_status, self.run_status)
            return f"run {self.run_number} {state} after {done} aggregated round{'s' * (done != 1)}"
        if not self.uploaded and not self.refused:
            return f"round {self.round} of run {self.run_number} waits for its first upload ({done} aggregated)"
        text = f"round {self.round} of run {self.run_number}: {len(self.uploaded)}/{self.required} uploaded"
        return text + (f"; missing {', '.join(self.missing)}" if self.missing else "")

    def lines(self) -> list[str]:
        """Human lines for ``branchkey-local status``: the open round, then each refused upload and why."""
        head = self.state()
        if self.round_index is not None and self.uploaded:
            head = head.replace(" uploaded", f" uploaded ({', '.join(self.uploaded)})", 1)
        head += f"; aggregated by {self.deadline_at} (round deadline)" if self.deadline_at else ""
        return [head, *self._strategy_lines()] + [f"refused {r.leaf} at {r.at}: {r.reason}" for r in self.refused] \
            + analytics_lines(self.analytics)

    def _strategy_lines(self) -> list[str]:
        params = ", ".join(f"{key}={value:g}" for key, value in self.strategy_params.items())
        lines = [f"strategy {self.strategy}" + (f" ({params})" if params else "")]
        latest = self.latest_aggregate or {}
        if latest.get("strategy_note"):
            lines.append(f"round {latest['round_index'] + 1} of run {latest['run_number']} was aggregated with "
                         f"{latest['strategy']}: {latest['strategy_note']}")
        return lines

    def summary(self, *, refusals: bool = True) -> str:
        """One line for a log or a terminal, e.g. ``round 3 of run 1: 1/2 uploaded; missing leaf_2`` (rounds
        from 1, as the callbacks, ``simulate`` and the dashboard count them)."""
        text = self.state()
        if self.refused and refusals:
            text += "; refused " + "; ".join(f"{r.leaf} ({r.reason})" for r in self.refused)
        return text


def round_progress(store: Store, branch_id: str, *, brief: bool = False) -> RoundProgress:
    """The progress of ``branch_id``'s open round; blocking (call from a worker thread).

    ``brief``: without the leaves' names (:meth:`RoundProgress.to_dict` then leaves the name lists out), for
    a leaf that only checks for a missed aggregate: with 1,000 leaves each asking every few seconds, listing
    every leaf's name for each of them cost the server more than the uploads did.

    Raises:
        RecordNotFoundError: no such branch.
    """
    with store.reading():
        branch = store.require_branch(branch_id)
        current = store.open_round(branch_id)
        required = store.required_uploads(branch)
        latest = store.latest_aggregate(branch_id)
        names = {} if brief else {leaf.id: leaf.name for leaf in store.list_leaves(branch_id, include_revoked=True)}
        active = set() if brief else {leaf.id for leaf in store.list_leaves(branch_id)}
        analytics = analytics_progress(store, branch, required, names, active)
        if current is None:
            return RoundProgress(branch.id, branch.run_status, branch.run_number, None, required,
                                 latest_aggregate=latest, strategy=branch.algorithm, strategy_params=branch.params,
                                 analytics=analytics, brief=brief)
        if brief:  # counted, not named
            uploaded_ids = [""] * store.round_upload_count(branch_id, current.run_number, current.round_index)
            refusals: list[Any] = []
        else:
            uploaded_ids = store.round_uploaders(branch_id, current.run_number, current.round_index)
            refusals = store.round_refusals(branch_id, current.run_number, current.round_index)
    uploaded = [names.get(leaf_id, leaf_id) for leaf_id in uploaded_ids]
    done = set(uploaded_ids)
    missing = [name for leaf_id, name in names.items() if leaf_id not in done and leaf_id in active]
    deadline_at = None
    if branch.round_deadline_s is not None and current.first_upload_at is not None:
        deadline_at = iso_time(current.first_upload_at + branch.round_deadline_s)
    return RoundProgress(
        branch.id, branch.run_status, current.run_number, current.round_index, required, uploaded, missing,
        [Refusal(r["leaf_name"], r["reason"], r["refused_at"]) for r in refusals],
        current.opened_at, deadline_at, latest, branch.algorithm, branch.params, analytics=analytics, brief=brief,
    )


def analytics_progress(store: Store, branch: Branch, required: int, names: dict[str, str],
                       active: set[str] | None = None) -> dict[str, Any] | None:
    """The branch's analytics rounds in the round view: the open one (of the current run) and the latest combined
    one, or None when the branch has had neither; ``names`` names every leaf, ``active`` (default: all) those not
    revoked, which alone can be missing. Blocking, inside the caller's :meth:`Store.reading`."""
    current = store.open_analytics_round(branch.id, branch.run_number)
    latest = store.latest_analytics_aggregate(branch.id)
    if current is None and latest is None:
        return None
    uploaded_ids = [u["leaf_id"] for u in store.analytics_uploads(branch.id, branch.run_number, current["round_index"])] \
        if current is not None else []
    deadline_at = None
    if current is not None and branch.round_deadline_s is not None and current["first_upload_at"] is not None:
        deadline_at = iso_time(current["first_upload_at"] + branch.round_deadline_s)
    return {
        "kind": KIND_FEDERATED_ANALYTICS, "run_number": branch.run_number,
        "round_index": current["round_index"] if current is not None else None, "required": required,
        "uploaded": [names.get(leaf_id, leaf_id) for leaf_id in uploaded_ids],
        "missing": [name for leaf_id, name in names.items()
                    if leaf_id not in uploaded_ids and (active is None or leaf_id in active)] if current else [],
        "opened_at": current["opened_at"] if current is not None else None, "deadline_at": deadline_at,
        "latest_aggregate": latest,
    }


def analytics_lines(analytics: dict[str, Any] | None) -> list[str]:
    """Human lines of :func:`analytics_progress` for ``branchkey-local status``."""
    if analytics is None:
        return []
    lines = []
    if analytics["round_index"] is not None:
        line = (f"open analytics round {analytics['round_index'] + 1} of run {analytics['run_number']}: "
                f"{len(analytics['uploaded'])}/{analytics['required']} uploaded")
        line += f" ({', '.join(analytics['uploaded'])})" if analytics["uploaded"] else ""
        lines.append(line + (f"; missing {', '.join(analytics['missing'])}" if analytics["missing"] else ""))
    latest = analytics["latest_aggregate"]
    if latest:
        lines.append(f"latest analytics result: run {latest['run_number']} analytics round {latest['round_index'] + 1}, "
                     f"{latest['contributors']} leaves, aggregate {latest['aggregation_id']}")
    return lines


def iso_time(epoch_s: float) -> str:
    """UTC ISO 8601 with milliseconds, as the store writes its times."""
    return datetime.fromtimestamp(epoch_s, timezone.utc).isoformat(timespec="milliseconds")


__all__ = ["Refusal", "RoundProgress", "round_progress", "analytics_progress", "analytics_lines", "iso_time"]
