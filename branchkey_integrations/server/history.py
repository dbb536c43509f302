"""A branch's past, summarised: the table of aggregated rounds and its metrics across rounds.

:func:`round_history` lists one run's aggregated rounds (leaves aggregated, total weighting,
aggregate size and whether it is still stored, how long the round took and how long aggregation
took after the last upload). :func:`metric_summary` turns the per-leaf metric rows leaves send
for each aggregate into one series per ``(mode, metric)``: the sample-weighted mean over leaves
(each leaf weighted by its upload's weighting in that round, i.e. its sample count) beside every
leaf's own value. The dashboard, its JSON routes and ``branchkey-local status --json`` all read
these, so they agree.

Blocking (SQLite): call from a worker thread. Leaves are named by name, never by token. The module
knows nothing of HTTP.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from ..core.protocol import METRIC_MODES
from .store import Store

#: metric modes plotted across rounds (``non-federated`` metrics belong to no aggregate)
PLOTTED_MODES = tuple(mode for mode in METRIC_MODES if mode in ("test", "train"))
#: decimals kept of each metric value (a plot needs no more; the answer for 100 leaves x 200 rounds halves)
DIGITS = 6


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return round((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds(), 3)


def _pick_run(store: Store, branch_id: str, rounds: list[dict[str, Any]], run_number: int | None) -> int:
    if run_number is not None:
        return run_number
    aggregated = [r["run_number"] for r in rounds if r["status"] == "aggregated"]
    return max(aggregated) if aggregated else store.require_branch(branch_id).run_number


def _rounds_and_run(store: Store, branch_id: str, run_number: int | None) -> tuple[list[dict[str, Any]], int]:
    """The branch's rounds and the run a view shows (``run_number``, else the latest that aggregated);
    raises RecordNotFoundError for an unknown branch. Called inside the caller's ``store.reading()``."""
    store.require_branch(branch_id)
    rounds = store.list_rounds(branch_id)
    return rounds, _pick_run(store, branch_id, rounds, run_number)


def round_history(store: Store, branch_id: str, run_number: int | None = None) -> dict[str, Any]:
    """One run's aggregated rounds, oldest first (default: the latest run that aggregated a round).

    Returns ``{"run_number", "runs": [numbers with rounds], "rounds": [{"round_index", "leaves",
    "total_weighting", "aggregate_id", "aggregate_size" (None once retention removed the file),
    "opened_at", "closed_at", "round_s", "aggregation_s", "strategy" (what aggregated the round),
    "strategy_note" (why, when that was not the branch's strategy)}]}``.

    Raises:
        RecordNotFoundError: no such branch.
    """
    with store.reading():
        rounds, run = _rounds_and_run(store, branch_id, run_number)
        totals = store.round_upload_totals(branch_id, run)
        sizes = {f["id"]: f["size"] for f in store.list_files(branch_id, "aggregate") if not f.get("removed_at")}
    rows = []
    for item in rounds:
        if item["run_number"] != run or item["status"] != "aggregated":
            continue
        count, weighting, last_upload = totals.get(item["round_index"], (0, 0.0, None))
        rows.append({
            "round_index": item["round_index"],
            "leaves": count,
            "total_weighting": weighting,
            "aggregate_id": item["aggregate_id"],
            "aggregate_size": sizes.get(item["aggregate_id"]),
            "opened_at": item["opened_at"],
            "closed_at": item["closed_at"],
            "round_s": _seconds_between(item["opened_at"], item["closed_at"]),
            "aggregation_s": _seconds_between(last_upload, item["closed_at"]),
            "strategy": item.get("strategy"),
            "strategy_note": item.get("strategy_note"),
        })
    return {"run_number": run, "runs": sorted({r["run_number"] for r in rounds}), "rounds": rows}


def metric_summary(store: Store, branch_id: str, run_number: int | None = None) -> dict[str, Any]:
    """Per ``(mode, metric)`` of one run: rounds, the sample-weighted mean, and each leaf's values.

    Returns ``{"run_number", "leaves": [names], "series": [{"mode", "metric", "rounds": [round_index],
    "mean": [value], "per_leaf": {name: [value or None, aligned with rounds]}}]}``. A leaf's weight in
    a round is its upload's weighting there (its latest weighting in the run if it did not upload).
    Only finite numbers count; a later report of the same leaf, round and metric replaces an earlier one.

    Raises:
        RecordNotFoundError: no such branch.
    """
    with store.reading():
        rounds, run = _rounds_and_run(store, branch_id, run_number)
        values = store.metric_values(branch_id, PLOTTED_MODES, run)
        uploads = store.upload_weightings(branch_id, run)
        names = {leaf.id: leaf.name for leaf in store.list_leaves(branch_id, include_revoked=True)}
    round_of = {r["aggregate_id"]: r["round_index"] for r in rounds if r["run_number"] == run and r["aggregate_id"]}
    weights = {(index, leaf): weighting for index, leaf, weighting in uploads}
    latest_weight = {leaf: weighting for _, leaf, weighting in uploads}  # ordered by round: the latest wins
    # (mode, metric) -> round -> leaf id -> (value, weight)
    grouped: dict[tuple[str, str], dict[int, dict[str, tuple[float, float]]]] = {}
    for mode, aggregation_id, leaf, metric, value in values:
        index = round_of.get(aggregation_id)
        if index is None or not math.isfinite(value):
            continue
        weight = weights.get((index, leaf)) or latest_weight.get(leaf, 1.0)
        grouped.setdefault((mode, str(metric)), {}).setdefault(index, {})[leaf] = (round(value, DIGITS), weight)
    leaf_ids = sorted({leaf for per_round in grouped.values() for leaves in per_round.values() for leaf in leaves},
                      key=lambda leaf_id: names.get(leaf_id, leaf_id))
    series = []
    for (mode, metric), per_round in sorted(grouped.items()):
        indices = sorted(per_round)
        means = []
        for index in indices:
            reported = per_round[index].values()
            total = sum(weight for _, weight in reported)
            means.append(round(sum(value * weight for value, weight in reported) / total if total > 0
                               else sum(value for value, _ in reported) / len(reported), DIGITS))
        per_leaf = {}
        for leaf in leaf_ids:
            column = [per_round[index].get(leaf, (None,))[0] for index in indices]
            if any(v is not None for v in column):
                per_leaf[names.get(leaf, leaf)] = column
        series.append({"mode": mode, "metric": metric, "rounds": indices, "mean": means, "per_leaf": per_leaf})
    return {"run_number": run, "leaves": [names.get(leaf, leaf) for leaf in leaf_ids], "series": series}


def latest_metrics(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"test/accuracy": {"round_index", "mean"}, ...}``: the last round of each series (for ``status --json``)."""
    return {f"{s['mode']}/{s['metric']}": {"round_index": s["rounds"][-1], "mean": s["mean"][-1]}
            for s in summary["series"] if s["rounds"]}


__all__ = ["round_history", "metric_summary", "latest_metrics", "PLOTTED_MODES"]
