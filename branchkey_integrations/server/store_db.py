"""The store's plumbing: one SQLite connection, its lock and transactions, the schema each record
family declares, the migration of older stores, and the ``kv`` table (server secret, admin token, owner).

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
an orphan file that ``Store.cleanup_stray_files`` deletes on the next start; a crash
after it loses nothing. "Accepted" means "row committed", and the HTTP 201 is sent only
after that. One exception, for speed: a FedAvg aggregate may be committed before its fsync
(``commit_aggregate(durable=False)``, then ``Store.sync_file``), because it can be made
again, byte for byte, from its round's uploads, which retention keeps until the fsync is done;
after an operating-system crash the server checks and remakes it (``Rounds.recover``).

Each method of every family is one short transaction (:meth:`StoreDatabase._tx`); a single
connection guarded by a lock serves every thread, which is plenty for metadata (the heavy bytes
never pass through SQLite). A transaction that spans families (an upload touches files, uploads,
upload keys, refusals and rounds) is written in the family that owns the record it is about, and
calls the other families' row helpers with its connection: one transaction, never two.

The families (:class:`~branchkey_integrations.server.store.Store` composes them):
:mod:`.store_identity` (trees, branches, leaves, model-size limits), :mod:`.store_rounds` (runs,
rounds, uploads and their idempotency keys), :mod:`.store_files` (model files, retention, disk use),
:mod:`.store_optimizer` (server-optimizer state), :mod:`.store_refusals`, :mod:`.store_delivery`
(the AMQP outbox, acknowledgments) and :mod:`.store_metrics`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping, NamedTuple, Sequence

from .durable import write_private_file

DB_NAME = "store.sqlite3"
FILES_DIR = "files"
STATE_DIR = "state"  # server-optimizer moments, referenced by the optimizer_state table
ADMIN_TOKEN_FILE = "admin_token"

_KV_SCHEMA = "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);"


class Tables(NamedTuple):
    """What one record family adds to the database: its ``CREATE TABLE``/``INDEX`` lines, the columns
    stores made by earlier versions lack (``{table: [(column, type), ...]}``, rows get the defaults),
    and statements that need those columns (run after they are added)."""

    schema: str
    added_columns: Mapping[str, Sequence[tuple[str, str]]] = {}
    after_migration: str = ""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def new_id() -> str:
    return str(uuid.uuid4())


class StoreDatabase:
    """The connection, lock and transaction helper every record family uses; opens (and migrates) the
    database under ``data_dir`` with the tables of the families listed in :attr:`TABLES`."""

    #: the record families' tables, created in this order
    TABLES: ClassVar[Sequence[Tables]] = ()

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
        self._conn.executescript("\n".join([_KV_SCHEMA, *(tables.schema for tables in self.TABLES)]))
        self._migrate()
        self._secret = bytes.fromhex(self._kv_setdefault("secret", secrets.token_hex(32)))
        self.admin_token = self._kv_setdefault("admin_token", secrets.token_urlsafe(32))
        self.owner_id = self._kv_setdefault("owner_id", new_id())
        token_file = self.data_dir / ADMIN_TOKEN_FILE
        if not token_file.exists():
            write_private_file(token_file, self.admin_token + "\n")

    def _migrate(self) -> None:
        """Add the columns that stores made by earlier versions lack (their rows get the defaults)."""
        for tables in self.TABLES:
            for table, columns in tables.added_columns.items():
                present = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
                for name, kind in columns:
                    if name not in present:
                        self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
        for tables in self.TABLES:
            if tables.after_migration:
                self._conn.executescript(tables.after_migration)

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

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Hold the connection so several reads see one state (no write of this process in between)."""
        with self._lock:
            yield
