"""Analytics rounds of branchkey-local: ``federated_analytics`` uploads in, combined fields out.

Beside the learning rounds (:mod:`.rounds`), never mixed with them: a branch may have an open learning round
and an open analytics round at once, each under its own lock, each complete by the branch's rules (``min_leaves``,
else every leaf; ``round_deadline_s`` with at least one upload). An upload is checked on its own
(:func:`~.analytics.check_upload_fields`: an operation per field, dtypes, finite values, ``--max-fields``), then
under the branch's analytics lock against the round so far (:class:`~.analytics.FieldCombination`: the round's
field layout, must_match values, exact sums without overflow), and committed only if all of it holds, so a refused
upload leaves the round as it was. A leaf that sends again in the same round replaces its own upload. A complete
round's combination is written as an archive of the combined fields and the payload-kind key (no ``weighting``:
what the official 3.x client downloads and reads as it does a model aggregate), committed, announced on both
transports with ``"kind": "federated_analytics"`` in the notification's body, and retention applies as for
learning rounds. The combination is kept in memory between uploads and made again from the round's files after a
restart (analytics archives are small: fields, not models).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..core import wire
from ..core.errors import ArchiveError, InvalidValueError, RunNotStartedError
from ..core.protocol import KIND_FEDERATED_ANALYTICS, KIND_KEY, START, aggregation_message
from .aggregation import file_sha256
from .analytics import DEFAULT_MAX_FIELDS, FieldCombination, check_upload_fields, fields_to_json
from .notify import Notifier
from .records import Branch, Leaf
from .rounds import AcceptedUpload, done_future, run_blocked_message
from .store import Store
from .workers import Workers

logger = logging.getLogger(__name__)

#: a failed aggregation is tried again after this many seconds, doubling up to :data:`RETRY_MAX_S`
RETRY_BASE_S, RETRY_MAX_S = 0.5, 8.0


def analytics_message(aggregation_id: str, run_number: int, round_index: int) -> dict[str, Any]:
    """The ``aggregation_status`` of an analytics round: the protocol's message, its body saying the kind."""
    message = aggregation_message(aggregation_id, run_number, round_index)
    message["body"]["kind"] = KIND_FEDERATED_ANALYTICS
    return message


