"""Durable state of branchkey-local: SQLite metadata beside model files on disk.

:class:`Store` is the one object the rest of the server uses. It composes the record families,
each a module that owns its tables and queries: :mod:`.store_identity` (trees, branches, leaves,
model-size limits), :mod:`.store_rounds` (runs and their semantics, rounds, uploads and their
idempotency keys, committing an upload or an aggregate), :mod:`.store_files` (model files,
retention, disk use), :mod:`.store_optimizer` (server-optimizer state), :mod:`.store_refusals`,
:mod:`.store_delivery` (the AMQP outbox, acknowledgments), :mod:`.store_metrics`, :mod:`.store_analytics`
(field operations, analytics rounds and their files) and :mod:`.store_audit` (the admin actions). They share
one connection, lock and transaction helper and the write order of :mod:`.store_db`, which also
describes the data directory's layout. The row types live in
:mod:`~branchkey_integrations.server.records` and the fsync/rename primitives in
:mod:`~branchkey_integrations.server.durable`.
"""

from __future__ import annotations

from . import (store_analytics, store_audit, store_codecs, store_delivery, store_files, store_identity, store_metrics, store_optimizer,
               store_refusals, store_rounds)
from .records import Branch, FileRecord, Leaf, Round, UploadInput
from .store_audit import AuditRecords
from .store_db import ADMIN_TOKEN_FILE, DB_NAME, FILES_DIR, STATE_DIR, new_id, now_iso
from .store_analytics import AnalyticsRecords
from .store_codecs import CodecRecords
from .store_delivery import DeliveryRecords
from .store_files import FileRecords
from .store_identity import (
    LEARNED_MODEL_FACTOR,
    LEARNED_MODEL_SLACK,
    MAX_MIN_LEAVES,
    MAX_MODEL_BYTES,
    IdentityRecords,
)
from .store_metrics import MetricRecords
from .store_optimizer import OptimizerRecords
from .store_refusals import RefusalRecords
from .store_rounds import KEYS_PER_LEAF, RoundRecords


class Store(IdentityRecords, RoundRecords, FileRecords, OptimizerRecords, RefusalRecords, DeliveryRecords,
            MetricRecords, AnalyticsRecords, AuditRecords, CodecRecords):
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

    TABLES = tuple(family.TABLES for family in (store_identity, store_files, store_rounds, store_metrics,
                                                 store_refusals, store_delivery, store_optimizer, store_analytics,
                                                 store_audit, store_codecs))

    def get_file(self, file_id: str) -> FileRecord | None:
        """A model file, or an analytics one (:mod:`.store_analytics`): a download finds either kind."""
        return FileRecords.get_file(self, file_id) or self.analytics_file(file_id)


__all__ = [
    "Store", "Branch", "Leaf", "Round", "FileRecord", "UploadInput", "DB_NAME", "FILES_DIR", "ADMIN_TOKEN_FILE",
    "STATE_DIR", "KEYS_PER_LEAF", "MAX_MIN_LEAVES", "MAX_MODEL_BYTES", "LEARNED_MODEL_FACTOR", "LEARNED_MODEL_SLACK",
    "new_id", "now_iso",
]
