"""The store's analytics records: each branch's field operations, its analytics rounds, and their files.

An analytics round is not a learning round: a branch may have one of each open, numbered apart (an analytics
round's ``round_index`` counts from 0 within its run). One opens with the first analytics upload of the branch's
run (none stays open idle); a run that moves on abandons the open one. Its uploads and its aggregate live in
``analytics_files`` (the files themselves in ``files/`` beside the models, written in :mod:`.store_db`'s order),
so no query of the learning rounds ever meets them; a download finds either kind
(:meth:`~branchkey_integrations.server.store.Store.get_file`).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ..core.errors import RoundClosedError
from ..core.protocol import KIND_FEDERATED_ANALYTICS
from .records import FileRecord, Leaf
from .store_db import StoreDatabase, Tables, new_id, now_iso
from .store_files import install_file
from .store_rounds import check_leaf_current

TABLES = Tables(schema="""
CREATE TABLE IF NOT EXISTS field_ops (
    branch_id TEXT NOT NULL, name TEXT NOT NULL, op TEXT NOT NULL, PRIMARY KEY (branch_id, name));
CREATE TABLE IF NOT EXISTS analytics_rounds (
    branch_id TEXT NOT NULL, run_number INTEGER NOT NULL, round_index INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('open', 'aggregated', 'abandoned')),
    aggregate_id TEXT, contributors INTEGER, first_upload_at REAL, opened_at TEXT NOT NULL, closed_at TEXT,
    PRIMARY KEY (branch_id, run_number, round_index));
CREATE TABLE IF NOT EXISTS analytics_files (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('upload', 'aggregate')),
    branch_id TEXT NOT NULL, leaf_id TEXT, run_number INTEGER NOT NULL, round_index INTEGER NOT NULL,
    path TEXT NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL, fields TEXT NOT NULL, metadata TEXT,
    idempotency_key TEXT, created_at TEXT NOT NULL, removed_at TEXT);