class AnalyticsRounds:
    """Analytics rounds of every branch of one store.

    Args:
        store: the durable state.
        notifier: where aggregation messages go.
        workers: the thread pool for blocking calls and the background-task registry.
        max_fields: fields one upload may hold.
    """

    def __init__(self, store: Store, notifier: Notifier, workers: Workers, *, deadline_check_interval_s: float = 1.0,
                 keep_uploads: bool = False, keep_rounds: int = 0, max_fields: int = DEFAULT_MAX_FIELDS) -> None:
        self.store = store
        self.notifier = notifier
        self.workers = workers
        self.deadline_check_interval_s = deadline_check_interval_s
        self.keep_uploads = keep_uploads
        self.keep_rounds = keep_rounds
        self.max_fields = max_fields
        self._locks: dict[str, asyncio.Lock] = {}
        # branch -> ((run, round), the operations, the leaf ids combined in order, their combination)
        self._combined: dict[str, tuple[tuple[int, int], dict[str, str], list[str], FieldCombination]] = {}
        self._retries: dict[str, int] = {}

    def lock(self, branch_id: str) -> asyncio.Lock:
        return self._locks.setdefault(branch_id, asyncio.Lock())

    async def counted_upload(self, leaf: Leaf, key: str | None) -> AcceptedUpload | None:
        """The leaf's analytics upload already committed with idempotency ``key`` (a retry gets its answer)."""
        if key is None:
            return None
        counted = await self.workers.blocking(self.store.counted_analytics_upload, leaf.id, key)
        if counted is None:
            return None
        logger.info("leaf %s (%s) sent analytics upload %s again (idempotency key %s): answered as first counted",
                    leaf.name, leaf.id, counted[0], key)
        return AcceptedUpload(*counted, done_future())

    async def accept_upload(self, leaf: Leaf, archive: wire.Archive, path: Path, *, size: int, sha256: str,
                            metadata: str | None, key: str | None = None) -> AcceptedUpload:
        """Check an analytics upload against its branch's operations and its round, then commit it.

        Raises:
            RunNotStartedError: the run is paused or stopped.
            InvalidValueError: a field the round cannot combine (the message names it); nothing is stored.
        """
        blocking = self.workers.blocking
        try:
            await blocking(wire.validate_upload, archive, None)
        except ArchiveError as exc:
            raise InvalidValueError(f"Upload rejected: {exc}") from exc
        fields = archive.fields
        async with self.lock(leaf.branch_id):
            if (counted := await self.counted_upload(leaf, key)) is not None:
                return counted
            branch = await blocking(self.store.require_branch, leaf.branch_id)
            if branch.run_status != START:
                raise RunNotStartedError(run_blocked_message(branch))
            ops = await blocking(self.store.field_ops, branch.id)
            try:
                check_upload_fields(fields, ops, branch_id=branch.id, max_fields=self.max_fields)
                round_index = await blocking(self.store.analytics_round_for_upload, branch.id, branch.run_number)
                combination = await self._combination(branch, round_index, ops, leaf.id)
                combination.combined(leaf.name, fields)
            except InvalidValueError as exc:
                raise InvalidValueError(str(exc) if str(exc).startswith("Upload rejected") else
                                        f"Upload rejected: {exc}") from exc
            layout = fields_to_json({name: wire.LayerSpec.of(value) for name, value in fields.items()})
            file_id, replaced = await blocking(
                self.store.commit_analytics_upload, path, leaf=leaf, run_number=branch.run_number,
                round_index=round_index, fields=layout, size=size, sha256=sha256, metadata=metadata, key=key)
            combination.add(leaf.name, fields)
            self._combined[branch.id][2].append(leaf.id)
        logger.info("leaf %s (%s) uploaded analytics %s to branch %s run %d analytics round %d", leaf.name, leaf.id,
                    file_id, branch.id, branch.run_number, round_index)
        if replaced:
            self.workers.spawn(blocking(self.store.remove_files, replaced))
        self.workers.spawn(self.aggregate_if_ready(branch.id))
        return AcceptedUpload(file_id, branch.run_number, round_index, done_future())

    async def _combination(self, branch: Branch, round_index: int, ops: dict[str, str],
                           without: str | None = None) -> FieldCombination:
        """The round's combination so far (without leaf ``without``'s upload, which its new one replaces): the one
        kept in memory while it fits, else made again from the round's files."""
        key = (branch.run_number, round_index)
        kept = self._combined.get(branch.id)
        if kept is not None and kept[0] == key and kept[1] == ops and without not in kept[2]:
            return kept[3]
        uploads = await self.workers.blocking(self.store.analytics_uploads, branch.id, branch.run_number, round_index)
        names = {leaf.id: leaf.name for leaf in await self.workers.blocking(self.store.list_leaves, branch.id)}
        combination, leaf_ids = FieldCombination(ops), []
        for upload in uploads:
            if upload["leaf_id"] == without:
                continue
            archive = await self.workers.blocking(wire.decode, upload["path"])
            combination.add(names.get(upload["leaf_id"], upload["leaf_id"]), archive.fields)
            leaf_ids.append(upload["leaf_id"])
        self._combined[branch.id] = (key, dict(ops), leaf_ids, combination)
        return combination

    async def aggregate_if_ready(self, branch_id: str, *, deadline: bool = False) -> str | None:
        """Combine the branch's open analytics round if complete (or, with ``deadline``, due); returns the id."""
        blocking = self.workers.blocking
        async with self.lock(branch_id):
            branch = await blocking(self.store.get_branch, branch_id)
            current = await blocking(self.store.open_analytics_round, branch_id, branch.run_number) if branch else None
            if branch is None or current is None:
                return None
            run_number, round_index = branch.run_number, current["round_index"]
            uploads = await blocking(self.store.analytics_uploads, branch_id, run_number, round_index)
            required = await blocking(self.store.required_uploads, branch)
            if not uploads or len(uploads) < required and not deadline:
                return None
            try:
                ops = await blocking(self.store.field_ops, branch_id)
                combination = await self._combination(branch, round_index, ops)
                temp = await blocking(self._write, combination)
                size, sha256 = temp.stat().st_size, await blocking(file_sha256, temp)
                aggregate_id = await blocking(
                    self.store.commit_analytics_aggregate, temp, branch_id=branch_id, run_number=run_number,
                    round_index=round_index, fields=fields_to_json(combination.layout or {}), size=size, sha256=sha256,
                    contributors=len(uploads))
            except Exception as exc:  # a full disk, a damaged file: the round stays open and is tried again
                self._retry(branch_id, deadline, f"analytics round {round_index + 1} of run {run_number}: {exc!r}")
                return None
            self._combined.pop(branch_id, None)
            self._retries.pop(branch_id, None)
        logger.info("branch %s run %d analytics round %d combined from %d upload(s) as %s", branch_id, run_number,
                    round_index, len(uploads), aggregate_id)
        await self.notifier.publish(branch.tree_id, branch_id, analytics_message(aggregate_id, run_number, round_index))
        await self.apply_retention(branch_id)
        return aggregate_id

    def _write(self, combination: FieldCombination) -> Path:
        """The combined fields and the payload-kind key as a stored archive in a temporary file, fsynced."""
        temp = self.store.new_temp_path()
        with open(temp, "wb") as handle:
            with wire.ArchiveWriter(handle) as writer:
                for name, value in combination.values.items():
                    writer.add(name, value, allow_text=True)
                writer.add(KIND_KEY, np.array(KIND_FEDERATED_ANALYTICS), allow_text=True)
        return temp  # install_file fsyncs it

    def _retry(self, branch_id: str, deadline: bool, problem: str) -> None:
        failed = self._retries[branch_id] = self._retries.get(branch_id, 0) + 1
        delay = min(RETRY_BASE_S * 2 ** (failed - 1), RETRY_MAX_S)
        (logger.error if failed == 1 else logger.debug)(
            "combining branch %s failed (attempt %d; the round stays open, next try in %.1f s): %s", branch_id, failed,
            delay, problem)
        asyncio.get_running_loop().call_later(
            delay, lambda: self.workers.spawn(self.aggregate_if_ready(branch_id, deadline=deadline)))

    async def apply_retention(self, branch_id: str) -> None:
        try:
            paths = await self.workers.blocking(self.store.prune_analytics, branch_id, keep_uploads=self.keep_uploads,
                                                keep_rounds=self.keep_rounds)
            await self.workers.blocking(self.store.remove_files, paths)
        except OSError as exc:  # retention never fails a round; next time it tries again
            logger.error("analytics retention for branch %s failed: %s", branch_id, exc)

    async def drop_uploads(self, branch_id: str, leaf_id: str | None) -> int:
        """Drop one leaf's upload from the open analytics round, or (None) abandon the round; returns how many."""
        async with self.lock(branch_id):
            paths = await self.workers.blocking(self.store.drop_analytics_uploads, branch_id, leaf_id)
            self._combined.pop(branch_id, None)
        await self.workers.blocking(self.store.remove_files, paths)
        return len(paths)

    async def abandon(self, branch_id: str) -> None:
        """Abandon the branch's open analytics round (its run stopped)."""
        async with self.lock(branch_id):
            await self.workers.blocking(self.store.abandon_analytics_round, branch_id)
            self._combined.pop(branch_id, None)
        await self.apply_retention(branch_id)

    async def recover(self) -> None:
        """Combine analytics rounds that were complete when the server stopped."""
        for branch_id in await self.workers.blocking(self.store.open_analytics_branches):
            try:
                await self.aggregate_if_ready(branch_id)
            except Exception:  # one broken branch must not keep the server from starting
                logger.exception("recovering the analytics round of branch %s failed; it stays open", branch_id)

    async def deadline_loop(self) -> None:
        """Combine analytics rounds whose deadline passed, checked every ``deadline_check_interval_s``."""
        while True:
            await asyncio.sleep(self.deadline_check_interval_s)
            try:
                for branch_id in await self.workers.blocking(self.store.analytics_rounds_past_deadline):
                    await self.aggregate_if_ready(branch_id, deadline=True)
            except Exception:  # the loop must outlive one bad round
                logger.exception("analytics round deadline check failed")


__all__ = ["AnalyticsRounds", "analytics_message"]
