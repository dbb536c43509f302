"""The store's rounds: runs (the run semantics below), rounds, the uploads counted in them and their
idempotency keys; committing an upload and an aggregate.

Run semantics (per branch):

- a new branch starts with ``run_status="start"``, ``run_number=1`` and round 0 open;
- ``pause``: uploads are refused (409); the open round is kept as it is;
- ``start`` after ``pause``: same run number, the round continues;
- ``stop``: the open round is abandoned (its uploads stay on disk but no longer count);
- ``start`` after ``stop``: ``run_number + 1``, round 0 opens.

Committing an upload or an aggregate is one transaction over several families (the file's row, the
round, the leaf's refusal, a server optimizer's state): it lives here, with the record it is about,
and follows the write order of :mod:`.store_db` (file installed first, row committed after).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..core.errors import (InvalidValueError, LeafRevokedError, RecordNotFoundError, RoundClosedError,
                           RunNotStartedError)
from ..core.protocol import RUN_STATUSES
from ..core.wire import LayerSpec
from .records import Branch, Leaf, Round, StateUpdate, UploadInput, specs_from_json, specs_to_json
from .store_db import StoreDatabase, Tables, new_id, now_iso
from .store_files import install_file, remove_files
from .store_optimizer import drop_state, install_state, insert_state
from .store_refusals import clear_refusal, refuse

logger = logging.getLogger(__name__)

#: idempotency keys remembered per leaf (its latest uploads'): a retry comes within a round's timeout of its first try
KEYS_PER_LEAF = 16

TABLES = Tables(
    schema="""
CREATE TABLE IF NOT EXISTS rounds (
    branch_id TEXT NOT NULL, run_number INTEGER NOT NULL, round_index INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('open', 'aggregated', 'abandoned')),
    aggregate_id TEXT, first_upload_at REAL, opened_at TEXT NOT NULL, closed_at TEXT,
    PRIMARY KEY (branch_id, run_number, round_index));
CREATE TABLE IF NOT EXISTS uploads (
    branch_id TEXT NOT NULL, run_number INTEGER NOT NULL, round_index INTEGER NOT NULL,
    leaf_id TEXT NOT NULL, file_id TEXT NOT NULL, weighting REAL NOT NULL, uploaded_at TEXT NOT NULL,
    UNIQUE (branch_id, run_number, round_index, leaf_id));
CREATE TABLE IF NOT EXISTS upload_keys (
    leaf_id TEXT NOT NULL, key TEXT NOT NULL, file_id TEXT NOT NULL, run_number INTEGER NOT NULL,
    round_index INTEGER NOT NULL, created_at TEXT NOT NULL, PRIMARY KEY (leaf_id, key));
