"""Durable state of branchkey-local: SQLite metadata beside model files on disk.

Layout of a data directory::

    <data_dir>/store.sqlite3   metadata (WAL journal, synchronous=FULL)
    <data_dir>/files/<id>.npz  uploads and aggregates, immutable once written
    <data_dir>/state/<id>.npz  a server optimizer's moments (one m and one v per branch at most),
                               referenced by the optimizer_state table, written like a model file and
                               committed in the aggregate's transaction
    <data_dir>/admin_token     the admin API token (mode 0600), read by the CLI

Why this order of writes: a model file is written to a temporary name in ``files/``,
fsynced, renamed into place with ``os.replace`` and the directory fsynced, and only
then is its database row committed. A crash (even ``kill -9``) before the commit leaves
an orphan file that :meth:`Store.cleanup_stray_files` deletes on the next start; a crash
after it loses nothing. "Accepted" means "row committed", and the HTTP 201 is sent only
after that. One exception, for speed: a FedAvg aggregate may be committed before its fsync
(``commit_aggregate(durable=False)``, then :meth:`Store.sync_file`), because it can be made
again, byte for byte, from its round's uploads, which retention keeps until the fsync is done;
after an operating-system crash the server checks and remakes it (``Rounds.recover``).

Run semantics (per branch):

- a new branch starts with ``run_status="start"``, ``run_number=1`` and round 0 open;
- ``pause``: uploads are refused (409); the open round is kept as it is;
- ``start`` after ``pause``: same run number, the round continues;
- ``stop``: the open round is abandoned (its uploads stay on disk but no longer count);
- ``start`` after ``stop``: ``run_number + 1``, round 0 opens.

Each method is one short transaction; a single connection guarded by a lock serves every
thread, which is plenty for metadata (the heavy bytes never pass through SQLite).

The module owns the SQL and the data directory's layout; the row types live in
:mod:`~branchkey_integrations.server.records` and the fsync/rename primitives in
:mod:`~branchkey_integrations.server.durable`. It stays one module on purpose: every query
shares the schema, the lock and the write order above, and splitting it by table would spread
one transaction (an upload touches files, uploads and rounds) across modules.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from ..core.errors import (
    InvalidValueError,
    QuotaExceededError,
    RecordNotFoundError,
    RoundClosedError,
    RoundInProgressError,
    RunNotStartedError,
)
from ..core.protocol import RUN_STATUSES
from ..core.wire import LayerSpec
from .durable import TEMP_PREFIX, fsync_path, write_private_file
from .records import (
    Branch,
    FileRecord,
    Leaf,
    ModelSizeLimit,
    Round,
    StateUpdate,
    UploadInput,
    specs_from_json,
    specs_to_json,
)
from .strategies import DEFAULT_STRATEGY, check_strategy

logger = logging.getLogger(__name__)

DB_NAME = "store.sqlite3"
FILES_DIR = "files"
STATE_DIR = "state"  # server-optimizer moments, referenced by the optimizer_state table
ADMIN_TOKEN_FILE = "admin_token"
#: idempotency keys remembered per leaf (its latest uploads'): a retry comes within a round's timeout of its first try
KEYS_PER_LEAF = 16
MAX_MIN_LEAVES = 1_000_000  # a round needs at most every leaf; a huge value would overflow SQLite's integers
#: a branch without an operator's max_model_bytes takes uploads of up to this many times its first aggregate's
#: size, plus LEARNED_MODEL_SLACK: room for a model that grows a little between runs, none for a bomb
LEARNED_MODEL_FACTOR = 2
LEARNED_MODEL_SLACK = 16 << 20
MAX_MODEL_BYTES = 1 << 50  # a limit SQLite's integers hold, far above any model

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trees (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, owner_id TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS branches (
    id TEXT PRIMARY KEY, tree_id TEXT NOT NULL REFERENCES trees(id), name TEXT NOT NULL,
    min_leaves INTEGER, round_deadline_s REAL, algorithm TEXT NOT NULL DEFAULT 'fedavg',
    run_status TEXT NOT NULL, run_number INTEGER NOT NULL,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL, max_model_bytes INTEGER);
CREATE TABLE IF NOT EXISTS leaves (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, session_token TEXT NOT NULL, owner_id TEXT NOT NULL,
    tree_id TEXT NOT NULL, branch_id TEXT NOT NULL REFERENCES branches(id), created_at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS leaves_branch ON leaves(branch_id);
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('upload', 'aggregate')),
    branch_id TEXT NOT NULL, leaf_id TEXT, run_number INTEGER NOT NULL, round_index INTEGER NOT NULL,
    path TEXT NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL, specs TEXT NOT NULL,
    metadata TEXT, created_at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS files_branch ON files(branch_id, kind);
CREATE TABLE IF NOT EXISTS rounds (
    branch_id TEXT NOT NULL, run_number INTEGER NOT NULL, round_index INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('open', 'aggregated', 'abandoned')),
    aggregate_id TEXT, first_upload_at REAL, opened_at TEXT NOT NULL, closed_at TEXT,
    PRIMARY KEY (branch_id, run_number, round_index));
CREATE TABLE IF NOT EXISTS uploads (
    branch_id TEXT NOT NULL, run_number INTEGER NOT NULL, round_index INTEGER NOT NULL,
    leaf_id TEXT NOT NULL, file_id TEXT NOT NULL, weighting REAL NOT NULL, uploaded_at TEXT NOT NULL,
    UNIQUE (branch_id, run_number, round_index, leaf_id));
CREATE TABLE IF NOT EXISTS metrics (
    id TEXT PRIMARY KEY, mode TEXT NOT NULL, aggregation_id TEXT, leaf_id TEXT NOT NULL,
    branch_id TEXT NOT NULL, tree_id TEXT NOT NULL, data TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS metrics_branch ON metrics(branch_id);
CREATE TABLE IF NOT EXISTS refusals (
    branch_id TEXT NOT NULL, run_number INTEGER NOT NULL, round_index INTEGER NOT NULL,
    leaf_id TEXT NOT NULL, reason TEXT NOT NULL, refused_at TEXT NOT NULL,
    PRIMARY KEY (branch_id, run_number, round_index, leaf_id));
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, tree_id TEXT NOT NULL, branch_id TEXT NOT NULL, message TEXT NOT NULL,
    created REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_try REAL NOT NULL, last_error TEXT);
CREATE TABLE IF NOT EXISTS optimizer_state (
    branch_id TEXT PRIMARY KEY, run_number INTEGER NOT NULL, round_index INTEGER NOT NULL, strategy TEXT NOT NULL,
    params TEXT NOT NULL, m_path TEXT, v_path TEXT, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS upload_keys (
    leaf_id TEXT NOT NULL, key TEXT NOT NULL, file_id TEXT NOT NULL, run_number INTEGER NOT NULL,
    round_index INTEGER NOT NULL, created_at TEXT NOT NULL, PRIMARY KEY (leaf_id, key));
CREATE TABLE IF NOT EXISTS acknowledgments (
    leaf_id TEXT NOT NULL, file_id TEXT NOT NULL, acknowledged_at TEXT NOT NULL, PRIMARY KEY (leaf_id, file_id));
"""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def new_id() -> str:
    return str(uuid.uuid4())


