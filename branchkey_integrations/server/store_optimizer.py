"""The store's server-optimizer state: a branch's latest moments (``state/`` files) and what they followed
(run, round, strategy, parameters), replaced in the transaction of the aggregate they belong to."""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from pathlib import Path
from typing import Mapping, Sequence

from .durable import TEMP_PREFIX, fsync_path
from .records import StateUpdate
from .store_db import STATE_DIR, StoreDatabase, Tables

TABLES = Tables(schema="""
CREATE TABLE IF NOT EXISTS optimizer_state (
    branch_id TEXT PRIMARY KEY, run_number INTEGER NOT NULL, round_index INTEGER NOT NULL, strategy TEXT NOT NULL,
    params TEXT NOT NULL, m_path TEXT, v_path TEXT, created_at TEXT NOT NULL);
""")


class OptimizerRecords(StoreDatabase):
    """Server-optimizer state (a family of :class:`~branchkey_integrations.server.store.Store`)."""

    def optimizer_state(self, branch_id: str, run_number: int, round_index: int, strategy: str,
                        params: Mapping[str, float]) -> tuple[Path | None, Path | None] | None:
        """The stored moments (m, v files) that followed aggregate (run_number, round_index) under this exact
        strategy and parameters, or None: the optimizer then starts from zero moments."""
        rows = self._query("SELECT m_path, v_path FROM optimizer_state WHERE branch_id = ? AND run_number = ?"
                           " AND round_index = ? AND strategy = ? AND params = ?",
                           (branch_id, run_number, round_index, strategy, json.dumps(dict(params))))
        if not rows:
            return None
        return tuple(self.data_dir / path if path else None for path in rows[0])  # type: ignore[return-value]

    def new_state_temp_path(self) -> Path:
        """A temporary name in the state directory (start-up cleanup removes it after a crash)."""
        return self.state_dir / f"{TEMP_PREFIX}{uuid.uuid4().hex}"


def drop_state(conn: sqlite3.Connection, branch_id: str) -> list[str]:
    """Delete the branch's optimizer-state row; return its files (relative) to unlink after the commit."""
    row = conn.execute("SELECT m_path, v_path FROM optimizer_state WHERE branch_id = ?", (branch_id,)).fetchone()
    conn.execute("DELETE FROM optimizer_state WHERE branch_id = ?", (branch_id,))
    return [path for path in row or () if path]


def insert_state(conn: sqlite3.Connection, branch_id: str, run_number: int, round_index: int, state: StateUpdate,
                 paths: Sequence[str | None], stamp: str) -> None:
    """Record the branch's new moments (``paths``: from :func:`install_state`) in the caller's transaction."""
    conn.execute("INSERT INTO optimizer_state VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (branch_id, run_number, round_index, state.strategy, json.dumps(dict(state.params)), *paths, stamp))


def install_state(data_dir: Path, temp_path: Path | None) -> str | None:
    """fsync a moments file, rename it into ``state/`` and fsync the directory; returns the relative path."""
    if temp_path is None:
        return None
    fsync_path(temp_path)
    relative = f"{STATE_DIR}/{uuid.uuid4()}.npz"
    os.replace(temp_path, data_dir / relative)
    fsync_path(data_dir / STATE_DIR)
    return relative
