"""After a crash: the latest aggregate of a branch, checked and, if the crash lost it, made again.

A FedAvg aggregate is committed and announced before its fsync (:mod:`~branchkey_integrations.server.rounds`),
so an operating-system crash can lose a file the store says exists. Its round's uploads are kept until
the fsync is done, and the running sum folds them in commit order, so they make the same bytes again.
"""

from __future__ import annotations

import contextlib
import logging
import os

from ..core.errors import AggregationError
from .aggregation import RunningSum, file_sha256
from .store import Store

logger = logging.getLogger(__name__)


def remake_lost_aggregate(store: Store, branch_id: str) -> bool:
    """Check the branch's latest aggregate if its round's uploads are still there (it may have been
    committed before its fsync), remake it from them if the crash lost it, and fsync it.

    The remade file must be the committed one byte for byte: otherwise it is logged and left as it is,
    and False says to keep the uploads (retention waits for the next aggregate). Blocking (a worker
    thread's); O(model) for a branch whose uploads remain, as the aggregate is hashed to be checked.
    """
    latest = store.latest_aggregate(branch_id)
    record = store.get_file(latest["aggregation_id"]) if latest else None
    if latest is None or record is None or record.removed_at is not None:
        return True
    uploads = store.round_uploads(branch_id, latest["run_number"], latest["round_index"])
    if not uploads or not all(u.path.is_file() for u in uploads):
        return True  # retention ran, so the aggregate was durable first
    path = store.file_path(record)
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size == record.size and file_sha256(path) == record.sha256:
            store.sync_file(record.id)
            return True
    temp = store.new_temp_path()
    try:
        running = RunningSum()
        running.sync([(u.leaf_id, u.file_id, u.path, u.weighting) for u in uploads])
        made = running.write(temp)
    except (AggregationError, OSError) as exc:
        made, problem = None, str(exc)
    else:
        problem = "its uploads make another file"
    try:
        if made != (record.size, record.sha256):
            logger.error("aggregate %s of branch %s was lost in a crash and cannot be made again (%s); it stays "
                         "as it is, and so do its uploads", record.id, branch_id, problem)
            return False
        os.replace(temp, path)
        store.sync_file(record.id)
        logger.warning("aggregate %s of branch %s was lost in a crash; made again from its %d upload(s)",
                       record.id, branch_id, len(uploads))
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


__all__ = ["remake_lost_aggregate"]
