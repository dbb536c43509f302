"""The round state machine of branchkey-local: accept uploads, aggregate, move the run along.

An upload that passed :mod:`~branchkey_integrations.server.uploads` is, under its branch's
``asyncio.Lock``, checked against the round's layer layout and committed to the store (the
caller answers 201 after that). When the open round holds ``min_leaves`` uploads (default:
every leaf), or its round deadline passes with at least one upload, it is aggregated in a
worker thread, the next round opens, and every leaf of the branch is notified. A run status
change (start, pause, stop; semantics in :mod:`~branchkey_integrations.server.store`) is
applied under the same lock and announced. On start, rounds that were complete when the server
died are aggregated before the server listens. An aggregation that fails (disk full, I/O error)
leaves its round open and is tried again with a backoff (0.5 s doubling to 8 s) until it succeeds.

This module knows nothing of HTTP: a refusal is a domain error of
:mod:`branchkey_integrations.core.errors` (:class:`RunNotStartedError`,
:class:`RoundClosedError`, :class:`InvalidValueError`, :class:`RecordNotFoundError`), which
the HTTP layer maps to a status in one table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from ..core import wire
from ..core.errors import (
    AggregationError,
    ArchiveError,
    InvalidValueError,
    LocalServerError,
    RunNotStartedError,
)
from ..core.protocol import START, aggregation_message, run_status_message
from .aggregation import aggregate_files
from .notify import Notifier
from .records import Branch, Leaf, UploadInput
from .store import Store
from .workers import Workers

logger = logging.getLogger(__name__)

#: a failed aggregation is tried again after 0.5 s, 1 s, 2 s, ... and then every 8 s until it succeeds
AGGREGATION_RETRY_BASE_S = 0.5
AGGREGATION_RETRY_MAX_S = 8.0


def run_blocked_message(branch: Branch) -> str:
    state = {"pause": "paused", "stop": "stopped"}.get(branch.run_status, branch.run_status)
    return (
        f"run is {state} (run_status {branch.run_status!r}, run {branch.run_number}); uploads are accepted only while run_status is "
        f"'start'. Wait for the run to start (the admin sets it with 'branchkey-local run start')."
    )


class AcceptedUpload(NamedTuple):
    """An upload counted in a round: its file id and the run and round it was accepted into."""

    file_id: str
    run_number: int
    round_index: int


class Rounds:
    """Rounds of every branch of one store: uploads in, aggregates and notifications out.

    Args:
        store: the durable state.
        notifier: where aggregation and run-status messages go.
        workers: the thread pool for blocking calls and the background-task registry.
        deadline_check_interval_s: how often :meth:`deadline_loop` looks for overdue rounds.
    """

    def __init__(self, store: Store, notifier: Notifier, workers: Workers, *, deadline_check_interval_s: float) -> None:
        self.store = store
        self.notifier = notifier
        self.workers = workers
        self.deadline_check_interval_s = deadline_check_interval_s
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._retries: dict[str, tuple[int, asyncio.TimerHandle]] = {}  # branch -> failed attempts, next try

    def lock(self, branch_id: str) -> asyncio.Lock:
        return self._locks[branch_id]

    @staticmethod
    def check_accepting(branch: Branch) -> None:
        """Raise :class:`RunNotStartedError` unless the branch's run takes uploads (checked again at commit)."""
        if branch.run_status != START:
            raise RunNotStartedError(run_blocked_message(branch))

    async def accept_upload(
        self, leaf: Leaf, archive: wire.Archive, path: Path, *, size: int, sha256: str, metadata: str | None,
    ) -> AcceptedUpload:
        """Check a decoded upload against its round and commit the file at ``path``; returns its id and round.

        Aggregation, if the round is now complete, follows in the background.

        Raises:
            RunNotStartedError: the run is paused or stopped.
            RoundClosedError: the round closed while the upload was being checked.
            InvalidValueError: the archive does not fit the round's layer layout.
        """
        blocking = self.workers.blocking
        async with self.lock(leaf.branch_id):
            branch = await blocking(self.store.require_branch, leaf.branch_id)
            current = await blocking(self.store.open_round, branch.id)
            if branch.run_status != START or current is None:
                raise RunNotStartedError(run_blocked_message(branch))
            expected = await blocking(self.store.expected_specs, branch.id, current.run_number, current.round_index)
            specs, weighting = archive.specs, float(archive.weighting or 0)
            try:
                await blocking(wire.validate_upload, archive, expected)
            except ArchiveError as exc:
                raise InvalidValueError(f"Upload rejected: {exc}") from exc
            finally:
                archive.layers.clear()  # they may view a memory map of the upload: unmap it before the rename
            file_id, replaced = await blocking(
                self.store.commit_upload, path, leaf=leaf, run_number=current.run_number,
                round_index=current.round_index, weighting=weighting, specs=specs,
                size=size, sha256=sha256, metadata=metadata,
            )
        logger.info("leaf %s (%s) uploaded %s to branch %s run %d round %d", leaf.name, leaf.id, file_id, branch.id,
                    current.run_number, current.round_index)
        if replaced:
            self.workers.spawn(blocking(self.store.remove_files, replaced))
        self.workers.spawn(self.aggregate_if_ready(branch.id))
        return AcceptedUpload(file_id, current.run_number, current.round_index)

    async def record_refusal(self, leaf: Leaf, reason: str) -> None:
        """Remember (and log, by leaf name) an upload refused in the open round, for the round's progress."""
        where = await self.workers.blocking(self.store.record_refusal, leaf, reason)
        at = f"run {where[0]} round {where[1]}" if where else "no open round"
        logger.warning("upload of leaf %s (%s) to branch %s refused (%s): %s", leaf.name, leaf.id, leaf.branch_id,
                       at, reason)

    async def aggregate_if_ready(self, branch_id: str, *, deadline: bool = False) -> str | None:
        """Aggregate the branch's open round if it is complete (or past its deadline); returns the id."""
        blocking = self.workers.blocking
        async with self.lock(branch_id):
            plan = await blocking(self._aggregation_plan, branch_id, deadline)
            if plan is None:
                return None
            branch, run_number, round_index, uploads = plan
            temp = self.store.new_temp_path()
            specs = uploads[0].specs
            try:
                size, digest = await blocking(
                    aggregate_files, [(u.path, u.weighting) for u in uploads], specs, temp, branch.algorithm
                )
                aggregate_id = await blocking(
                    self.store.commit_aggregate, temp, branch_id=branch_id, run_number=run_number,
                    round_index=round_index, specs=specs, size=size, sha256=digest,
                )
            except (AggregationError, LocalServerError, OSError, sqlite3.Error) as exc:
                self._retry_aggregation(branch_id, deadline, f"run {run_number} round {round_index}: {exc}")
                return None
            finally:
                with contextlib.suppress(FileNotFoundError):
                    temp.unlink()
            failed, retry = self._retries.pop(branch_id, (0, None))
            if retry is not None:
                retry.cancel()
                logger.info("branch %s run %d round %d aggregated after %d failed attempt(s)", branch_id, run_number,
                            round_index, failed)
        await self.notifier.publish(branch.tree_id, branch_id, aggregation_message(aggregate_id, run_number, round_index))
        return aggregate_id

    def _retry_aggregation(self, branch_id: str, deadline: bool, problem: str) -> None:
        """Try the failed aggregation again after a backoff (disk full, I/O error: the cause may go away)."""
        failed, retry = self._retries.get(branch_id, (0, None))
        if retry is not None:
            retry.cancel()
        failed += 1
        delay = min(AGGREGATION_RETRY_BASE_S * 2 ** (failed - 1), AGGREGATION_RETRY_MAX_S)
        log = logger.error if failed == 1 else logger.warning if failed % 10 == 0 else logger.debug
        log("aggregating branch %s %s failed (attempt %d); the round stays open, next try in %.1f s",
            branch_id, problem, failed, delay)
        handle = asyncio.get_running_loop().call_later(
            delay, lambda: self.workers.spawn(self.aggregate_if_ready(branch_id, deadline=deadline)))
        self._retries[branch_id] = (failed, handle)

    def cancel_retries(self) -> None:
        """Drop the pending aggregation retries (shutdown: the next start recovers those rounds)."""
        for _, handle in self._retries.values():
            handle.cancel()
        self._retries.clear()

    def _aggregation_plan(self, branch_id: str, deadline: bool) -> tuple[Branch, int, int, list[UploadInput]] | None:
        """What to aggregate now, or None. Runs in a worker thread (several queries)."""
        branch = self.store.get_branch(branch_id)
        current = self.store.open_round(branch_id) if branch is not None else None
        if branch is None or current is None:
            return None
        uploads = self.store.round_uploads(branch_id, current.run_number, current.round_index)
        if not uploads:
            return None
        if deadline:
            due = branch.round_deadline_s is not None and current.first_upload_at is not None \
                and current.first_upload_at + branch.round_deadline_s <= time.time()
            if not due or branch.run_status != START:
                return None
        elif len(uploads) < self.store.required_uploads(branch):
            return None
        return branch, current.run_number, current.round_index, uploads

    async def set_run_status(self, branch_id: str, status: str) -> Branch:
        """Start, pause or stop the branch's run and tell its leaves.

        Raises:
            InvalidValueError: ``status`` is not a run status.
            RecordNotFoundError: no such branch.
        """
        async with self.lock(branch_id):
            branch = await self.workers.blocking(self.store.set_run_status, branch_id, status)
        await self.notifier.publish(branch.tree_id, branch.id, run_status_message(status))
        if status == START:
            self.workers.spawn(self.aggregate_if_ready(branch.id))
        return branch

    async def recover(self) -> None:
        """Aggregate rounds that were complete when the server stopped; drop stray temp files."""
        await self.workers.blocking(self.store.cleanup_stray_files)
        for branch in await self.workers.blocking(self.store.list_branches):
            try:
                aggregate_id = await self.aggregate_if_ready(branch.id)
            except Exception:  # one broken branch must not keep the server from starting
                logger.exception("recovering branch %s failed; it stays as it was", branch.id)
                continue
            if aggregate_id:
                logger.info("recovered a complete round of branch %s as aggregate %s", branch.id, aggregate_id)

    async def deadline_loop(self) -> None:
        """Aggregate rounds whose deadline passed, checked every ``deadline_check_interval_s``."""
        while True:
            await asyncio.sleep(self.deadline_check_interval_s)
            try:
                for branch_id in await self.workers.blocking(self.store.rounds_past_deadline):
                    await self.aggregate_if_ready(branch_id, deadline=True)
            except Exception:  # the loop must outlive one bad round
                logger.exception("round deadline check failed")


__all__ = ["Rounds", "AcceptedUpload", "run_blocked_message"]