""",
    added_columns={"rounds": [("strategy", "TEXT"), ("strategy_note", "TEXT")]},
)


class RoundRecords(StoreDatabase):
    """Runs, rounds, uploads and upload keys (a family of :class:`~branchkey_integrations.server.store.Store`)."""

    if TYPE_CHECKING:  # from IdentityRecords, beside this family in Store
        def require_branch(self, branch_id: str) -> Branch: ...

    def set_run_status(self, branch_id: str, status: str) -> Branch:
        """Apply the run semantics of the module docstring; returns the updated branch."""
        if status not in RUN_STATUSES:
            raise InvalidValueError(f"Expected run_status in {list(RUN_STATUSES)}. Received: run_status={status!r}")
        with self._tx() as conn:
            row = conn.execute("SELECT run_status, run_number FROM branches WHERE id = ?", (branch_id,)).fetchone()
            if row is None:
                raise RecordNotFoundError(f"No branch with id {branch_id!r}.")
            run_number = row["run_number"]
            if status == "stop":
                conn.execute(
                    "UPDATE rounds SET status = 'abandoned', closed_at = ? WHERE branch_id = ? AND status = 'open'",
                    (now_iso(), branch_id),
                )
            elif status == "start" and row["run_status"] == "stop":
                run_number += 1
                insert_open_round(conn, branch_id, run_number, 0)
            conn.execute(
                "UPDATE branches SET run_status = ?, run_number = ?, updated_at = ? WHERE id = ?",
                (status, run_number, now_iso(), branch_id),
            )
        logger.info("branch %s: run_status=%s run_number=%d", branch_id, status, run_number)
        return self.require_branch(branch_id)

    def open_round(self, branch_id: str) -> Round | None:
        """The open round of the branch's current run, or None (the run is stopped)."""
        rows = self._query(
            "SELECT r.* FROM rounds r JOIN branches b ON b.id = r.branch_id AND b.run_number = r.run_number"
            " WHERE r.branch_id = ? AND r.status = 'open' ORDER BY r.round_index DESC LIMIT 1",
            (branch_id,),
        )
        return Round(**dict(rows[0])) if rows else None

    def list_rounds(self, branch_id: str) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT r.*, (SELECT COUNT(*) FROM uploads u WHERE u.branch_id = r.branch_id AND"
            " u.run_number = r.run_number AND u.round_index = r.round_index) AS upload_count"
            " FROM rounds r WHERE r.branch_id = ? ORDER BY r.run_number, r.round_index",
            (branch_id,),
        )
        return [dict(row) for row in rows]

    def required_uploads(self, branch: Branch) -> int:
        """Uploads that complete a round: min_leaves (capped at the leaf count) or every leaf.

        The leaves counted are those the open round knew, not revoked: a leaf added once the round holds an
        upload counts from the next round on (it may still upload to this one), and a revoked leaf whose upload the
        operator kept in the open round still counts there (the round waits for the others as before)."""
        open_round = ("FROM rounds r JOIN branches b ON b.id = r.branch_id AND b.run_number = r.run_number"
                      " WHERE r.branch_id = l.branch_id AND r.status = 'open'")
        count = self._query(
            f"SELECT COUNT(*) FROM leaves l WHERE l.branch_id = ? AND NOT EXISTS (SELECT 1 {open_round}"
            " AND r.first_upload_at IS NOT NULL"
            " AND l.created_at > strftime('%Y-%m-%dT%H:%M:%f+00:00', r.first_upload_at, 'unixepoch'))"
            f" AND (l.revoked_at IS NULL OR EXISTS (SELECT 1 {open_round} AND EXISTS (SELECT 1 FROM uploads u"
            " WHERE u.branch_id = r.branch_id AND u.run_number = r.run_number AND u.round_index = r.round_index"
            " AND u.leaf_id = l.id)))",
            (branch.id,))[0][0]
        if branch.min_leaves is None:
            return max(count, 1)
        return max(min(branch.min_leaves, count), 1)

    def round_uploads(self, branch_id: str, run_number: int, round_index: int) -> list[UploadInput]:
        rows = self._query(
            "SELECT u.leaf_id, u.file_id, u.weighting, f.path, f.specs FROM uploads u JOIN files f ON f.id = u.file_id"
            " WHERE u.branch_id = ? AND u.run_number = ? AND u.round_index = ? ORDER BY u.uploaded_at, u.leaf_id",
            (branch_id, run_number, round_index),
        )
        return self._upload_inputs(rows)

    def round_uploads_after(self, branch_id: str, run_number: int, round_index: int,
                            held: Sequence[tuple[str, str]]) -> list[UploadInput] | None:
        """The round's uploads committed after ``held`` ((leaf id, file id), in commit order), or None when those
        are no longer its first ones (one was replaced, dropped or reordered).

        Why: a fold pass after each upload listed the whole round, a record and a parsed layout per upload: with
        1,000 leaves, half a million records a round. The held ones are compared by id only.
        """
        where = " WHERE u.branch_id = ? AND u.run_number = ? AND u.round_index = ?"
        ids = [(r[0], r[1]) for r in self._query(f"SELECT u.leaf_id, u.file_id FROM uploads u{where}"
                                                 " ORDER BY u.uploaded_at, u.leaf_id", (branch_id, run_number, round_index))]
        if ids[:len(held)] != list(held):
            return None
        found: dict[str, sqlite3.Row] = {}
        new = [file_id for _, file_id in ids[len(held):]]
        for start in range(0, len(new), 500):  # within SQLite's bound on query parameters
            part = new[start:start + 500]
            rows = self._query("SELECT u.leaf_id, u.file_id, u.weighting, f.path, f.specs FROM uploads u"
                               f" JOIN files f ON f.id = u.file_id{where} AND u.file_id IN ({','.join('?' * len(part))})",
                               (branch_id, run_number, round_index, *part))
            found.update((row["file_id"], row) for row in rows)
        return self._upload_inputs([found[file_id] for file_id in new if file_id in found])

    def round_upload_count(self, branch_id: str, run_number: int, round_index: int) -> int:
        """How many uploads count in the round (without reading them)."""
        return int(self._query("SELECT COUNT(*) FROM uploads WHERE branch_id = ? AND run_number = ? AND round_index = ?",
                               (branch_id, run_number, round_index))[0][0])

    def _upload_inputs(self, rows: Sequence[sqlite3.Row]) -> list[UploadInput]:
        layouts: dict[str, list[LayerSpec]] = {}  # a round's uploads share one layout: parsed once
        inputs = []
        for r in rows:
            specs = layouts.get(r["specs"])
            if specs is None:
                specs = layouts[r["specs"]] = specs_from_json(r["specs"])
            inputs.append(UploadInput(r["leaf_id"], r["file_id"], self.data_dir / r["path"], r["weighting"], specs))
        return inputs

    def round_uploaders(self, branch_id: str, run_number: int, round_index: int) -> list[str]:
        """Ids of the leaves whose upload counts in the round, first upload first (no layouts parsed)."""
        rows = self._query(
            "SELECT leaf_id FROM uploads WHERE branch_id = ? AND run_number = ? AND round_index = ?"
            " ORDER BY uploaded_at, leaf_id", (branch_id, run_number, round_index))
        return [row[0] for row in rows]

    def expected_specs(self, branch_id: str, run_number: int, round_index: int,
                       leaf_id: str | None = None) -> list[LayerSpec] | None:
        """Layout an upload of ``leaf_id`` must match (see :meth:`expected_layout`), or None: any."""
        layout = self.expected_layout(branch_id, run_number, round_index, leaf_id)
        return layout[0] if layout else None

    def expected_layout(self, branch_id: str, run_number: int, round_index: int,
                        leaf_id: str | None = None) -> tuple[list[LayerSpec], str] | None:
        """The layout an upload must match and what fixed it, or None when any layout is welcome.

        From the second round of a run, the previous aggregate's; in a run's first round, that of
        the other leaves' uploads (so a leaf whose upload is the only one may replace it with
        another layout); the first upload of a run's first round sets it.
        """
        rows = self._query(
            "SELECT specs, round_index FROM files WHERE branch_id = ? AND run_number = ? AND kind = 'aggregate'"
            " AND round_index < ? ORDER BY round_index DESC LIMIT 1",
            (branch_id, run_number, round_index),
        )
        if rows:
            return specs_from_json(rows[0][0]), f"the aggregate of round {rows[0][1] + 1} of this run"
        rows = self._query(
            "SELECT f.specs, l.name FROM uploads u JOIN files f ON f.id = u.file_id JOIN leaves l ON l.id = u.leaf_id"
            " WHERE u.branch_id = ? AND u.run_number = ? AND u.round_index = ? AND u.leaf_id IS NOT ?"
            " ORDER BY u.uploaded_at LIMIT 1",
            (branch_id, run_number, round_index, leaf_id),
        )
        return (specs_from_json(rows[0][0]), f"the upload of {rows[0][1]} in this round") if rows else None

    def rounds_past_deadline(self, now: float | None = None) -> list[str]:
        """Branch ids whose open round has uploads and a first upload older than the deadline."""
        now = time.time() if now is None else now
        rows = self._query(
            "SELECT b.id FROM branches b JOIN rounds r ON r.branch_id = b.id AND r.run_number = b.run_number"
            " WHERE r.status = 'open' AND b.run_status = 'start' AND b.round_deadline_s IS NOT NULL"
            " AND r.first_upload_at IS NOT NULL AND r.first_upload_at + b.round_deadline_s <= ?",
            (now,),
        )
        return [row[0] for row in rows]

    def latest_aggregate(self, branch_id: str) -> dict[str, Any] | None:
        """The branch's latest aggregate: ``{"aggregation_id", "run_number", "round_index", "strategy",
        "strategy_note"}`` (what aggregated it, and why when it was not the branch's strategy), or None."""
        rows = self._query(
            "SELECT aggregate_id AS aggregation_id, run_number, round_index, strategy, strategy_note FROM rounds"
            " WHERE branch_id = ?"
            " AND status = 'aggregated' AND aggregate_id IS NOT NULL"
            " ORDER BY run_number DESC, round_index DESC LIMIT 1", (branch_id,))
        return dict(rows[0]) if rows else None

    def commit_upload(
        self, temp_path: Path, *, leaf: Leaf, run_number: int, round_index: int, weighting: float,
        specs: Sequence[LayerSpec], size: int, sha256: str, metadata: str | None, key: str | None = None,
    ) -> tuple[str, list[Path]]:
        """Make an upload durable and count it in its round (replacing the leaf's earlier one).

        ``key``: the upload's idempotency key, remembered with the upload in the same transaction, so that
        :meth:`counted_upload` finds it for a retry even after a crash right after this commit.

        Returns the new file's id and the files of the uploads it replaced. Those no longer count
        and their rows are gone; the caller removes the files with :meth:`remove_files` (the server
        does it after answering, as unlinking 400 MB takes ~0.1 s). A crash before then leaves files
        without rows, which start-up cleanup removes.
        """
        file_id = new_id()
        relative = install_file(self.data_dir, temp_path, file_id)
        stamp = now_iso()
        replaced: list[str] = []
        try:
            with self._tx() as conn:
                check_leaf_current(conn, leaf)
                check_round_accepts(conn, leaf.branch_id, run_number, round_index)
                replaced = [row[0] for row in conn.execute(
                    "SELECT f.path FROM uploads u JOIN files f ON f.id = u.file_id WHERE u.branch_id = ?"
                    " AND u.run_number = ? AND u.round_index = ? AND u.leaf_id = ?",
                    (leaf.branch_id, run_number, round_index, leaf.id))]
                conn.execute(
                    "DELETE FROM files WHERE id IN (SELECT file_id FROM uploads WHERE branch_id = ?"
                    " AND run_number = ? AND round_index = ? AND leaf_id = ?)",
                    (leaf.branch_id, run_number, round_index, leaf.id))
                conn.execute(
                    "INSERT INTO files (id, kind, branch_id, leaf_id, run_number, round_index, path, size, sha256, specs, metadata,"
                    " created_at) VALUES (?, 'upload', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (file_id, leaf.branch_id, leaf.id, run_number, round_index, relative, size, sha256,
                     specs_to_json(specs), metadata, stamp),
                )
                conn.execute(
                    "INSERT INTO uploads VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (branch_id, run_number, round_index,"
                    " leaf_id) DO UPDATE SET file_id = excluded.file_id, weighting = excluded.weighting,"
                    " uploaded_at = excluded.uploaded_at",
                    (leaf.branch_id, run_number, round_index, leaf.id, file_id, weighting, stamp),
                )
                conn.execute(
                    "UPDATE rounds SET first_upload_at = COALESCE(first_upload_at, ?)"
                    " WHERE branch_id = ? AND run_number = ? AND round_index = ?",
                    (time.time(), leaf.branch_id, run_number, round_index),
                )
                if key is not None:
                    remember_key(conn, leaf.id, key, file_id, run_number, round_index, stamp)
                # an accepted upload clears the leaf's earlier refusal in this round
                clear_refusal(conn, leaf.branch_id, run_number, round_index, leaf.id)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.data_dir / relative)
            raise
        return file_id, [self.data_dir / path for path in replaced]

    def counted_upload(self, leaf_id: str, key: str) -> tuple[str, int, int] | None:
        """The ``(file_id, run_number, round_index)`` of the leaf's upload committed with idempotency ``key``."""
        rows = self._query("SELECT file_id, run_number, round_index FROM upload_keys WHERE leaf_id = ? AND key = ?",
                           (leaf_id, key))
        return (rows[0][0], rows[0][1], rows[0][2]) if rows else None

    def commit_aggregate(
        self, temp_path: Path, *, branch_id: str, run_number: int, round_index: int, specs: Sequence[LayerSpec],
        size: int, sha256: str, strategy: str | None = None, strategy_note: str | None = None,
        state: StateUpdate | None = None, durable: bool = True,
    ) -> str:
        """Store an aggregate, close its round and open the next one, all in one transaction.

        ``size`` and ``sha256`` come from whoever wrote the file (hashed while writing, not read back).
        ``strategy``/``strategy_note`` record what aggregated the round (and why, when it was not the
        branch's strategy or its stored state was lost); ``state``, a server optimizer's new moments,
        replaces the branch's stored state in the same transaction, so a crash leaves the old aggregate
        and state or the new ones.
        ``durable=False`` (a FedAvg mean, which its round's uploads can make again): the file is
        renamed into place but not fsynced; the caller calls :meth:`sync_file` before retention.
        """
        digest = sha256
        file_id = new_id()
        relative = install_file(self.data_dir, temp_path, file_id, durable)
        state_paths: list[str | None] = []
        stamp = now_iso()
        stale: list[str] = []
        try:  # from here, a failure (a state file's install included) unlinks what was installed
            for moment in (state.m_temp, state.v_temp) if state else ():
                state_paths.append(install_state(self.data_dir, moment))
            with self._tx() as conn:
                if state is not None:
                    stale = drop_state(conn, branch_id)
                    insert_state(conn, branch_id, run_number, round_index, state, state_paths, stamp)
                conn.execute("UPDATE rounds SET strategy = ?, strategy_note = ? WHERE branch_id = ? AND run_number = ?"
                             " AND round_index = ?", (strategy, strategy_note, branch_id, run_number, round_index))
                conn.execute(
                    "INSERT INTO files (id, kind, branch_id, leaf_id, run_number, round_index, path, size, sha256, specs, metadata,"
                    " created_at) VALUES (?, 'aggregate', ?, NULL, ?, ?, ?, ?, ?, ?, NULL, ?)",
                    (file_id, branch_id, run_number, round_index, relative, size, digest, specs_to_json(specs), stamp),
                )
                updated = conn.execute(
                    "UPDATE rounds SET status = 'aggregated', aggregate_id = ?, closed_at = ?"
                    " WHERE branch_id = ? AND run_number = ? AND round_index = ? AND status = 'open'",
                    (file_id, stamp, branch_id, run_number, round_index),
                ).rowcount
                if updated != 1:
                    raise RoundClosedError(f"Round {run_number}/{round_index} of branch {branch_id} is no longer open.")
                insert_open_round(conn, branch_id, run_number, round_index + 1)
        except BaseException:
            for path in [relative, *state_paths]:
                if path is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.data_dir / path)
            raise
        remove_files([self.data_dir / path for path in stale])
        logger.info("branch %s run %d round %d aggregated as %s", branch_id, run_number, round_index, file_id)
        return file_id

    def previous_aggregate(self, branch_id: str, run_number: int, round_index: int) -> tuple[int, Path] | None:
        """(round, file) of the run's latest aggregate before ``round_index`` (the model the round's leaves
        trained from), or None in a run's first round."""
        rows = self._query(
            "SELECT round_index, path FROM files WHERE branch_id = ? AND run_number = ? AND kind = 'aggregate'"
            " AND round_index < ? ORDER BY round_index DESC LIMIT 1",
            (branch_id, run_number, round_index))
        return (rows[0][0], self.data_dir / rows[0][1]) if rows else None

    def list_uploads(self, branch_id: str) -> list[dict[str, Any]]:
        """Uploads that count in rounds (the latest per leaf and round)."""
        rows = self._query(
            "SELECT u.*, f.size, f.sha256 FROM uploads u JOIN files f ON f.id = u.file_id WHERE u.branch_id = ?"
            " ORDER BY u.run_number, u.round_index, u.uploaded_at", (branch_id,),
        )
        return [dict(row) for row in rows]

    def drop_uploads(self, branch_id: str, leaf_ref: str | None, note: str = "") -> tuple[int, int, list[str], list[Path]]:
        """Drop one leaf's upload (``leaf_ref``: its id or name) or, with None, every upload of the open round.

        The dropped uploads no longer count (their rows go, the round's deadline clock restarts
        when it is left empty) and each leaf concerned finds why (with the operator's ``note``) as
        its refusal in the round's progress. Returns (run_number, round_index, the leaves' names,
        the files to unlink).

        Raises:
            RecordNotFoundError: no such branch or leaf, no open round, or the leaf has no upload in it.
        """
        with self._tx() as conn:
            current = conn.execute(
                "SELECT r.run_number, r.round_index FROM rounds r JOIN branches b ON b.id = r.branch_id"
                " AND b.run_number = r.run_number WHERE r.branch_id = ? AND r.status = 'open'"
                " ORDER BY r.round_index DESC LIMIT 1", (branch_id,)).fetchone()
            if current is None:
                self.require_branch(branch_id)
                raise RecordNotFoundError(f"Branch {branch_id} has no open round (its run is stopped).")
            run_number, round_index = current
            sql = ("SELECT u.leaf_id, l.name, u.file_id, f.path FROM uploads u JOIN leaves l ON l.id = u.leaf_id"
                   " JOIN files f ON f.id = u.file_id WHERE u.branch_id = ? AND u.run_number = ? AND u.round_index = ?")
            params: tuple[Any, ...] = (branch_id, run_number, round_index)
            if leaf_ref is not None:
                sql, params = sql + " AND (l.id = ? OR l.name = ?)", params + (leaf_ref, leaf_ref)
            rows = conn.execute(sql, params).fetchall()
            if leaf_ref is not None and not rows:
                raise RecordNotFoundError(
                    f"Leaf {leaf_ref[:80]!r} has no upload in the open round (round {round_index + 1} of run {run_number}) "
                    f"of branch {branch_id}; 'branchkey-local status' lists the round's uploads.")
            what = "reset the open round" if leaf_ref is None else "dropped this upload"
            reason = f"The server's operator {what}{': ' + note[:500] if note else ''}; upload again."
            stamp = now_iso()
            for leaf_id, _, file_id, _ in rows:
                conn.execute("DELETE FROM uploads WHERE branch_id = ? AND run_number = ? AND round_index = ?"
                             " AND leaf_id = ?", (branch_id, run_number, round_index, leaf_id))
                conn.execute("DELETE FROM files WHERE id = ?", (file_id,))
                refuse(conn, branch_id, run_number, round_index, leaf_id, reason, stamp)
            conn.execute(
                "UPDATE rounds SET first_upload_at = NULL WHERE branch_id = ? AND run_number = ? AND round_index = ?"
                " AND NOT EXISTS (SELECT 1 FROM uploads WHERE branch_id = ? AND run_number = ? AND round_index = ?)",
                (branch_id, run_number, round_index) * 2)
        return run_number, round_index, [row[1] for row in rows], [self.data_dir / row[3] for row in rows]

    def round_upload_totals(self, branch_id: str, run_number: int) -> dict[int, tuple[int, float, str]]:
        """Per round of one run: (uploads counted, their total weighting, the last upload's time)."""
        rows = self._query("SELECT round_index, COUNT(*), SUM(weighting), MAX(uploaded_at) FROM uploads"
                           " WHERE branch_id = ? AND run_number = ? GROUP BY round_index", (branch_id, run_number))
        return {row[0]: (row[1], row[2], row[3]) for row in rows}

    def upload_weightings(self, branch_id: str, run_number: int) -> list[tuple[int, str, float]]:
        """``(round_index, leaf_id, weighting)`` of every counted upload of one run, by round."""
        with self._lock:
            return self._conn.execute("SELECT round_index, leaf_id, weighting FROM uploads WHERE branch_id = ?"
                                      " AND run_number = ? ORDER BY round_index", (branch_id, run_number)).fetchall()



