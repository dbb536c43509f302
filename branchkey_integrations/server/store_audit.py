"""The store's audit trail: every admin action (run control, strategy and size changes, drops and resets,
leaf add / revoke / rotate, admin-token rotation, dashboard login) with when, what and from where.

It is kept with the rest of the store, so a backup of the data directory carries it. Entries never hold
a secret: :func:`scrubbed` drops any detail whose key names one (token, secret, password, key, code)
however a caller filled it, and callers pass names and ids, never credentials.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from .store_db import StoreDatabase, Tables, now_iso

TABLES = Tables(schema="""
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL,
    peer TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '{}');
""")

#: a detail whose key contains one of these is never stored
SECRET_WORDS = ("token", "secret", "password", "key", "code", "credential")
#: entries one listing returns at most
MAX_AUDIT_PAGE = 1000


def scrubbed(detail: Mapping[str, Any]) -> dict[str, Any]:
    """``detail`` without the entries whose key names a secret, values cut to 500 characters.

    Example:
        >>> scrubbed({"leaf": "leaf_2", "session_token": "abc", "note": "x" * 600})["note"][-3:], "session_token" in scrubbed({"session_token": "a"})
        ('xxx', False)
    """
    kept = {}
    for name, value in detail.items():
        if any(word in name.lower() for word in SECRET_WORDS):
            continue
        kept[name] = value[:500] if isinstance(value, str) else value
    return kept


class AuditRecords(StoreDatabase):
    """The audit trail (a family of :class:`~branchkey_integrations.server.store.Store`)."""

    def record_audit(self, action: str, target: str, peer: str, detail: Mapping[str, Any] | None = None) -> int:
        """Append one entry: ``action`` (``leaf.revoke``, ``run.set``, ...), its ``target`` (a branch or leaf id,
        ``admin``), ``peer`` (the caller's address, or ``cli`` for a command acting on the store itself)."""
        text = json.dumps(scrubbed(detail or {}), default=str)
        with self._tx() as conn:
            cursor = conn.execute("INSERT INTO audit (at, action, target, peer, detail) VALUES (?, ?, ?, ?, ?)",
                                  (now_iso(), action, target[:200], peer[:200], text))
        return int(cursor.lastrowid or 0)

    def list_audit(self, *, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """Entries after id ``after``, oldest first, ``limit`` at most (capped at :data:`MAX_AUDIT_PAGE`)."""
        rows = self._query("SELECT id, at, action, target, peer, detail FROM audit WHERE id > ? ORDER BY id LIMIT ?",
                           (after, max(1, min(limit, MAX_AUDIT_PAGE))))
        return [{**dict(row), "detail": json.loads(row["detail"])} for row in rows]

    def latest_audit(self, count: int = 50) -> list[dict[str, Any]]:
        """The latest ``count`` entries, oldest first."""
        rows = self._query("SELECT id, at, action, target, peer, detail FROM audit ORDER BY id DESC LIMIT ?",
                           (max(1, min(count, MAX_AUDIT_PAGE)),))
        return [{**dict(row), "detail": json.loads(row["detail"])} for row in reversed(rows)]
