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

import json
import math
from datetime import datetime
from typing import Any

from ..core.protocol import METRIC_MODES
from .store import Store

#: metric modes plotted across rounds (``non-federated`` metrics belong to no aggregate)
PLOTTED_MODES = tuple(mode for mode in METRIC_MODES if mode in ("test", "train"))


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return round((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds(), 3)


def _pick_run(store: Store, branch_id: str, rounds: list[dict[str, Any]], run_number: int | None) -> int:
    if run_number is not None:
        return run_number
    aggregated = [r["run_number"] for r in rounds if r["status"] == "aggregated"]
    return max(aggregated) if aggregated else store.require_branch(branch_id).run_number


def round_history(store: Store, branch_id: str, run_number: int | None = None) -> dict[str, Any]:
    """One run's aggregated rounds, oldest first (default: the latest run that aggregated a round).

    Returns ``{"run_number", "runs": [numbers with rounds], "rounds": [{"round_index", "leaves",
    "total_weighting", "aggregate_id", "aggregate_size" (None once retention removed the file),
    "opened_at", "closed_at", "round_s", "aggregation_s"}]}``.

    Raises:
        RecordNotFoundError: no such branch.
    """
    with store.reading():
        store.require_branch(branch_id)
        rounds = store.list_rounds(branch_id)
        run = _pick_run(store, branch_id, rounds, run_number)
        uploads = [u for u in store.list_uploads(branch_id) if u["run_number"] == run]
        sizes = {f["id"]: f["size"] for f in store.list_files(branch_id, "aggregate")}
    by_round: dict[int, list[dict[str, Any]]] = {}
    for upload in uploads:
        by_round.setdefault(upload["round_index"], []).append(upload)
    rows = []
    for item in rounds:
        if item["run_number"] != run or item["status"] != "aggregated":
            continue
        counted = by_round.get(item["round_index"], [])
        last_upload = max((u["uploaded_at"] for u in counted), default=None)
        rows.append({
            "round_index": item["round_index"],
            "leaves": len(counted),
            "total_weighting": sum(u["weighting"] for u in counted),
            "aggregate_id": item["aggregate_id"],
            "aggregate_size": sizes.get(item["aggregate_id"]),
            "opened_at": item["opened_at"],
            "closed_at": item["closed_at"],
            "round_s": _seconds_between(item["opened_at"], item["closed_at"]),
            "aggregation_s": _seconds_between(last_upload, item["closed_at"]),
        })
    return {"run_number": run, "runs": sorted({r["run_number"] for r in rounds}), "rounds": rows}


def _numbers(text: str) -> dict[str, float]:
    """The finite numbers of one metrics row (``data`` is JSON text of an object); anything else is skipped."""
    try:
        data = json.loads(text)
    except (TypeError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): float(v) for k, v in data.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def metric_summary(store: Store, branch_id: str, run_number: int | None = None) -> dict[str, Any]:
    """Per ``(mode, metric)`` of one run: rounds, the sample-weighted mean, and each leaf's values.

    Returns ``{"run_number", "leaves": [names], "series": [{"mode", "metric", "rounds": [round_index],
    "mean": [value], "per_leaf": {name: [value or None, aligned with rounds]}}]}``. A leaf's weight in
    a round is its upload's weighting there (its latest weighting in the run if it did not upload).

    Raises:
        RecordNotFoundError: no such branch.
    """
    with store.reading():
        store.require_branch(branch_id)
        rounds = store.list_rounds(branch_id)
        run = _pick_run(store, branch_id, rounds, run_number)
        uploads = [u for u in store.list_uploads(branch_id) if u["run_number"] == run]
        names = {leaf.id: leaf.name for leaf in store.list_leaves(branch_id)}
        metrics = store.list_metrics(branch_id)
    round_of = {r["aggregate_id"]: r["round_index"] for r in rounds
                if r["run_number"] == run and r["aggregate_id"]}
    weight = {(u["leaf_id"], u["round_index"]): u["weighting"] for u in uploads}
    latest_weight = {u["leaf_id"]: u["weighting"] for u in uploads}  # uploads come ordered by round
    # (mode, metric) -> round -> leaf id -> value; a later report of the same leaf and round wins
    values: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
    for row in metrics:
        index = round_of.get(row["aggregation_id"])
        if index is None or row["mode"] not in PLOTTED_MODES:
            continue
        for metric, value in _numbers(row["data"]).items():
            values.setdefault((row["mode"], metric), {}).setdefault(index, {})[row["leaf_id"]] = value
    series = []
    leaf_ids = sorted({leaf for per_round in values.values() for leaves in per_round.values() for leaf in leaves},
                      key=lambda leaf_id: names.get(leaf_id, leaf_id))
    for (mode, metric), per_round in sorted(values.items()):
        indices = sorted(per_round)
        means = []
        for index in indices:
            reported = per_round[index]
            weights = {leaf: weight.get((leaf, index), latest_weight.get(leaf, 1.0)) for leaf in reported}
            total = sum(weights.values())
            means.append(sum(reported[leaf] * weights[leaf] for leaf in reported) / total if total > 0
                         else sum(reported.values()) / len(reported))
        per_leaf = {names.get(leaf, leaf): [per_round[index].get(leaf) for index in indices] for leaf in leaf_ids}
        series.append({"mode": mode, "metric": metric, "rounds": indices, "mean": means,
                       "per_leaf": {name: vals for name, vals in per_leaf.items() if any(v is not None for v in vals)}})
    return {"run_number": run, "leaves": [names.get(leaf, leaf) for leaf in leaf_ids], "series": series}


def latest_metrics(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"test/accuracy": {"round_index", "mean"}, ...}``: the last round of each series (for ``status --json``)."""
    return {f"{s['mode']}/{s['metric']}": {"round_index": s["rounds"][-1], "mean": s["mean"][-1]}
            for s in summary["series"] if s["rounds"]}


__all__ = ["round_history", "metric_summary", "latest_metrics", "PLOTTED_MODES"]
