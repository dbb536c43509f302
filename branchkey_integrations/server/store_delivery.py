"""The store's delivery records: the AMQP outbox (notifications kept until the broker confirms them, and
which aggregate each branch announced) and the acknowledgments of what each leaf has fetched."""

from __future__ import annotations

import time
from typing import Any

from .records import Leaf
from .store_db import StoreDatabase, Tables, now_iso

TABLES = Tables(schema="""
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, tree_id TEXT NOT NULL, branch_id TEXT NOT NULL, message TEXT NOT NULL,
    created REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_try REAL NOT NULL, last_error TEXT);
CREATE TABLE IF NOT EXISTS acknowledgments (
    leaf_id TEXT NOT NULL, file_id TEXT NOT NULL, acknowledged_at TEXT NOT NULL, PRIMARY KEY (leaf_id, file_id));
""")


class DeliveryRecords(StoreDatabase):
    """The outbox and acknowledgments (a family of :class:`~branchkey_integrations.server.store.Store`)."""

    def add_outbox(self, tree_id: str, branch_id: str, message: str, *, aggregate_id: str | None = None) -> int:
        """Queue a notification (JSON text) for the broker; returns the row id. Rows live until confirmed.

        With ``aggregate_id`` (an aggregation_status), the branch's announced aggregate is recorded in
        the same transaction, so :meth:`unannounced_aggregates` finds one committed but never queued.
        """
        now = time.time()
        with self._tx() as conn:
            if aggregate_id is not None:
                conn.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (f"announced:{branch_id}", aggregate_id))
            return int(conn.execute(
                "INSERT INTO outbox (tree_id, branch_id, message, created, next_try) VALUES (?, ?, ?, ?, ?)",
                (tree_id, branch_id, message, now, now),
            ).lastrowid or 0)

    def unannounced_aggregates(self) -> list[tuple[str, str, str, int, int]]:
        """(tree, branch, aggregate id, run, round) of each branch whose latest aggregate was committed but never
        queued for the broker (the server died in between). A branch never announced through the outbox
        (a store from before it, or a server without a broker until now) is left alone."""
        rows = self._query(
            "SELECT b.tree_id, b.id, r.aggregate_id, r.run_number, r.round_index FROM branches b"
            " JOIN kv ON kv.key = 'announced:' || b.id"
            " JOIN rounds r ON r.branch_id = b.id AND r.status = 'aggregated'"
            " WHERE r.rowid = (SELECT rowid FROM rounds WHERE branch_id = b.id AND status = 'aggregated'"
            " ORDER BY run_number DESC, round_index DESC LIMIT 1)"
            " AND r.aggregate_id != kv.value")
        return [tuple(row) for row in rows]  # type: ignore[misc]

    def due_outbox(self, now: float | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Outbox rows whose next try is due, oldest first."""
        rows = self._query("SELECT * FROM outbox WHERE next_try <= ? ORDER BY id LIMIT ?",
                           (time.time() if now is None else now, limit))
        return [dict(row) for row in rows]

    def next_outbox_try(self) -> float | None:
        """When the earliest outbox row is due (a time.time() stamp), or None when the outbox is empty."""
        return self._query("SELECT MIN(next_try) FROM outbox")[0][0]

    def outbox_sent(self, row_id: int) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM outbox WHERE id = ?", (row_id,))

    def outbox_failed(self, row_id: int, next_try: float, error: str) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE outbox SET attempts = attempts + 1, next_try = ?, last_error = ? WHERE id = ?",
                         (next_try, error[:500], row_id))

    def acknowledge(self, leaf_id: str, file_id: str) -> None:
        """Record that the leaf fetched aggregate ``file_id`` (it has its result: no catch-up needed).

        Committed without an fsync of its own (``synchronous=NORMAL`` for this one transaction; the next
        commit's fsync covers it): the leaf's download waits for this answer, and an fsync here waited
        behind the disk writing the round's aggregate (up to 10 ms). An acknowledgment lost in an
        operating-system crash costs the leaf a repeated notification at most, which is harmless.
        """
        with self._lock:
            self._conn.execute("PRAGMA synchronous=NORMAL")
            try:
                with self._tx() as conn:
                    conn.execute("INSERT OR IGNORE INTO acknowledgments VALUES (?, ?, ?)",
                                 (leaf_id, file_id, now_iso()))
            finally:
                self._conn.execute("PRAGMA synchronous=FULL")

    def unacknowledged_aggregate(self, leaf: Leaf) -> tuple[str, int, int] | None:
        """(aggregate id, run, round) the leaf took part in and has not fetched, or None.

        Only the round of the leaf's latest upload of the current run counts: an aggregate of a round
        the leaf left out, or of an earlier one, would be mistaken for the current result by a client
        that reads only the aggregation id (the official 3.0.1 client does).
        """
        rows = self._query(
            "SELECT r.aggregate_id, r.run_number, r.round_index FROM uploads u"
            " JOIN branches b ON b.id = u.branch_id AND b.run_number = u.run_number"
            " JOIN rounds r ON r.branch_id = u.branch_id AND r.run_number = u.run_number"
            " AND r.round_index = u.round_index WHERE u.leaf_id = ? ORDER BY u.round_index DESC LIMIT 1",
            (leaf.id,),
        )
        if not rows or rows[0][0] is None:
            return None
        aggregate_id, run_number, round_index = rows[0]
        if self._query("SELECT 1 FROM acknowledgments WHERE leaf_id = ? AND file_id = ?", (leaf.id, aggregate_id)):
            return None
        return aggregate_id, run_number, round_index
