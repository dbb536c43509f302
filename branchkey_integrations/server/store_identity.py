"""The store's identity records: trees, branches (their settings, strategy and model-size limit),
leaves with their session tokens (revoked or rotated by the operator), and the admin token's rotation.

A revoked leaf keeps its row (its uploads, metrics and name stay in the history) with ``revoked_at``
set: it no longer authenticates nor counts in a round. Rotating a leaf replaces its session token.

A branch is created with its run ``start``/1 and round 0 open (the round's row belongs to
:mod:`.store_rounds`); changing its strategy drops its server-optimizer state
(:mod:`.store_optimizer`) in the same transaction.
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
from pathlib import Path
from typing import Mapping

from ..core.errors import InvalidValueError, RecordNotFoundError, RoundInProgressError
from .records import Branch, Leaf, ModelSizeLimit
from .durable import write_private_file
from .store_db import ADMIN_TOKEN_FILE, StoreDatabase, Tables, new_id, now_iso
from .store_optimizer import drop_state
from .store_rounds import insert_open_round
from .strategies import DEFAULT_STRATEGY, check_strategy

logger = logging.getLogger(__name__)

MAX_MIN_LEAVES = 1_000_000  # a round needs at most every leaf; a huge value would overflow SQLite's integers
#: a branch without an operator's max_model_bytes takes uploads of up to this many times its first aggregate's
#: size, plus LEARNED_MODEL_SLACK: room for a model that grows a little between runs, none for a bomb
LEARNED_MODEL_FACTOR = 2
LEARNED_MODEL_SLACK = 16 << 20
MAX_MODEL_BYTES = 1 << 50  # a limit SQLite's integers hold, far above any model

TABLES = Tables(
    schema="""
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
""",
    added_columns={"branches": [("strategy_params", "TEXT NOT NULL DEFAULT '{}'"),  # strategies
                                ("max_model_bytes", "INTEGER")],
                   "leaves": [("revoked_at", "TEXT")]},  # the leaf lifecycle: null while the leaf may call  # an upload's inflated size, at most
)


class IdentityRecords(StoreDatabase):
    """Trees, branches and leaves (a family of :class:`~branchkey_integrations.server.store.Store`)."""

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
        check_branch_settings(name, min_leaves, round_deadline_s)
        check_max_model_bytes(max_model_bytes)
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
            insert_open_round(conn, branch.id, 1, 0)
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
            stale = drop_state(conn, branch_id)
        logger.info("branch %s: strategy %s %s (optimizer state reset)", branch_id, strategy, params)
        return self.require_branch(branch_id), [self.data_dir / path for path in stale]

    def set_max_model_bytes(self, branch_id: str, max_model_bytes: int | None) -> Branch:
        """Set how many bytes an upload to the branch may inflate to, or (None) learn it (:meth:`model_size_limit`).

        Raises:
            InvalidValueError: not an integer from 1 to :data:`MAX_MODEL_BYTES`, nor None.
            RecordNotFoundError: no such branch.
        """
        check_max_model_bytes(max_model_bytes)
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
                              f"learned from its first aggregate, round {round_index + 1} of run {run_number}: {size} bytes, "
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
        """The leaf with this id, or None (also for a revoked leaf: it may no longer call)."""
        rows = self._query(
            "SELECT id, name, session_token, owner_id, tree_id, branch_id FROM leaves WHERE id = ? AND revoked_at IS NULL",
            (leaf_id,))
        return Leaf(**dict(rows[0])) if rows else None

    def list_leaves(self, branch_id: str | None = None, *, tree_id: str | None = None,
                    include_revoked: bool = False) -> list[Leaf]:
        """Leaves of one branch, of one tree, or (neither given) all of them; revoked ones only when asked."""
        sql = "SELECT id, name, session_token, owner_id, tree_id, branch_id FROM leaves WHERE "
        sql += "1" if include_revoked else "revoked_at IS NULL"
        if branch_id:
            rows = self._query(sql + " AND branch_id = ? ORDER BY created_at, name", (branch_id,))
        elif tree_id:
            rows = self._query(sql + " AND tree_id = ? ORDER BY created_at, name", (tree_id,))
        else:
            rows = self._query(sql + " ORDER BY created_at, name")
        return [Leaf(**dict(row)) for row in rows]

    def leaf_states(self, branch_id: str) -> list[dict[str, str | None]]:
        """Every leaf of the branch with ``created_at`` and ``revoked_at`` (null while it may call), no token."""
        rows = self._query("SELECT id, name, created_at, revoked_at FROM leaves WHERE branch_id = ?"
                           " ORDER BY created_at, name", (branch_id,))
        return [dict(row) for row in rows]

    def _active_leaf(self, conn: sqlite3.Connection, branch_id: str, leaf_ref: str) -> Leaf:
        row = conn.execute("SELECT id, name, session_token, owner_id, tree_id, branch_id, revoked_at FROM leaves"
                           " WHERE branch_id = ? AND (id = ? OR name = ?)", (branch_id, leaf_ref, leaf_ref)).fetchone()
        if row is None:
            raise RecordNotFoundError(f"No leaf {leaf_ref[:80]!r} (id or name) in branch {branch_id}; "
                                      f"'branchkey-local leaf list' shows them.")
        if row["revoked_at"] is not None:
            raise RecordNotFoundError(f"Leaf {row['name']} ({row['id']}) was revoked at {row['revoked_at']}; "
                                      f"add a new leaf instead ('branchkey-local leaf add').")
        return Leaf(*(row[k] for k in ("id", "name", "session_token", "owner_id", "tree_id", "branch_id")))

    def revoke_leaf(self, branch_id: str, leaf_ref: str) -> Leaf:
        """Revoke a leaf (by id or name): its token is refused from now on and it no longer counts in rounds.

        Raises:
            RecordNotFoundError: no such leaf in the branch, or it is revoked already.
        """
        with self._tx() as conn:
            leaf = self._active_leaf(conn, branch_id, leaf_ref)
            conn.execute("UPDATE leaves SET revoked_at = ? WHERE id = ?", (now_iso(), leaf.id))
        logger.warning("leaf %s (%s) of branch %s revoked", leaf.name, leaf.id, branch_id)
        return leaf

    def rotate_leaf(self, branch_id: str, leaf_ref: str) -> Leaf:
        """Give a leaf (by id or name) a new session token; the old one is refused from now on.

        Raises:
            RecordNotFoundError: no such leaf in the branch, or it is revoked.
        """
        with self._tx() as conn:
            leaf = self._active_leaf(conn, branch_id, leaf_ref)
            token = secrets.token_urlsafe(32)
            conn.execute("UPDATE leaves SET session_token = ? WHERE id = ?", (token, leaf.id))
        logger.warning("leaf %s (%s) of branch %s: session token rotated", leaf.name, leaf.id, branch_id)
        return Leaf(leaf.id, leaf.name, token, leaf.owner_id, leaf.tree_id, leaf.branch_id)

    def rotate_admin_token(self) -> str:
        """A new admin token, in the store and ``<data_dir>/admin_token`` (0600); the old one is refused."""
        token = secrets.token_urlsafe(32)
        with self._tx() as conn:
            conn.execute("UPDATE kv SET value = ? WHERE key = 'admin_token'", (token,))
        write_private_file(self.data_dir / ADMIN_TOKEN_FILE, token + "\n")
        self.admin_token = token
        logger.warning("admin token rotated (written to %s)", self.data_dir / ADMIN_TOKEN_FILE)
        return token


def check_max_model_bytes(value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_MODEL_BYTES:
        raise InvalidValueError(f"Expected max_model_bytes to be an integer from 1 to {MAX_MODEL_BYTES} or null "
                                f"(learned from the branch's first aggregate). Received: {value!r:.80}")


def check_branch_settings(name: str, min_leaves: int | None, round_deadline_s: float | None) -> None:
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