class Store:
    """SQLite metadata plus model files under one data directory; safe to share between threads.

    Example:
        >>> import tempfile
        >>> store = Store(tempfile.mkdtemp())
        >>> tree = store.create_tree("demo")
        >>> branch = store.create_branch(tree["id"], "main")
        >>> [leaf] = store.create_leaves(branch.id, 1)
        >>> store.get_branch(branch.id).run_status
        'start'
        >>> store.close()
    """

    def __init__(self, data_dir: str | os.PathLike) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.files_dir = self.data_dir / FILES_DIR
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.files_dir.mkdir(exist_ok=True)
        self.state_dir = self.data_dir / STATE_DIR
        self.state_dir.mkdir(exist_ok=True)
        self._lock = threading.RLock()
        database = self.data_dir / DB_NAME
        database.touch(mode=0o600)  # it holds session tokens; SQLite gives -wal/-shm the same mode
        self._conn = sqlite3.connect(database, check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.executescript(_SCHEMA)
        self._migrate()
        self._secret = bytes.fromhex(self._kv_setdefault("secret", secrets.token_hex(32)))
        self.admin_token = self._kv_setdefault("admin_token", secrets.token_urlsafe(32))
        self.owner_id = self._kv_setdefault("owner_id", new_id())
        token_file = self.data_dir / ADMIN_TOKEN_FILE
        if not token_file.exists():
            write_private_file(token_file, self.admin_token + "\n")

    # -- plumbing -------------------------------------------------------------------------

    def _migrate(self) -> None:
        """Add the columns that stores made by earlier versions lack (their rows get the defaults)."""
        added = {"files": [("removed_at", "TEXT")],  # retention
                 "branches": [("strategy_params", "TEXT NOT NULL DEFAULT '{}'"),  # strategies
                              ("max_model_bytes", "INTEGER")],  # an upload's inflated size, at most
                 "rounds": [("strategy", "TEXT"), ("strategy_note", "TEXT")],
                 "metrics": [("run_number", "INTEGER"), ("round_index", "INTEGER")]}  # the round a report counts in
        for table, columns in added.items():
            present = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
            for name, kind in columns:
                if name not in present:
                    self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
        self._conn.execute("CREATE INDEX IF NOT EXISTS metrics_leaf_round ON metrics(leaf_id, run_number, round_index)")

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE so a second process waits instead of failing later."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def _kv_setdefault(self, key: str, value: str) -> str:
        with self._tx() as conn:
            conn.execute("INSERT OR IGNORE INTO kv (key, value) VALUES (?, ?)", (key, value))
            return conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()[0]

    @property
    def secret(self) -> bytes:
        """HMAC key for signed download URLs; stable across restarts so issued URLs stay valid."""
        return self._secret

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- trees, branches, leaves ----------------------------------------------------------

    def create_tree(self, name: str, owner_id: str | None = None) -> dict[str, str]:
        if not isinstance(name, str) or not name.strip():
            raise InvalidValueError(f"Expected a non-empty tree name. Received: name={name!r}")
        if owner_id is not None and (not isinstance(owner_id, str) or not owner_id.strip()):
            raise InvalidValueError(f"Expected owner_id to be a non-empty string or absent. Received: {owner_id!r:.80}")
        tree = {"id": new_id(), "name": name, "owner_id": owner_id or self.owner_id, "created_at": now_iso()}
        with self._tx() as conn:
            conn.execute("INSERT INTO trees (id, name, owner_id, created_at) VALUES (:id, :name, :owner_id, :created_at)", tree)
        return tree

    def list_trees(self) -> list[dict[str, str]]:
        return [dict(row) for row in self._query("SELECT * FROM trees ORDER BY created_at")]

    def require_tree(self, tree_id: str) -> dict[str, str]:
        rows = self._query("SELECT * FROM trees WHERE id = ?", (tree_id,))
        if not rows:
            raise RecordNotFoundError(f"No tree with id {tree_id!r}.")
        return dict(rows[0])

    def create_branch(
        self, tree_id: str, name: str, *, min_leaves: int | None = None, round_deadline_s: float | None = None,
        strategy: str = DEFAULT_STRATEGY, strategy_params: Mapping[str, float] | None = None,
        max_model_bytes: int | None = None,
    ) -> Branch:
        """Create a branch whose run is ``start``/1 with round 0 open, aggregating with ``strategy``
        (:mod:`~branchkey_integrations.server.strategies`; parameters not given take their defaults);
        ``max_model_bytes``: see :meth:`model_size_limit`."""
        _check_branch_settings(name, min_leaves, round_deadline_s)
        _check_max_model_bytes(max_model_bytes)
        params = json.dumps(check_strategy(strategy, strategy_params))
        stamp = now_iso()
        branch = Branch(new_id(), tree_id, name, min_leaves, round_deadline_s, strategy, "start", 1, stamp, stamp,
                        params, max_model_bytes)
        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM trees WHERE id = ?", (tree_id,)).fetchone() is None:
                raise RecordNotFoundError(f"No tree with id {tree_id!r}; create the tree first.")
            conn.execute(
                "INSERT INTO branches (id, tree_id, name, min_leaves, round_deadline_s, algorithm, run_status,"
                " run_number, created_at, updated_at, strategy_params, max_model_bytes) VALUES (:id, :tree_id, :name,"
                " :min_leaves, :round_deadline_s, :algorithm, :run_status, :run_number, :created_at, :updated_at,"
                " :strategy_params, :max_model_bytes)",
                {**branch.to_dict(), "strategy_params": params},
            )
            _open_round(conn, branch.id, 1, 0)
        logger.info("created branch %s in tree %s", branch.id, tree_id)
        return branch

    def get_branch(self, branch_id: str) -> Branch | None:
        rows = self._query("SELECT * FROM branches WHERE id = ?", (branch_id,))
        return Branch(**dict(rows[0])) if rows else None

    def require_branch(self, branch_id: str) -> Branch:
        branch = self.get_branch(branch_id)
        if branch is None:
            raise RecordNotFoundError(f"No branch with id {branch_id!r}.")
        return branch

    def list_branches(self) -> list[Branch]:
        return [Branch(**dict(row)) for row in self._query("SELECT * FROM branches ORDER BY created_at")]

    def set_strategy(self, branch_id: str, strategy: str,
                     strategy_params: Mapping[str, float] | None = None) -> tuple[Branch, list[Path]]:
        """Change the branch's strategy between rounds; its server-optimizer state starts afresh.

        Refused while the open round holds uploads: they were sent for the old strategy's round, and
        a round aggregated half by one rule and half by another is what no one asked for. Returns the
        branch and the superseded state files, for the caller to unlink after the commit.

        Raises:
            InvalidValueError: an unknown strategy, parameter, or a value out of range.
            RecordNotFoundError: no such branch.
            RoundInProgressError: the open round already holds uploads (they are named).
        """
        params = json.dumps(check_strategy(strategy, strategy_params))
        with self._tx() as conn:
            self.require_branch(branch_id)
            waiting = [row[0] for row in conn.execute(
                "SELECT l.name FROM uploads u JOIN leaves l ON l.id = u.leaf_id JOIN rounds r ON r.branch_id = u.branch_id"
                " AND r.run_number = u.run_number AND r.round_index = u.round_index JOIN branches b ON b.id = r.branch_id"
                " AND b.run_number = r.run_number WHERE u.branch_id = ? AND r.status = 'open' ORDER BY l.name",
                (branch_id,))]
            if waiting:
                raise RoundInProgressError(
                    f"Branch {branch_id}'s open round already holds the upload(s) of {', '.join(waiting[:20])}; change "
                    f"the strategy between rounds (after this round is aggregated), or reset the round first "
                    f"('branchkey-local round reset').")
            conn.execute("UPDATE branches SET algorithm = ?, strategy_params = ?, updated_at = ? WHERE id = ?",
                         (strategy, params, now_iso(), branch_id))
            stale = _drop_state(conn, branch_id)
        logger.info("branch %s: strategy %s %s (optimizer state reset)", branch_id, strategy, params)
        return self.require_branch(branch_id), [self.data_dir / path for path in stale]

    def set_max_model_bytes(self, branch_id: str, max_model_bytes: int | None) -> Branch:
        """Set how many bytes an upload to the branch may inflate to, or (None) learn it (:meth:`model_size_limit`).

        Raises:
            InvalidValueError: not an integer from 1 to :data:`MAX_MODEL_BYTES`, nor None.
            RecordNotFoundError: no such branch.
        """
        _check_max_model_bytes(max_model_bytes)
        with self._tx() as conn:
            if not conn.execute("UPDATE branches SET max_model_bytes = ?, updated_at = ? WHERE id = ?",
                                (max_model_bytes, now_iso(), branch_id)).rowcount:
                raise RecordNotFoundError(f"No branch with id {branch_id!r}.")
        logger.info("branch %s: max_model_bytes=%s", branch_id, max_model_bytes)
        return self.require_branch(branch_id)

    def model_size_limit(self, branch_id: str) -> ModelSizeLimit | None:
        """How many bytes an upload to the branch may inflate to (what its zip directory declares), or None:
        the server's limits alone.

        The operator's ``max_model_bytes`` when set; else learned from the branch's first aggregate
        (:data:`LEARNED_MODEL_FACTOR` times its size plus :data:`LEARNED_MODEL_SLACK`), so that once a round
        has shown the model's size an upload far beyond it (a compression bomb under the ratio limit) is
        refused before anything is inflated; None before the branch's first aggregate.
        """
        rows = self._query("SELECT max_model_bytes FROM branches WHERE id = ?", (branch_id,))
        if rows and rows[0][0] is not None:
            return ModelSizeLimit(rows[0][0], "set for this branch")
        rows = self._query("SELECT size, run_number, round_index FROM files WHERE branch_id = ? AND kind = 'aggregate'"
                           " ORDER BY run_number, round_index LIMIT 1", (branch_id,))
        if not rows:
            return None
        size, run_number, round_index = rows[0]
        return ModelSizeLimit(LEARNED_MODEL_FACTOR * size + LEARNED_MODEL_SLACK,
                              f"learned from its first aggregate, run {run_number} round {round_index}: {size} bytes, "
                              f"x{LEARNED_MODEL_FACTOR} + {LEARNED_MODEL_SLACK >> 20} MiB")

    def create_leaves(self, branch_id: str, count: int, *, name_prefix: str = "leaf") -> list[Leaf]:
        """Create ``count`` leaves; names continue the branch's numbering (leaf_1, leaf_2, ...)."""
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 10_000:
            raise InvalidValueError(f"Expected a leaf count between 1 and 10000. Received: count={count!r}")
        with self._tx() as conn:
            row = conn.execute("SELECT tree_id FROM branches WHERE id = ?", (branch_id,)).fetchone()
            if row is None:
                raise RecordNotFoundError(f"No branch with id {branch_id!r}.")
            tree = conn.execute("SELECT owner_id FROM trees WHERE id = ?", (row["tree_id"],)).fetchone()
            existing = conn.execute("SELECT COUNT(*) FROM leaves WHERE branch_id = ?", (branch_id,)).fetchone()[0]
            leaves = [
                Leaf(new_id(), f"{name_prefix}_{existing + i}", secrets.token_urlsafe(32), tree["owner_id"],
                     row["tree_id"], branch_id)
                for i in range(1, count + 1)
            ]
            conn.executemany(
                "INSERT INTO leaves (id, name, session_token, owner_id, tree_id, branch_id, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(lf.id, lf.name, lf.session_token, lf.owner_id, lf.tree_id, lf.branch_id, now_iso()) for lf in leaves],
            )
        logger.info("created %d leaves in branch %s", count, branch_id)
        return leaves

    def get_leaf(self, leaf_id: str) -> Leaf | None:
        rows = self._query(
            "SELECT id, name, session_token, owner_id, tree_id, branch_id FROM leaves WHERE id = ?", (leaf_id,)
        )
        return Leaf(**dict(rows[0])) if rows else None

    def list_leaves(self, branch_id: str | None = None, *, tree_id: str | None = None) -> list[Leaf]:
        """Leaves of one branch, of one tree, or (neither given) all of them."""
        sql = "SELECT id, name, session_token, owner_id, tree_id, branch_id FROM leaves"
        if branch_id:
            rows = self._query(sql + " WHERE branch_id = ? ORDER BY created_at, name", (branch_id,))
        elif tree_id:
            rows = self._query(sql + " WHERE tree_id = ? ORDER BY created_at, name", (tree_id,))
        else:
            rows = self._query(sql + " ORDER BY created_at, name")
        return [Leaf(**dict(row)) for row in rows]

    # -- runs and rounds ------------------------------------------------------------------

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
                _open_round(conn, branch_id, run_number, 0)
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
        """Uploads that complete a round: min_leaves (capped at the leaf count) or every leaf."""
        count = self._query("SELECT COUNT(*) FROM leaves WHERE branch_id = ?", (branch.id,))[0][0]
        if branch.min_leaves is None:
            return max(count, 1)
        return max(min(branch.min_leaves, count), 1)

    def round_uploads(self, branch_id: str, run_number: int, round_index: int) -> list[UploadInput]:
        rows = self._query(
            "SELECT u.leaf_id, u.file_id, u.weighting, f.path, f.specs FROM uploads u JOIN files f ON f.id = u.file_id"
            " WHERE u.branch_id = ? AND u.run_number = ? AND u.round_index = ? ORDER BY u.uploaded_at, u.leaf_id",
            (branch_id, run_number, round_index),
        )
        return [
            UploadInput(r["leaf_id"], r["file_id"], self.data_dir / r["path"], r["weighting"], specs_from_json(r["specs"]))
            for r in rows
        ]

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
            return specs_from_json(rows[0][0]), f"the aggregate of round {rows[0][1]} of this run"
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

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Hold the connection so several reads see one state (no write of this process in between)."""
        with self._lock:
            yield

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
            conn.execute(
                "INSERT OR REPLACE INTO refusals VALUES (?, ?, ?, ?, ?, ?)",
                (leaf.branch_id, row[0], row[1], leaf.id, reason[:2000], now_iso()))
        return row[0], row[1]

    def round_refusals(self, branch_id: str, run_number: int, round_index: int) -> list[dict[str, Any]]:
        """Refused uploads of one round not since replaced by an accepted one: leaf id and name, reason, time."""
        rows = self._query(
            "SELECT x.leaf_id, l.name AS leaf_name, x.reason, x.refused_at FROM refusals x"
            " JOIN leaves l ON l.id = x.leaf_id WHERE x.branch_id = ? AND x.run_number = ? AND x.round_index = ?"
            " ORDER BY x.refused_at, l.name", (branch_id, run_number, round_index))
        return [dict(row) for row in rows]

    def latest_aggregate(self, branch_id: str) -> dict[str, Any] | None:
        """The branch's latest aggregate: ``{"aggregation_id", "run_number", "round_index", "strategy",
        "strategy_note"}`` (what aggregated it, and why when it was not the branch's strategy), or None."""
        rows = self._query(
            "SELECT aggregate_id AS aggregation_id, run_number, round_index, strategy, strategy_note FROM rounds"
            " WHERE branch_id = ?"
            " AND status = 'aggregated' AND aggregate_id IS NOT NULL"
            " ORDER BY run_number DESC, round_index DESC LIMIT 1", (branch_id,))
        return dict(rows[0]) if rows else None

    # -- files ----------------------------------------------------------------------------

    def new_temp_path(self) -> Path:
        """A fresh temporary name in the files directory (same filesystem, so os.replace is atomic)."""
        return self.files_dir / f"{TEMP_PREFIX}{uuid.uuid4().hex}"

    def _install(self, temp_path: Path, file_id: str, durable: bool = True) -> str:
        """fsync ``temp_path``, rename it to its final name, fsync the directory; returns the relative path.
        ``durable=False``: the rename only (:meth:`sync_file` does the rest later)."""
        if durable:
            fsync_path(temp_path)
        relative = f"{FILES_DIR}/{file_id}.npz"
        os.replace(temp_path, self.data_dir / relative)
        if durable:
            fsync_path(self.files_dir)
        return relative

    def sync_file(self, file_id: str) -> None:
        """Make a file committed with ``durable=False`` durable: fsync it, then its directory (the rename)."""
        fsync_path(self.files_dir / f"{file_id}.npz")
        fsync_path(self.files_dir)

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
        relative = self._install(temp_path, file_id)
        stamp = now_iso()
        replaced: list[str] = []
        try:
            with self._tx() as conn:
                _check_round_accepts(conn, leaf.branch_id, run_number, round_index)
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
                    _remember_key(conn, leaf.id, key, file_id, run_number, round_index, stamp)
                conn.execute(  # an accepted upload clears the leaf's earlier refusal in this round
                    "DELETE FROM refusals WHERE branch_id = ? AND run_number = ? AND round_index = ? AND leaf_id = ?",
                    (leaf.branch_id, run_number, round_index, leaf.id))
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

    @staticmethod
    def remove_files(paths: Sequence[Path]) -> None:
        """Remove files whose rows are already gone (those already removed are fine)."""
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

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
        relative = self._install(temp_path, file_id, durable)
        state_paths: list[str | None] = []
        stamp = now_iso()
        stale: list[str] = []
        try:  # from here, a failure (a state file's install included) unlinks what was installed
            for moment in (state.m_temp, state.v_temp) if state else ():
                state_paths.append(self._install_state(moment))
            with self._tx() as conn:
                if state is not None:
                    stale = _drop_state(conn, branch_id)
                    conn.execute("INSERT INTO optimizer_state VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                 (branch_id, run_number, round_index, state.strategy, json.dumps(dict(state.params)),
                                  *state_paths, stamp))
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
                _open_round(conn, branch_id, run_number, round_index + 1)
        except BaseException:
            for path in [relative, *state_paths]:
                if path is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.data_dir / path)
            raise
        self.remove_files([self.data_dir / path for path in stale])
        logger.info("branch %s run %d round %d aggregated as %s", branch_id, run_number, round_index, file_id)
        return file_id

    # -- server-optimizer state ------------------------------------------------------------

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

    def previous_aggregate(self, branch_id: str, run_number: int, round_index: int) -> tuple[int, Path] | None:
        """(round, file) of the run's latest aggregate before ``round_index`` (the model the round's leaves
        trained from), or None in a run's first round."""
        rows = self._query(
            "SELECT round_index, path FROM files WHERE branch_id = ? AND run_number = ? AND kind = 'aggregate'"
            " AND round_index < ? ORDER BY round_index DESC LIMIT 1",
            (branch_id, run_number, round_index))
        return (rows[0][0], self.data_dir / rows[0][1]) if rows else None

    def new_state_temp_path(self) -> Path:
        """A temporary name in the state directory (start-up cleanup removes it after a crash)."""
        return self.state_dir / f"{TEMP_PREFIX}{uuid.uuid4().hex}"

    def _install_state(self, temp_path: Path | None) -> str | None:
        if temp_path is None:
            return None
        fsync_path(temp_path)
        relative = f"{STATE_DIR}/{uuid.uuid4()}.npz"
        os.replace(temp_path, self.data_dir / relative)
        fsync_path(self.state_dir)
        return relative

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

    def list_uploads(self, branch_id: str) -> list[dict[str, Any]]:
        """Uploads that count in rounds (the latest per leaf and round)."""
        rows = self._query(
            "SELECT u.*, f.size, f.sha256 FROM uploads u JOIN files f ON f.id = u.file_id WHERE u.branch_id = ?"
            " ORDER BY u.run_number, u.round_index, u.uploaded_at", (branch_id,),
        )
        return [dict(row) for row in rows]

    def cleanup_stray_files(self) -> int:
        """Delete temp files and files without a row (a crash before commit); call only with no server running."""
        known = {row[0] for row in self._query("SELECT path FROM files WHERE removed_at IS NULL")}
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

    # -- retention and operator actions -------------------------------------------------

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
                    f"Leaf {leaf_ref[:80]!r} has no upload in the open round (run {run_number} round {round_index}) "
                    f"of branch {branch_id}; 'branchkey-local status' lists the round's uploads.")
            what = "reset the open round" if leaf_ref is None else "dropped this upload"
            reason = f"The server's operator {what}{': ' + note[:500] if note else ''}; upload again."
            stamp = now_iso()
            for leaf_id, _, file_id, _ in rows:
                conn.execute("DELETE FROM uploads WHERE branch_id = ? AND run_number = ? AND round_index = ?"
                             " AND leaf_id = ?", (branch_id, run_number, round_index, leaf_id))
                conn.execute("DELETE FROM files WHERE id = ?", (file_id,))
                conn.execute("INSERT OR REPLACE INTO refusals VALUES (?, ?, ?, ?, ?, ?)",
                             (branch_id, run_number, round_index, leaf_id, reason[:2000], stamp))
            conn.execute(
                "UPDATE rounds SET first_upload_at = NULL WHERE branch_id = ? AND run_number = ? AND round_index = ?"
                " AND NOT EXISTS (SELECT 1 FROM uploads WHERE branch_id = ? AND run_number = ? AND round_index = ?)",
                (branch_id, run_number, round_index) * 2)
        return run_number, round_index, [row[1] for row in rows], [self.data_dir / row[3] for row in rows]

    def disk_usage(self) -> dict[str, int]:
        """Bytes on disk: ``uploads``, ``aggregates`` (files present), ``optimizer_state`` (server-optimizer
        moments), ``other`` (temporary and stray files), ``database`` (SQLite and its journal)."""
        kinds = {row[0]: row[1] for row in self._query("SELECT path, kind FROM files WHERE removed_at IS NULL")}
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

    # -- delivery: the AMQP outbox and what each leaf has fetched ----------------------------

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

    # -- metrics --------------------------------------------------------------------------

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
                    f"Leaf {leaf.name} ({leaf.id}) has sent {sent} metrics reports for run {run_number} round "
                    f"{round_index}, the most this server keeps per leaf and round ({max_per_round}); send the "
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


