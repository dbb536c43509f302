"""The store's model files: the ``files`` table and ``files/`` directory (uploads and aggregates, immutable
once written), installing a file in the write order of :mod:`.store_db`, retention, start-up cleanup
and disk use; the last two cover the whole data directory, ``state/`` (:mod:`.store_optimizer`) and the
analytics files (:mod:`.store_analytics`, whose table names them) included."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Sequence

from .durable import TEMP_PREFIX, fsync_path
from .records import FileRecord
from .store_db import DB_NAME, FILES_DIR, STATE_DIR, StoreDatabase, Tables, now_iso

logger = logging.getLogger(__name__)

TABLES = Tables(
    schema="""
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('upload', 'aggregate')),
    branch_id TEXT NOT NULL, leaf_id TEXT, run_number INTEGER NOT NULL, round_index INTEGER NOT NULL,
    path TEXT NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL, specs TEXT NOT NULL,
    metadata TEXT, created_at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS files_branch ON files(branch_id, kind);
""",
    added_columns={"files": [("removed_at", "TEXT")]},  # retention
)


class FileRecords(StoreDatabase):
    """Model files, retention and disk use (a family of :class:`~branchkey_integrations.server.store.Store`)."""

    def new_temp_path(self) -> Path:
        """A fresh temporary name in the files directory (same filesystem, so os.replace is atomic)."""
        return self.files_dir / f"{TEMP_PREFIX}{uuid.uuid4().hex}"

    def sync_file(self, file_id: str) -> None:
        """Make a file committed with ``durable=False`` durable: fsync it, then its directory (the rename)."""
        fsync_path(self.files_dir / f"{file_id}.npz")
        fsync_path(self.files_dir)

    @staticmethod
    def remove_files(paths: Sequence[Path]) -> None:
        """Remove files whose rows are already gone (those already removed are fine)."""
        remove_files(paths)

    def get_file(self, file_id: str) -> FileRecord | None:
        rows = self._query("SELECT * FROM files WHERE id = ?", (file_id,))
        return FileRecord(**dict(rows[0])) if rows else None

    def file_path(self, record: FileRecord) -> Path:
        return self.data_dir / record.path

    def list_files(self, branch_id: str, kind: str) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT id, kind, leaf_id, run_number, round_index, size, sha256, metadata, created_at, removed_at"
            " FROM files WHERE branch_id = ? AND kind = ? ORDER BY created_at", (branch_id, kind),
        )
        return [dict(row) for row in rows]

    def cleanup_stray_files(self) -> int:
        """Delete temp files and files without a row (a crash before commit); call only with no server running."""
        known = {row[0] for row in self._query("SELECT path FROM files WHERE removed_at IS NULL UNION ALL"
                                               " SELECT path FROM analytics_files WHERE removed_at IS NULL")}
        removed = 0
        for entry in self.files_dir.iterdir():
            relative = f"{FILES_DIR}/{entry.name}"
            if entry.is_file() and (entry.name.startswith(TEMP_PREFIX) or relative not in known):
                entry.unlink()
                removed += 1
        states = {path for row in self._query("SELECT m_path, v_path FROM optimizer_state") for path in row if path}
        for entry in self.state_dir.iterdir():
            if entry.is_file() and f"{STATE_DIR}/{entry.name}" not in states:  # a temp, or superseded before a crash
                entry.unlink()
                removed += 1
        if removed:
            logger.info("removed %d stray file(s) left by an interrupted write", removed)
        return removed

    # -- retention ------------------------------------------------------------------------

    def prune(self, branch_id: str, *, keep_uploads: bool, keep_rounds: int) -> list[Path]:
        """Mark removed what retention drops; return those files for the caller to unlink after the commit.

        Uploads of rounds no longer open (aggregated or abandoned) go unless ``keep_uploads``;
        aggregates beyond the latest ``keep_rounds`` of the branch go (0 keeps all; the latest
        always stays). Rows stay (listings, layouts, a 410 for a removed download); a crash
        before the unlink leaves files whose rows say removed, which start-up cleanup deletes.
        """
        with self._tx() as conn:
            doomed: list[tuple[str, str]] = []
            if not keep_uploads:
                doomed += conn.execute(
                    "SELECT f.id, f.path FROM files f JOIN rounds r ON r.branch_id = f.branch_id"
                    " AND r.run_number = f.run_number AND r.round_index = f.round_index"
                    " WHERE f.branch_id = ? AND f.kind = 'upload' AND f.removed_at IS NULL AND r.status != 'open'",
                    (branch_id,)).fetchall()
            if keep_rounds > 0:
                doomed += conn.execute(
                    "SELECT id, path FROM files WHERE branch_id = ? AND kind = 'aggregate' AND removed_at IS NULL"
                    " AND id NOT IN (SELECT id FROM files WHERE branch_id = ? AND kind = 'aggregate'"
                    " ORDER BY run_number DESC, round_index DESC LIMIT ?)",
                    (branch_id, branch_id, keep_rounds)).fetchall()
            stamp = now_iso()
            conn.executemany("UPDATE files SET removed_at = ? WHERE id = ?", [(stamp, row[0]) for row in doomed])
        if doomed:
            logger.info("branch %s: retention removes %d file(s)", branch_id, len(doomed))
        return [self.data_dir / row[1] for row in doomed]

    def disk_usage(self) -> dict[str, int]:
        """Bytes on disk: ``uploads``, ``aggregates`` (files present), ``optimizer_state`` (server-optimizer
        moments), ``other`` (temporary and stray files), ``database`` (SQLite and its journal)."""
        kinds = {row[0]: row[1] for row in self._query("SELECT path, kind FROM files WHERE removed_at IS NULL UNION ALL"
                                                       " SELECT path, kind FROM analytics_files WHERE removed_at IS NULL")}
        usage = {"uploads": 0, "aggregates": 0, "optimizer_state": 0, "other": 0, "database": 0}
        for entry in self.files_dir.iterdir():
            with contextlib.suppress(FileNotFoundError):
                size = entry.stat().st_size
                kind = kinds.get(f"{FILES_DIR}/{entry.name}")
                usage["uploads" if kind == "upload" else "aggregates" if kind == "aggregate" else "other"] += size
        for entry in self.state_dir.iterdir():
            with contextlib.suppress(FileNotFoundError):
                usage["optimizer_state"] += entry.stat().st_size
        for entry in self.data_dir.glob(DB_NAME + "*"):
            with contextlib.suppress(FileNotFoundError):
                usage["database"] += entry.stat().st_size
        return usage


def remove_files(paths: Sequence[Path]) -> None:
    """Remove files whose rows are already gone (those already removed are fine)."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def install_file(data_dir: Path, temp_path: Path, file_id: str, durable: bool = True) -> str:
    """fsync ``temp_path``, rename it to its final name in ``files/``, fsync the directory; returns the
    relative path. ``durable=False``: the rename only (``FileRecords.sync_file`` does the rest later)."""
    if durable:
        fsync_path(temp_path)
    relative = f"{FILES_DIR}/{file_id}.npz"
    os.replace(temp_path, data_dir / relative)
    if durable:
        fsync_path(data_dir / FILES_DIR)
    return relative