def remember_key(conn: sqlite3.Connection, leaf_id: str, key: str, file_id: str, run_number: int,
                  round_index: int, stamp: str) -> None:
    """Record an upload's idempotency key; keep the leaf's latest :data:`KEYS_PER_LEAF` keys only."""
    conn.execute("INSERT OR REPLACE INTO upload_keys VALUES (?, ?, ?, ?, ?, ?)",
                 (leaf_id, key, file_id, run_number, round_index, stamp))
    conn.execute("DELETE FROM upload_keys WHERE leaf_id = ? AND rowid NOT IN (SELECT rowid FROM upload_keys"
                 " WHERE leaf_id = ? ORDER BY rowid DESC LIMIT ?)", (leaf_id, leaf_id, KEYS_PER_LEAF))


def insert_open_round(conn: sqlite3.Connection, branch_id: str, run_number: int, round_index: int) -> None:
    conn.execute(
        "INSERT INTO rounds (branch_id, run_number, round_index, status, opened_at) VALUES (?, ?, ?, 'open', ?)",
        (branch_id, run_number, round_index, now_iso()),
    )


def check_leaf_current(conn: sqlite3.Connection, leaf: Leaf) -> None:
    """Refuse what ``leaf`` (as it authenticated) commits if its credentials were revoked or rotated since.

    Why at commit: a body of hundreds of MB takes seconds to arrive after the leaf authenticated; a revocation
    meanwhile must not let it count. In the commit's transaction, so a revocation is either before (refused
    here) or after (the upload is the leaf's, kept or dropped as the operator says).
    """
    row = conn.execute("SELECT session_token, revoked_at FROM leaves WHERE id = ?", (leaf.id,)).fetchone()
    if row is None or row["revoked_at"] is not None or row["session_token"] != leaf.session_token:
        what = "revoked" if row is None or row["revoked_at"] is not None else "rotated"
        raise LeafRevokedError(f"Leaf {leaf.name} ({leaf.id}) was {what} while its upload was being received; "
                               "the upload does not count. Ask the operator for the leaf's current credentials file.")


def check_round_accepts(conn: sqlite3.Connection, branch_id: str, run_number: int, round_index: int) -> None:
    branch = conn.execute("SELECT run_status, run_number FROM branches WHERE id = ?", (branch_id,)).fetchone()
    if branch is None or branch["run_status"] != "start":
        status = branch["run_status"] if branch else "missing"
        state = {"pause": "paused", "stop": "stopped"}.get(status, status)
        raise RunNotStartedError(f"run is {state}; uploads are accepted only while run_status is 'start'.")
    row = conn.execute(
        "SELECT status FROM rounds WHERE branch_id = ? AND run_number = ? AND round_index = ?",
        (branch_id, run_number, round_index),
    ).fetchone()
    if branch["run_number"] != run_number or row is None or row["status"] != "open":
        raise RoundClosedError(f"Round {run_number}/{round_index} closed while the upload was checked; upload again.")