def _drop_state(conn: sqlite3.Connection, branch_id: str) -> list[str]:
    """Delete the branch's optimizer-state row; return its files (relative) to unlink after the commit."""
    row = conn.execute("SELECT m_path, v_path FROM optimizer_state WHERE branch_id = ?", (branch_id,)).fetchone()
    conn.execute("DELETE FROM optimizer_state WHERE branch_id = ?", (branch_id,))
    return [path for path in row or () if path]


def _remember_key(conn: sqlite3.Connection, leaf_id: str, key: str, file_id: str, run_number: int,
                  round_index: int, stamp: str) -> None:
    """Record an upload's idempotency key; keep the leaf's latest :data:`KEYS_PER_LEAF` keys only."""
    conn.execute("INSERT OR REPLACE INTO upload_keys VALUES (?, ?, ?, ?, ?, ?)",
                 (leaf_id, key, file_id, run_number, round_index, stamp))
    conn.execute("DELETE FROM upload_keys WHERE leaf_id = ? AND rowid NOT IN (SELECT rowid FROM upload_keys"
                 " WHERE leaf_id = ? ORDER BY rowid DESC LIMIT ?)", (leaf_id, leaf_id, KEYS_PER_LEAF))


def _open_round(conn: sqlite3.Connection, branch_id: str, run_number: int, round_index: int) -> None:
    conn.execute(
        "INSERT INTO rounds (branch_id, run_number, round_index, status, opened_at) VALUES (?, ?, ?, 'open', ?)",
        (branch_id, run_number, round_index, now_iso()),
    )


