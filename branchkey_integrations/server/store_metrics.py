"""The store's metrics reports: each counted in a round (at most ``max_per_round`` per leaf and round),
read back in pages and as numeric values for the dashboard's plots."""

from __future__ import annotations

from typing import Any, Sequence

from ..core.errors import QuotaExceededError, RecordNotFoundError
from .records import Leaf
from .store_db import StoreDatabase, Tables, new_id, now_iso

TABLES = Tables(
    schema="""
CREATE TABLE IF NOT EXISTS metrics (
    id TEXT PRIMARY KEY, mode TEXT NOT NULL, aggregation_id TEXT, leaf_id TEXT NOT NULL,
    branch_id TEXT NOT NULL, tree_id TEXT NOT NULL, data TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS metrics_branch ON metrics(branch_id);
""",
    added_columns={"metrics": [("run_number", "INTEGER"), ("round_index", "INTEGER")]},  # the round a report counts in
    after_migration="CREATE INDEX IF NOT EXISTS metrics_leaf_round ON metrics(leaf_id, run_number, round_index);",
)


class MetricRecords(StoreDatabase):
    """Metrics reports (a family of :class:`~branchkey_integrations.server.store.Store`)."""

    def add_metric(self, *, mode: str, aggregation_id: str | None, leaf: Leaf, data: str, max_per_round: int) -> str:
        """Store one metrics report of ``leaf``; returns its id.

        The report counts in the round of ``aggregation_id`` (an aggregate of the leaf's branch, checked
        by the caller), or without one in the branch's latest round; a leaf may send ``max_per_round``
        reports per round, so what one leaf stores grows with the rounds, not with its requests.

        Raises:
            RecordNotFoundError: no such aggregate in the leaf's branch.
            QuotaExceededError: the leaf has sent ``max_per_round`` reports in that round already.
        """
        metric_id = new_id()
        with self._tx() as conn:
            if aggregation_id is not None:
                sql, params = ("SELECT run_number, round_index FROM files WHERE id = ? AND kind = 'aggregate'"
                               " AND branch_id = ?", (aggregation_id, leaf.branch_id))
            else:
                sql, params = ("SELECT run_number, round_index FROM rounds WHERE branch_id = ?"
                               " ORDER BY run_number DESC, round_index DESC LIMIT 1", (leaf.branch_id,))
            row = conn.execute(sql, params).fetchone()
            if row is None:
                raise RecordNotFoundError(f"No aggregate {aggregation_id!r:.80} (or no round) in branch {leaf.branch_id}.")
            run_number, round_index = row
            sent = conn.execute("SELECT COUNT(*) FROM metrics WHERE leaf_id = ? AND run_number = ? AND round_index = ?",
                                (leaf.id, run_number, round_index)).fetchone()[0]
            if sent >= max_per_round:
                raise QuotaExceededError(
                    f"Leaf {leaf.name} ({leaf.id}) has sent {sent} metrics reports for round {round_index + 1} "
                    f"of run {run_number}, the most this server keeps per leaf and round ({max_per_round}); send the "
                    "round's metrics in one report per mode, or report on the next round's aggregate.")
            conn.execute(
                "INSERT INTO metrics (id, mode, aggregation_id, leaf_id, branch_id, tree_id, data, created_at, run_number,"
                " round_index) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (metric_id, mode, aggregation_id, leaf.id, leaf.branch_id, leaf.tree_id, data, now_iso(), run_number,
                 round_index),
            )
        return metric_id

    def list_metrics(self, branch_id: str, *, after: int = 0, limit: int = 1000) -> tuple[list[dict[str, Any]], int | None]:
        """One page of the branch's metrics reports, oldest first: at most ``limit`` reports stored after
        the cursor ``after`` (0: from the first), and the cursor of the next page (None: this is the last)."""
        rows = self._query("SELECT rowid AS seq, * FROM metrics WHERE branch_id = ? AND rowid > ? ORDER BY rowid LIMIT ?",
                           (branch_id, after, limit + 1))
        page = [{key: row[key] for key in row.keys() if key != "seq"} for row in rows[:limit]]
        return page, rows[limit - 1]["seq"] if len(rows) > limit else None

    def metric_values(self, branch_id: str, modes: Sequence[str], run_number: int) -> list[tuple[Any, ...]]:
        """Every numeric metric of one run of the branch in ``modes`` (reported on that run's aggregates),
        oldest first, as tuples ``(mode, aggregation_id, leaf_id, name, value)`` (for the dashboard's plots:
        SQLite unpacks the JSON, 80,000 values in ~0.2 s; the other runs' rows are never read)."""
        marks = ", ".join("?" * len(modes))
        with self._lock:
            return self._conn.execute(
                "SELECT m.mode, m.aggregation_id, m.leaf_id, j.key, j.value FROM metrics m"
                " JOIN rounds r ON r.branch_id = m.branch_id AND r.aggregate_id = m.aggregation_id"
                " JOIN json_each(CASE WHEN json_valid(m.data) AND json_type(m.data) = 'object' THEN m.data ELSE '{}' END) j"
                f" WHERE m.branch_id = ? AND r.run_number = ? AND m.mode IN ({marks}) AND j.type IN ('integer', 'real')"
                " ORDER BY m.created_at",
                (branch_id, run_number, *modes)).fetchall()