CREATE INDEX IF NOT EXISTS analytics_files_round ON analytics_files(branch_id, run_number, round_index, kind);
""")


class AnalyticsRecords(StoreDatabase):
    """Field operations, analytics rounds and their files (a family of
    :class:`~branchkey_integrations.server.store.Store`)."""

    if TYPE_CHECKING:
        def list_leaves(self, branch_id: str | None = None, *, tree_id: str | None = None) -> list[Leaf]: ...

    # -- field operations --------------------------------------------------------------------

    def field_ops(self, branch_id: str) -> dict[str, str]:
        """The branch's configured operations, field name -> ``sum``/``min``/``max``/``must_match``."""
        return {row[0]: row[1] for row in self._query("SELECT name, op FROM field_ops WHERE branch_id = ? ORDER BY name",
                                                      (branch_id,))}

    def set_field_ops(self, branch_id: str, ops: Mapping[str, str | None]) -> dict[str, str]:
        """Set (or, with None, remove) operations of the branch's fields (checked by the caller); returns them all.
        A round already open keeps combining by what it started with only where it is unchanged: the next upload
        is checked by the new operations."""
        with self._tx() as conn:
            for name, op in ops.items():
                if op is None:
                    conn.execute("DELETE FROM field_ops WHERE branch_id = ? AND name = ?", (branch_id, name))
                else:
                    conn.execute("INSERT INTO field_ops VALUES (?, ?, ?) ON CONFLICT (branch_id, name)"
                                 " DO UPDATE SET op = excluded.op", (branch_id, name, op))
        return self.field_ops(branch_id)

    # -- rounds --------------------------------------------------------------------------------

    def open_analytics_round(self, branch_id: str, run_number: int) -> dict[str, Any] | None:
        """The branch's open analytics round of ``run_number``, or None."""
        rows = self._query("SELECT * FROM analytics_rounds WHERE branch_id = ? AND run_number = ? AND status = 'open'",
                           (branch_id, run_number))
        return dict(rows[0]) if rows else None

    def analytics_round_for_upload(self, branch_id: str, run_number: int) -> int:
        """The round index an analytics upload of ``run_number`` goes to: the open one, else a new one (after the
        run's latest); open rounds of earlier runs are abandoned."""
        with self._tx() as conn:
            conn.execute("UPDATE analytics_rounds SET status = 'abandoned', closed_at = ? WHERE branch_id = ?"
                         " AND run_number != ? AND status = 'open'", (now_iso(), branch_id, run_number))
            row = conn.execute("SELECT round_index FROM analytics_rounds WHERE branch_id = ? AND run_number = ?"
                               " AND status = 'open'", (branch_id, run_number)).fetchone()
            if row is not None:
                return int(row[0])
            latest = conn.execute("SELECT MAX(round_index) FROM analytics_rounds WHERE branch_id = ? AND run_number = ?",
                                  (branch_id, run_number)).fetchone()[0]
            index = 0 if latest is None else int(latest) + 1
            conn.execute("INSERT INTO analytics_rounds (branch_id, run_number, round_index, status, opened_at)"
                         " VALUES (?, ?, ?, 'open', ?)", (branch_id, run_number, index, now_iso()))
            return index

    def abandon_analytics_round(self, branch_id: str) -> int:
        """Abandon the branch's open analytics round (a reset, a stopped run); returns how many were open."""
        with self._tx() as conn:
            return conn.execute("UPDATE analytics_rounds SET status = 'abandoned', closed_at = ? WHERE branch_id = ?"
                                " AND status = 'open'", (now_iso(), branch_id)).rowcount

    def analytics_uploads(self, branch_id: str, run_number: int, round_index: int) -> list[dict[str, Any]]:
        """The uploads counted in an analytics round, oldest first: ``leaf_id``, ``id``, ``path``, ``fields``."""
        rows = self._query("SELECT leaf_id, id, path, fields FROM analytics_files WHERE branch_id = ? AND run_number = ?"
                           " AND round_index = ? AND kind = 'upload' AND removed_at IS NULL ORDER BY created_at, rowid",
                           (branch_id, run_number, round_index))
        return [dict(row) | {"path": self.data_dir / row["path"]} for row in rows]

    def analytics_rounds_past_deadline(self, now: float | None = None) -> list[str]:
        """Branch ids whose open analytics round has uploads and a first upload older than the round deadline."""
        rows = self._query(
            "SELECT b.id FROM branches b JOIN analytics_rounds r ON r.branch_id = b.id AND r.run_number = b.run_number"
            " WHERE r.status = 'open' AND b.run_status = 'start' AND b.round_deadline_s IS NOT NULL"
            " AND r.first_upload_at IS NOT NULL AND r.first_upload_at + b.round_deadline_s <= ?",
            (time.time() if now is None else now,))
        return [row[0] for row in rows]

    def open_analytics_branches(self) -> list[str]:
        """Branch ids with an open analytics round in their current run (a start's recovery checks them)."""
        return [row[0] for row in self._query(
            "SELECT r.branch_id FROM analytics_rounds r JOIN branches b ON b.id = r.branch_id"
            " AND b.run_number = r.run_number WHERE r.status = 'open'")]

    def latest_analytics_aggregate(self, branch_id: str) -> dict[str, Any] | None:
        """``{"aggregation_id", "run_number", "round_index", "contributors", "aggregated_at"}`` of the branch's latest
        analytics aggregate, or None."""
        rows = self._query(
            "SELECT aggregate_id AS aggregation_id, run_number, round_index, contributors, closed_at AS aggregated_at"
            " FROM analytics_rounds WHERE branch_id = ? AND status = 'aggregated'"
            " ORDER BY run_number DESC, round_index DESC LIMIT 1", (branch_id,))
        return dict(rows[0]) if rows else None

    def analytics_history(self, branch_id: str, limit: int = 20) -> list[dict[str, Any]]:
        """The branch's latest analytics rounds, newest first (every status)."""
        rows = self._query("SELECT run_number, round_index, status, aggregate_id, contributors, opened_at, closed_at"
                           " FROM analytics_rounds WHERE branch_id = ? ORDER BY run_number DESC, round_index DESC"
                           " LIMIT ?", (branch_id, limit))
        return [dict(row) for row in rows]

    # -- files ---------------------------------------------------------------------------------

    def commit_analytics_upload(self, temp_path: Path, *, leaf: Leaf, run_number: int, round_index: int,
                                fields: str, size: int, sha256: str, metadata: str | None,
                                key: str | None) -> tuple[str, list[Path]]:
        """Make an analytics upload durable and count it in its round (replacing the leaf's earlier one there).

        Returns its file id and the files of the uploads it replaced (the caller removes them).
        """
        file_id = new_id()
        relative = install_file(self.data_dir, temp_path, file_id)
        try:
            with self._tx() as conn:
                check_leaf_current(conn, leaf)
                status = conn.execute("SELECT status FROM analytics_rounds WHERE branch_id = ? AND run_number = ?"
                                      " AND round_index = ?", (leaf.branch_id, run_number, round_index)).fetchone()
                if status is None or status[0] != "open":
                    raise RoundClosedError(f"analytics round {round_index + 1} of run {run_number} closed meanwhile; "
                                           "send the upload again")
                replaced = [row[0] for row in conn.execute(
                    "SELECT path FROM analytics_files WHERE branch_id = ? AND run_number = ? AND round_index = ?"
                    " AND kind = 'upload' AND leaf_id = ?", (leaf.branch_id, run_number, round_index, leaf.id))]
                conn.execute("DELETE FROM analytics_files WHERE branch_id = ? AND run_number = ? AND round_index = ?"
                             " AND kind = 'upload' AND leaf_id = ?", (leaf.branch_id, run_number, round_index, leaf.id))
                conn.execute("INSERT INTO analytics_files (id, kind, branch_id, leaf_id, run_number, round_index, path,"
                             " size, sha256, fields, metadata, idempotency_key, created_at)"
                             " VALUES (?, 'upload', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (file_id, leaf.branch_id, leaf.id, run_number, round_index, relative, size, sha256,
                              fields, metadata, key, now_iso()))
                conn.execute("UPDATE analytics_rounds SET first_upload_at = COALESCE(first_upload_at, ?)"
                             " WHERE branch_id = ? AND run_number = ? AND round_index = ?",
                             (time.time(), leaf.branch_id, run_number, round_index))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.data_dir / relative)
            raise
        return file_id, [self.data_dir / path for path in replaced]

    def counted_analytics_upload(self, leaf_id: str, key: str) -> tuple[str, int, int] | None:
        """``(file_id, run_number, round_index)`` of the leaf's analytics upload committed with idempotency ``key``."""
        rows = self._query("SELECT id, run_number, round_index FROM analytics_files WHERE leaf_id = ?"
                           " AND idempotency_key = ? AND kind = 'upload'", (leaf_id, key))
        return (rows[0][0], rows[0][1], rows[0][2]) if rows else None

    def commit_analytics_aggregate(self, temp_path: Path, *, branch_id: str, run_number: int, round_index: int,
                                   fields: str, size: int, sha256: str, contributors: int) -> str:
        """Install an analytics round's combined archive and close the round with it; returns its id."""
        file_id = new_id()
        relative = install_file(self.data_dir, temp_path, file_id)
        stamp = now_iso()
        try:
            with self._tx() as conn:
                conn.execute("INSERT INTO analytics_files (id, kind, branch_id, leaf_id, run_number, round_index, path,"
                             " size, sha256, fields, created_at) VALUES (?, 'aggregate', ?, NULL, ?, ?, ?, ?, ?, ?, ?)",
                             (file_id, branch_id, run_number, round_index, relative, size, sha256, fields, stamp))
                conn.execute("UPDATE analytics_rounds SET status = 'aggregated', aggregate_id = ?, contributors = ?,"
                             " closed_at = ? WHERE branch_id = ? AND run_number = ? AND round_index = ?",
                             (file_id, contributors, stamp, branch_id, run_number, round_index))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.data_dir / relative)
            raise
        return file_id

    def analytics_file(self, file_id: str) -> FileRecord | None:
        """An analytics upload or aggregate as a :class:`FileRecord` (``specs`` holds its field layout)."""
        rows = self._query("SELECT id, kind, branch_id, leaf_id, run_number, round_index, path, size, sha256,"
                           " fields AS specs, metadata, created_at, removed_at FROM analytics_files WHERE id = ?",
                           (file_id,))
        return FileRecord(**dict(rows[0]), payload_kind=KIND_FEDERATED_ANALYTICS) if rows else None

    def drop_analytics_uploads(self, branch_id: str, leaf_id: str | None) -> list[Path]:
        """Drop one leaf's upload from the branch's open analytics round (``leaf_id``), or abandon the round (None);
        returns the files to remove."""
        with self._tx() as conn:
            where = " AND f.leaf_id = ?" if leaf_id is not None else ""
            params: tuple[Any, ...] = (branch_id,) + ((leaf_id,) if leaf_id is not None else ())
            doomed = conn.execute(
                "SELECT f.id, f.path FROM analytics_files f JOIN analytics_rounds r ON r.branch_id = f.branch_id"
                " AND r.run_number = f.run_number AND r.round_index = f.round_index WHERE f.branch_id = ?"
                " AND f.kind = 'upload' AND r.status = 'open'" + where, params).fetchall()
            conn.executemany("DELETE FROM analytics_files WHERE id = ?", [(row[0],) for row in doomed])
            if leaf_id is None:
                conn.execute("UPDATE analytics_rounds SET status = 'abandoned', closed_at = ? WHERE branch_id = ?"
                             " AND status = 'open'", (now_iso(), branch_id))
        return [self.data_dir / row[1] for row in doomed]

    def prune_analytics(self, branch_id: str, *, keep_uploads: bool, keep_rounds: int) -> list[Path]:
        """Retention for analytics files, by the learning rounds' rules (rows stay, marked removed)."""
        with self._tx() as conn:
            doomed: list[tuple[str, str]] = []
            if not keep_uploads:
                doomed += conn.execute(
                    "SELECT f.id, f.path FROM analytics_files f JOIN analytics_rounds r ON r.branch_id = f.branch_id"
                    " AND r.run_number = f.run_number AND r.round_index = f.round_index WHERE f.branch_id = ?"
                    " AND f.kind = 'upload' AND f.removed_at IS NULL AND r.status != 'open'", (branch_id,)).fetchall()
            if keep_rounds > 0:
                doomed += conn.execute(
                    "SELECT id, path FROM analytics_files WHERE branch_id = ? AND kind = 'aggregate' AND removed_at IS NULL"
                    " AND id NOT IN (SELECT id FROM analytics_files WHERE branch_id = ? AND kind = 'aggregate'"
                    " ORDER BY run_number DESC, round_index DESC LIMIT ?)", (branch_id, branch_id, keep_rounds)).fetchall()
            conn.executemany("UPDATE analytics_files SET removed_at = ? WHERE id = ?",
                             [(now_iso(), row[0]) for row in doomed])
        return [self.data_dir / row[1] for row in doomed]

    def unacknowledged_analytics(self, leaf: Leaf) -> tuple[str, int, int] | None:
        """(aggregate id, run, round) of the latest analytics round the leaf took part in, aggregated and not yet
        fetched by it, or None (a reconnecting leaf's catch-up)."""
        rows = self._query(
            "SELECT r.aggregate_id, r.run_number, r.round_index FROM analytics_files f"
            " JOIN branches b ON b.id = f.branch_id AND b.run_number = f.run_number"
            " JOIN analytics_rounds r ON r.branch_id = f.branch_id AND r.run_number = f.run_number"
            " AND r.round_index = f.round_index WHERE f.leaf_id = ? AND f.kind = 'upload'"
            " ORDER BY f.round_index DESC LIMIT 1", (leaf.id,))
        if not rows or rows[0][0] is None:
            return None
        if self._query("SELECT 1 FROM acknowledgments WHERE leaf_id = ? AND file_id = ?", (leaf.id, rows[0][0])):
            return None
        return rows[0][0], rows[0][1], rows[0][2]


__all__ = ["AnalyticsRecords", "TABLES"]