def _check_round_accepts(conn: sqlite3.Connection, branch_id: str, run_number: int, round_index: int) -> None:
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


def _check_max_model_bytes(value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_MODEL_BYTES:
        raise InvalidValueError(f"Expected max_model_bytes to be an integer from 1 to {MAX_MODEL_BYTES} or null "
                                f"(learned from the branch's first aggregate). Received: {value!r:.80}")


def _check_branch_settings(name: str, min_leaves: int | None, round_deadline_s: float | None) -> None:
    if not isinstance(name, str) or not name.strip():
        raise InvalidValueError(f"Expected a non-empty branch name. Received: name={name!r}")
    if min_leaves is not None and (isinstance(min_leaves, bool) or not isinstance(min_leaves, int)
                                   or not 1 <= min_leaves <= MAX_MIN_LEAVES):
        raise InvalidValueError(f"Expected min_leaves to be an integer from 1 to {MAX_MIN_LEAVES} or null (all leaves). "
                                f"Received: {min_leaves!r:.80}")
    if round_deadline_s is not None:
        if isinstance(round_deadline_s, bool) or not isinstance(round_deadline_s, (int, float)) \
                or not 0 < round_deadline_s < float("inf"):
            raise InvalidValueError(
                f"Expected round_deadline_s to be a number of seconds > 0 or null (no deadline). "
                f"Received: {round_deadline_s!r}"
            )


__all__ = [
    "Store", "Branch", "Leaf", "Round", "FileRecord", "UploadInput", "DB_NAME", "FILES_DIR", "ADMIN_TOKEN_FILE",
]
