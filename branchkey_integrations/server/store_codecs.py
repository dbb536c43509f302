"""The store's codec records: the codecs each branch advertises (and so accepts) for uploads.

A branch with none advertises nothing (``service.codecs`` absent from its config): its leaves send plain NPZ
(stored or deflate), as to the hosted platform. The names are checked by the caller
(:func:`~branchkey_integrations.server.codec_policy.check_codecs`).
"""

from __future__ import annotations

import json
from typing import Sequence

from .store_db import StoreDatabase, Tables

TABLES = Tables(schema="""
CREATE TABLE IF NOT EXISTS branch_codecs (branch_id TEXT PRIMARY KEY, codecs TEXT NOT NULL);
""")


class CodecRecords(StoreDatabase):
    """The codecs each branch accepts (a family of :class:`~branchkey_integrations.server.store.Store`)."""

    def branch_codecs(self, branch_id: str) -> list[str]:
        """The codecs the branch advertises, in the order set; empty: none (plain NPZ only)."""
        rows = self._query("SELECT codecs FROM branch_codecs WHERE branch_id = ?", (branch_id,))
        return list(json.loads(rows[0][0])) if rows else []

    def set_branch_codecs(self, branch_id: str, codecs: Sequence[str]) -> list[str]:
        """Advertise ``codecs`` (checked by the caller; empty: none); returns them."""
        with self._tx() as conn:
            conn.execute("DELETE FROM branch_codecs WHERE branch_id = ?", (branch_id,))
            if codecs:
                conn.execute("INSERT INTO branch_codecs VALUES (?, ?)", (branch_id, json.dumps(list(codecs))))
        return self.branch_codecs(branch_id)


__all__ = ["CodecRecords", "TABLES"]
