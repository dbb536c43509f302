"""The store's refusals: why a leaf's upload was refused in a round (the latest per leaf and round), until
an accepted upload of the leaf replaces it."""

from __future__ import annotations

import sqlite3
from typing import Any

from .records import Leaf
from .store_db import StoreDatabase, Tables, now_iso

TABLES = Tables(schema="""
CREATE TABLE IF NOT EXISTS refusals (
    branch_id TEXT NOT NULL, run_number INTEGER NOT NULL, round_index INTEGER NOT NULL,
    leaf_id TEXT NOT NULL, reason TEXT NOT NULL, refused_at TEXT NOT NULL,
    PRIMARY KEY (branch_id, run_number, round_index, leaf_id));
""")


class RefusalRecords(StoreDatabase):
    """Refused uploads (a family of :class:`~branchkey_integrations.server.store.Store`)."""

    def record_refusal(self, leaf: Leaf, reason: str) -> tuple[int, int] | None:
        """Remember why ``leaf``'s upload was refused in its branch's open round (the latest per leaf);
        returns that round's (run_number, round_index), or None when no round is open."""
        with self._tx() as conn:
            row = conn.execute(
                "SELECT r.run_number, r.round_index FROM rounds r JOIN branches b ON b.id = r.branch_id"
                " AND b.run_number = r.run_number WHERE r.branch_id = ? AND r.status = 'open'"
                " ORDER BY r.round_index DESC LIMIT 1", (leaf.branch_id,)).fetchone()
            if row is None:
                return None
            refuse(conn, leaf.branch_id, row[0], row[1], leaf.id, reason, now_iso())
        return row[0], row[1]

    def round_refusals(self, branch_id: str, run_number: int, round_index: int) -> list[dict[str, Any]]:
        """Refused uploads of one round not since replaced by an accepted one: leaf id and name, reason, time."""
        rows = self._query(
            "SELECT x.leaf_id, l.name AS leaf_name, x.reason, x.refused_at FROM refusals x"
            " JOIN leaves l ON l.id = x.leaf_id WHERE x.branch_id = ? AND x.run_number = ? AND x.round_index = ?"
            " ORDER BY x.refused_at, l.name", (branch_id, run_number, round_index))
        return [dict(row) for row in rows]


def refuse(conn: sqlite3.Connection, branch_id: str, run_number: int, round_index: int, leaf_id: str, reason: str,
           stamp: str) -> None:
    """Record (or replace) the leaf's refusal in a round, in the caller's transaction."""
    conn.execute("INSERT OR REPLACE INTO refusals VALUES (?, ?, ?, ?, ?, ?)",
                 (branch_id, run_number, round_index, leaf_id, reason[:2000], stamp))


def clear_refusal(conn: sqlite3.Connection, branch_id: str, run_number: int, round_index: int, leaf_id: str) -> None:
    """Forget the leaf's refusal in a round (its upload was accepted), in the caller's transaction."""
    conn.execute("DELETE FROM refusals WHERE branch_id = ? AND run_number = ? AND round_index = ? AND leaf_id = ?",
                 (branch_id, run_number, round_index, leaf_id))
