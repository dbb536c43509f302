"""The round state machine of branchkey-local: accept uploads, aggregate, move the run along.

An upload that passed :mod:`~branchkey_integrations.server.uploads` is checked (values finite,
weighting) and its memory map released *before* it waits for its branch's ``asyncio.Lock``; under
the lock it is checked against the round's layer layout (:meth:`Store.expected_layout`: from the
second round of a run the previous aggregate's; in the first round the other leaves'; a leaf
whose upload is the only one may replace it with another) and committed to the store. Where the
branch's strategy folds (``Strategy.folds``: FedAvg and the server optimizers) it is then folded into
the round's running FedAvg (:class:`~branchkey_integrations.server.aggregation.RunningSum`) outside the
branch lock, one fold at a time per branch, and the caller answers 201 once it is (so a round's last
answer leaves only the mean to write); a round's first fold also has the aggregate's file written ahead
(:meth:`RunningSum.prepare`). A strategy that folds nothing (the robust ones) is answered once the
upload is committed. When the open round holds ``min_leaves`` uploads (default: every leaf), or its
round deadline passes with at least one upload, the strategy combines it (``Strategy.combine``; the
running sum's mean first where it uses it: O(model) however many leaves), the next round opens,
every leaf of the branch is notified, and retention removes the round's uploads (``keep_uploads``)
and aggregates beyond the latest ``keep_rounds``. A FedAvg aggregate is
fsynced after the leaves are told, not before (it can be made again from the round's uploads, which
retention keeps until then; :meth:`Rounds.recover` checks and remakes it after a crash). An operator may drop one leaf's upload or reset the
open round (:meth:`Rounds.drop_uploads`); the leaves concerned see why in the round's progress
(``GET`` ROUND_PATH: their entry in ``refused``), as no notification of the official protocol
can say it. A run status change (start, pause, stop; semantics in
:mod:`~branchkey_integrations.server.store`) is applied under the same lock and announced. On start, rounds that were complete when the server
died are aggregated before the server listens. An aggregation that fails (disk full, I/O error)
leaves its round open and is tried again with a backoff (0.5 s doubling to 8 s) until it succeeds.

This module knows nothing of HTTP: a refusal is a domain error of
:mod:`branchkey_integrations.core.errors` (:class:`RunNotStartedError`,
:class:`RoundClosedError`, :class:`InvalidValueError`, :class:`RecordNotFoundError`), which
the HTTP layer maps to a status in one table.

Why one module of this size: receipt, folding, aggregation, retention and the operator's actions share
one branch lock and the per-branch state that goes with it (running sums, files written ahead, retries,
fsyncs in flight); split apart, each part would reach into the others'.
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
from ..core.protocol import START, STOP, aggregation_message, run_status_message
from .aggregation import RunningSum
from .notify import Notifier
from .progress import round_progress
from .records import Branch, Leaf, Round, UploadInput
from .recovery import remake_lost_aggregate
from .store import Store
from .strategies import STRATEGIES, RoundInputs, strategy_for, takes_controls
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
    """An upload committed to a round: its file id, the run and round it was accepted into, and a future
    done once it is folded into the round's running sum (its answer waits for that)."""

    file_id: str
    run_number: int
    round_index: int
    folded: asyncio.Future[None]


class Rounds:
    """Rounds of every branch of one store: uploads in, aggregates and notifications out.

    Args:
        store: the durable state.
        notifier: where aggregation and run-status messages go.
        workers: the thread pool for blocking calls and the background-task registry.
        deadline_check_interval_s: how often :meth:`deadline_loop` looks for overdue rounds.
    """

    def __init__(self, store: Store, notifier: Notifier, workers: Workers, *, deadline_check_interval_s: float,
                 keep_uploads: bool = False, keep_rounds: int = 0) -> None:
        self.store = store
        self.notifier = notifier
        self.workers = workers
        self.deadline_check_interval_s = deadline_check_interval_s
        self.keep_uploads = keep_uploads
        self.keep_rounds = keep_rounds
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._fold_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._sums: dict[str, tuple[tuple[int, int], RunningSum]] = {}  # branch -> (run, round), its running sum
        self._folding: set[str] = set()  # branches whose fold task runs
        self._next_pass: dict[str, asyncio.Future[None]] = {}  # branch -> done when its next fold pass is
        self._retries: dict[str, tuple[int, asyncio.TimerHandle]] = {}  # branch -> failed attempts, next try
        self._unsynced: dict[str, tuple[str, asyncio.Future[bool]]] = {}  # branch -> its latest aggregate's fsync
        # branch -> the file of its next aggregate written ahead, and the layout it was written for
        self._prepared: dict[str, tuple[Path, asyncio.Future[None], list[wire.LayerSpec]]] = {}

    def lock(self, branch_id: str) -> asyncio.Lock:
        return self._locks[branch_id]

    @staticmethod
    def check_accepting(branch: Branch) -> None:
        """Raise :class:`RunNotStartedError` unless the branch's run takes uploads (checked again at commit)."""
        if branch.run_status != START:
            raise RunNotStartedError(run_blocked_message(branch))

    async def counted_upload(self, leaf: Leaf, key: str | None) -> AcceptedUpload | None:
        """The leaf's upload already committed with idempotency ``key`` (a retry of it gets its answer), else None.

        Whichever round is open now: a retry whose first try's answer was lost while its round aggregated
        must not be filed in the next round (it would hold stale weights there, and the leaf would wait on
        the wrong round). ``folded`` waits for the branch's next fold pass while that round is still open.
        """
        if key is None:
            return None
        counted = await self.workers.blocking(self.store.counted_upload, leaf.id, key)
        if counted is None:
            return None
        file_id, run_number, round_index = counted
        current = await self.workers.blocking(self.store.open_round, leaf.branch_id)
        if current is not None and (current.run_number, current.round_index) == (run_number, round_index):
            folded = self._counted(await self.workers.blocking(self.store.require_branch, leaf.branch_id))
        else:
            folded = done_future()
        logger.info("leaf %s (%s) sent upload %s again (idempotency key %s): answered as first counted, run %d "
                    "round %d", leaf.name, leaf.id, file_id, key, run_number, round_index)
        return AcceptedUpload(file_id, run_number, round_index, folded)

    async def accept_upload(
        self, leaf: Leaf, archive: wire.Archive, path: Path, *, size: int, sha256: str, metadata: str | None,
        key: str | None = None,
    ) -> AcceptedUpload:
        """Check a decoded upload against its round and commit the file at ``path``; returns its id and round.

        Returns once the upload is committed; ``folded`` is done once it is in the round's running sum (the
        answer waits for that, so it means counted). The aggregation, if the round is complete, follows.
        An upload whose idempotency ``key`` was already committed (a retry that raced its first try) is not
        committed again: the first one's answer is returned (:meth:`counted_upload`).

        Raises:
            RunNotStartedError: the run is paused or stopped.
            RoundClosedError: the round closed while the upload was being checked.
            InvalidValueError: the archive does not fit the round's layer layout.
        """
        blocking = self.workers.blocking
        specs, weighting = archive.specs, float(archive.weighting or 0)
        try:
            await blocking(wire.validate_upload, archive, None)  # values and weighting: before waiting
        except ArchiveError as exc:
            raise InvalidValueError(f"Upload rejected: {exc}") from exc
        finally:
            archive.layers.clear()  # they view a memory map of the upload: unmap it before waiting for the lock
        async with self.lock(leaf.branch_id):
            if (counted := await self.counted_upload(leaf, key)) is not None:
                return counted
            branch = await blocking(self.store.require_branch, leaf.branch_id)
            current = await blocking(self.store.open_round, branch.id)
            if branch.run_status != START or current is None:
                raise RunNotStartedError(run_blocked_message(branch))
            if (misplaced := wire.control_problem(archive, branch.algorithm, takes_controls(branch.algorithm))):
                raise InvalidValueError(f"Upload rejected: {misplaced}")
            layout = await blocking(self.store.expected_layout, branch.id, current.run_number, current.round_index,
                                    leaf.id)
            problem = wire.spec_mismatch(layout[0], specs) if layout else None
            if layout and problem:
                raise InvalidValueError(
                    f"Upload rejected: its layers do not match this round's ({problem}); round {current.round_index + 1} "
                    f"of run {current.run_number} takes the layers of {layout[1]}. Every leaf of a branch must "
                    f"send the same model (architecture, frozen layers, buffers option).")
            file_id, replaced = await blocking(
                self.store.commit_upload, path, leaf=leaf, run_number=current.run_number,
                round_index=current.round_index, weighting=weighting, specs=specs,
                size=size, sha256=sha256, metadata=metadata, key=key,
            )
        logger.info("leaf %s (%s) uploaded %s to branch %s run %d round %d", leaf.name, leaf.id, file_id, branch.id,
                    current.run_number, current.round_index)
        if replaced:
            self.workers.spawn(blocking(self.store.remove_files, replaced))
        return AcceptedUpload(file_id, current.run_number, current.round_index, self._counted(branch))

    def _counted(self, branch: Branch) -> asyncio.Future[None]:
        """Done once an upload committed to the branch's open round counts: after the fold pass that folds it,
        or at once for a strategy that folds nothing (its pass then only checks whether the round is complete)."""
        folded = self._fold_soon(branch.id)
        return folded if folds(branch) else done_future()

    async def record_refusal(self, leaf: Leaf, reason: str) -> None:
        """Remember (and log, by leaf name) an upload refused in the open round, for the round's progress.

        A store that cannot record it (a full disk) costs the round view this line, never the leaf its answer.
        """
        try:
            await self.workers.blocking(self.store.record_refusal, leaf, reason)
            now = (await self.workers.blocking(round_progress, self.store, leaf.branch_id)).summary(refusals=False)
        except (sqlite3.Error, LocalServerError, OSError) as exc:
            now = f"not recorded: {exc}"
        logger.warning("upload of leaf %s (%s) to branch %s refused: %s [now %s]", leaf.name, leaf.id, leaf.branch_id,
                       reason, now)

    async def aggregate_if_ready(self, branch_id: str, *, deadline: bool = False) -> str | None:
        """Aggregate the branch's open round if it is complete (or past its deadline); returns the id.

        The branch's strategy (:mod:`~branchkey_integrations.server.strategy`) combines the round: this method
        first brings the running sum up to the committed uploads and writes their weighted mean where the
        aggregate goes when the strategy uses it (a folding strategy, or one that falls back to FedAvg for
        this round), then hands the round to :meth:`Strategy.combine` in a worker thread and commits what it
        made, with its state and note.
        """
        blocking = self.workers.blocking
        async with self.lock(branch_id):
            plan = await blocking(self._aggregation_plan, branch_id, deadline)
            if plan is None:
                return None
            branch, run_number, round_index, uploads = plan
            temp = await self._prepared_file(branch_id)
            temps = [temp]
            specs = uploads[0].specs
            try:
                strategy = strategy_for(branch.algorithm, branch.params)
                mean = None
                if strategy.uses_mean(len(uploads)):  # the running sum: what is left is O(model)
                    async with self._fold_locks[branch_id]:
                        running = self._running_sum(branch_id, run_number, round_index)
                        await blocking(running.sync, [(u.leaf_id, u.file_id, u.path, u.weighting) for u in uploads],
                                       specs)
                        self._answer_waiting(branch_id)  # uploads committed during the last fold pass: folded now
                        mean = await blocking(running.write, temp, durable=False)
                made = await blocking(strategy.combine, RoundInputs(branch_id, run_number, round_index, uploads, specs,
                                                                    temp, mean, self.store, temps))
                durable = not made.remakeable  # a FedAvg mean can be made again: fsynced later
                await self._settle(branch_id)  # at most one aggregate per branch waits for its fsync
                aggregate_id = await blocking(
                    self.store.commit_aggregate, made.path, branch_id=branch_id, run_number=run_number,
                    round_index=round_index, specs=specs, size=made.size, sha256=made.sha256, strategy=made.strategy,
                    strategy_note=made.note, state=made.state, durable=durable,
                )
            except Exception as exc:  # a full disk, a damaged upload, a bug: the round stays open and says why
                problem = exc if isinstance(exc, (AggregationError, LocalServerError, OSError, sqlite3.Error)) else repr(exc)
                self._retry_aggregation(branch_id, deadline, f"round {round_index + 1} of run {run_number}: {problem}")
                return None
            finally:
                self._answer_waiting(branch_id)  # committed, and counted in this round's aggregation (or its retry)
                for path in temps:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
            self._sums.pop(branch_id, None)
            if not durable:
                self._unsynced[branch_id] = (aggregate_id, self.workers.spawn(self._sync_aggregate(aggregate_id)))
            failed, retry = self._retries.pop(branch_id, (0, None))
            if retry is not None:
                retry.cancel()
                logger.info("branch %s run %d round %d aggregated after %d failed attempt(s)", branch_id, run_number,
                            round_index, failed)
        await self.notifier.publish(branch.tree_id, branch_id, aggregation_message(aggregate_id, run_number, round_index))
        await self.apply_retention(branch_id)
        return aggregate_id

    def _retry_aggregation(self, branch_id: str, deadline: bool, problem: str) -> None:
        """Try the failed aggregation again after a backoff (disk full, I/O error: the cause may go away)."""
        failed, retry = self._retries.get(branch_id, (0, None))
        if retry is not None:
            retry.cancel()
        failed += 1
        delay = min(AGGREGATION_RETRY_BASE_S * 2 ** (failed - 1), AGGREGATION_RETRY_MAX_S)
        log = logger.error if failed == 1 else logger.warning if failed % 10 == 0 else logger.debug
        log("aggregating branch %s failed (attempt %d; the round stays open, next try in %.1f s): %s",
            branch_id, failed, delay, problem)
        handle = asyncio.get_running_loop().call_later(
            delay, lambda: self.workers.spawn(self.aggregate_if_ready(branch_id, deadline=deadline)))
        self._retries[branch_id] = (failed, handle)

    def cancel_retries(self) -> None:
        """Drop the pending aggregation retries (shutdown: the next start recovers those rounds)."""
        for _, handle in self._retries.values():
            handle.cancel()
        self._retries.clear()

    def _running_sum(self, branch_id: str, run_number: int, round_index: int) -> RunningSum:
        """The running sum of the branch's round (run_number, round_index); a new one when the round changed."""
        key, running = self._sums.get(branch_id, ((-1, -1), None))
        if running is None or key != (run_number, round_index):
            running = RunningSum()
            self._sums[branch_id] = ((run_number, round_index), running)
        return running

    def _fold_soon(self, branch_id: str) -> asyncio.Future[None]:
        """Have the branch's fold task fold the upload just committed; the future is done once it has.

        One fold task per branch at a time: an upload committed while it runs only asks it to go round
        again (each pass folds every upload committed so far), so K uploads at once cost a few passes
        instead of K queued ones, each listing the whole round (0.9-2 s of backlog after the last of
        100 uploads at 4 MB, before). Receipt does not wait for folds (why: :class:`~.budget.ByteBudget`);
        the upload's answer does (``AcceptedUpload.folded``).
        """
        upcoming = self._next_pass.get(branch_id)
        if upcoming is None:
            upcoming = self._next_pass[branch_id] = asyncio.get_running_loop().create_future()
        if branch_id not in self._folding:
            self._folding.add(branch_id)
            self.workers.spawn(self._fold_then_aggregate(branch_id))
        return upcoming

    async def _fold_then_aggregate(self, branch_id: str) -> None:
        """Fold the open round's new uploads into its running sum (outside the branch lock, so
        receipt goes on), then aggregate if the round is complete; again while :meth:`_fold_soon`
        asked for it."""
        try:
            while (this_pass := self._next_pass.pop(branch_id, None)) is not None:
                try:
                    await self.fold(branch_id)
                finally:
                    _resolve(this_pass)
                if await self.aggregate_if_ready(branch_id) is None:
                    self._prepare_aggregate(branch_id)
        finally:
            self._folding.discard(branch_id)
            self._answer_waiting(branch_id)  # only when the task ended early (shutdown, an error): committed

    def _prepare_aggregate(self, branch_id: str) -> None:
        """Have the file of the branch's next aggregate written ahead while its round's uploads arrive
        (why: :meth:`RunningSum.prepare`); once per aggregate, for a round that has uploads."""
        held = self._sums.get(branch_id)
        if held is None or held[1].specs is None:
            return
        if branch_id in self._prepared and self._prepared[branch_id][2] == held[1].specs:
            return
        self._discard_prepared(branch_id)  # written for another layout: a round's only upload replaced (a bomb's, say)
        path, running = self.store.new_temp_path(), held[1]

        async def prepare() -> None:
            try:
                now = await self.workers.blocking(round_progress, self.store, branch_id)
                if now.round_index is not None:
                    awaited = max(now.required - len(now.uploaded), 0)
                    if awaited:  # its first upload is folded while the others arrive, not beside the last one
                        async with self._fold_locks[branch_id]:
                            try:
                                await self.workers.blocking(running.fold_first)
                            except BaseException:
                                running.reset()  # no partial sum: the next fold pass starts from the files
                                raise
                    await self.workers.blocking(running.prepare, path, awaited)
            except Exception as exc:  # a full disk, say; only time is lost: the aggregate is written when due
                logger.warning("writing the next aggregate of branch %s ahead failed (%r); it is written when its "
                               "round completes", branch_id, exc)
                with contextlib.suppress(OSError):
                    path.unlink()

        self._prepared[branch_id] = (path, self.workers.spawn(prepare()), list(held[1].specs))

    async def _prepared_file(self, branch_id: str) -> Path:
        """Where the branch's aggregate is written: the file :meth:`_prepare_aggregate` wrote ahead, or a new name."""
        path, preparing, _ = self._prepared.pop(branch_id, (self.store.new_temp_path(), None, None))
        if preparing is not None:
            await asyncio.shield(preparing)
        return path

    def _discard_prepared(self, branch_id: str) -> None:
        """Remove the file written ahead for the branch's next aggregate, once written (its round's uploads
        changed: it would hold their disk until the round aggregates)."""
        if branch_id not in self._prepared:
            return
        path, preparing, _ = self._prepared.pop(branch_id)

        async def remove() -> None:
            await asyncio.shield(preparing)  # its own failures are logged there: it never raises
            await self.workers.blocking(self.store.remove_files, [path])

        self.workers.spawn(remove())

    def _answer_waiting(self, branch_id: str) -> None:
        """Let the uploads waiting for the branch's next fold pass answer: the aggregation of their round
        folded them (it holds the branch lock, so every committed upload is in it)."""
        _resolve(self._next_pass.pop(branch_id, None))

    async def fold(self, branch_id: str) -> None:
        """Bring the running sum of the branch's open round up to its committed uploads.

        A failure (an upload replaced and removed while it was read) only empties the sum: the
        aggregation syncs again from the committed uploads, so it is logged at INFO. Any other failure is
        logged as an error and ends neither the fold task nor the round: its aggregation tries again (and
        retries with backoff, saying why, while it fails).
        """
        blocking = self.workers.blocking
        async with self._fold_locks[branch_id]:
            current, uploads, after_held = await blocking(self._fold_inputs, branch_id)
            if current is None:
                self._sums.pop(branch_id, None)
                return
            running = self._running_sum(branch_id, current.run_number, current.round_index)
            try:
                tuples = [(u.leaf_id, u.file_id, u.path, u.weighting) for u in uploads]
                if after_held:  # only the uploads committed after those the sum holds
                    await blocking(running.extend, tuples)
                else:
                    await blocking(running.sync, tuples, uploads[0].specs if uploads else None)
            except (AggregationError, OSError) as exc:
                logger.info("folding branch %s run %d round %d deferred to its aggregation: %s", branch_id,
                            current.run_number, current.round_index, exc)
            except Exception as exc:  # never the end of the fold task: the aggregation syncs, and retries, itself
                logger.error("folding branch %s run %d round %d failed (%r); its aggregation folds it again",
                             branch_id, current.run_number, current.round_index, exc)

    def _fold_inputs(self, branch_id: str) -> tuple[Round | None, list[UploadInput], bool]:
        """The open round and its committed uploads, or (None, [], False) with no open round or a strategy that
        folds nothing; True and only the uploads after those its running sum holds, when the sum's are still the
        round's first. Runs in a worker thread, under the fold lock."""
        branch = self.store.get_branch(branch_id)
        current = self.store.open_round(branch_id) if branch is not None else None
        if branch is None or current is None or not folds(branch):
            return None, [], False
        key, running = self._sums.get(branch_id, ((-1, -1), None))
        if running is not None and running.members and key == (current.run_number, current.round_index):
            after = self.store.round_uploads_after(branch_id, *key, list(running.members.items()))
            if after is not None:
                return current, after, True
        return current, self.store.round_uploads(branch_id, current.run_number, current.round_index), False

    async def _sync_aggregate(self, file_id: str) -> bool:
        """fsync an aggregate committed before its fsync; False (logged) when the disk refused."""
        try:
            await self.workers.blocking(self.store.sync_file, file_id)
        except OSError as exc:
            logger.error("making aggregate %s durable failed (tried again before retention): %s", file_id, exc)
            return False
        return True

    async def _settle(self, branch_id: str) -> None:
        """Wait until the branch's latest aggregate is durable (see :meth:`Store.commit_aggregate`).

        Until then its round's uploads must stay, as they are what would make it again after an
        operating-system crash: retention and the next aggregate of the branch wait here.

        Raises:
            OSError: the fsync failed twice.
        """
        pending = self._unsynced.get(branch_id)
        if pending is None:
            return
        file_id, syncing = pending
        if not await asyncio.shield(syncing):
            await self.workers.blocking(self.store.sync_file, file_id)
        if self._unsynced.get(branch_id) is pending:
            del self._unsynced[branch_id]

    async def apply_retention(self, branch_id: str) -> None:
        """Remove what retention drops (uploads of closed rounds, aggregates beyond ``keep_rounds``)."""
        try:
            await self._settle(branch_id)
            paths = await self.workers.blocking(self.store.prune, branch_id, keep_uploads=self.keep_uploads,
                                                keep_rounds=self.keep_rounds)
            await self.workers.blocking(self.store.remove_files, paths)
        except (LocalServerError, OSError) as exc:  # retention must never fail a round; next time it tries again
            logger.error("retention for branch %s failed: %s", branch_id, exc)

    async def drop_uploads(self, branch_id: str, leaf_ref: str | None, *, note: str = "") -> dict[str, object]:
        """Drop one leaf's upload (``leaf_ref``: id or name) or, with None, reset the open round (drop all).

        The leaves concerned find the reason in the round's progress (``refused``). Returns
        ``{"run_number", "round_index", "dropped": [leaf names]}``.

        Raises:
            RecordNotFoundError: no such branch, no open round, or the leaf has no upload in it.
        """
        async with self.lock(branch_id):
            async with self._fold_locks[branch_id]:
                run_number, round_index, names, paths = await self.workers.blocking(
                    self.store.drop_uploads, branch_id, leaf_ref, note)
                self._sums.pop(branch_id, None)
                self._discard_prepared(branch_id)
        await self.workers.blocking(self.store.remove_files, paths)
        logger.warning("branch %s run %d round %d: the operator dropped the upload(s) of %s%s", branch_id, run_number,
                       round_index, ", ".join(names) or "nobody", f" ({note})" if note else "")
        return {"run_number": run_number, "round_index": round_index, "dropped": names}

    def _aggregation_plan(self, branch_id: str, deadline: bool) -> tuple[Branch, int, int, list[UploadInput]] | None:
        """What to aggregate now, or None. Runs in a worker thread (several queries)."""
        branch = self.store.get_branch(branch_id)
        current = self.store.open_round(branch_id) if branch is not None else None
        if branch is None or current is None:
            return None
        count = self.store.round_upload_count(branch_id, current.run_number, current.round_index)
        if not count or (not deadline and count < self.store.required_uploads(branch)):
            return None  # counted first: listing a 1,000-leaf round after each of its uploads cost more than the rest
        if deadline:
            due = branch.round_deadline_s is not None and current.first_upload_at is not None \
                and current.first_upload_at + branch.round_deadline_s <= time.time()
            if not due or branch.run_status != START:
                return None
        uploads = self.store.round_uploads(branch_id, current.run_number, current.round_index)
        return (branch, current.run_number, current.round_index, uploads) if uploads else None

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
        elif status == STOP:
            self._sums.pop(branch.id, None)
            self._discard_prepared(branch.id)
            await self.apply_retention(branch.id)  # the abandoned round's uploads
        return branch

    async def recover(self) -> None:
        """Aggregate rounds that were complete when the server stopped; drop stray temp files."""
        await self.workers.blocking(self.store.cleanup_stray_files)
        for branch in await self.workers.blocking(self.store.list_branches):
            try:
                if await self.workers.blocking(remake_lost_aggregate, self.store, branch.id):  # before retention
                    await self.apply_retention(branch.id)  # a crash may have come between an aggregate and its retention
                aggregate_id = await self.aggregate_if_ready(branch.id)
            except Exception:  # one broken branch must not keep the server from starting
                logger.exception("recovering branch %s failed; it stays as it was", branch.id)
                continue
            if aggregate_id:
                logger.info("recovered a complete round of branch %s as aggregate %s", branch.id, aggregate_id)
            else:
                self.workers.spawn(self.fold(branch.id))  # the running sum of an open round, again from its files

    async def deadline_loop(self) -> None:
        """Aggregate rounds whose deadline passed, checked every ``deadline_check_interval_s``."""
        while True:
            await asyncio.sleep(self.deadline_check_interval_s)
            try:
                for branch_id in await self.workers.blocking(self.store.rounds_past_deadline):
                    await self.aggregate_if_ready(branch_id, deadline=True)
            except Exception:  # the loop must outlive one bad round
                logger.exception("round deadline check failed")


def folds(branch: Branch) -> bool:
    """Whether the branch's strategy folds each upload on arrival (``Strategy.folds``). An unknown name
    (a store written by another version) folds: its aggregation says why it cannot run, and retries."""
    strategy = STRATEGIES.get(branch.algorithm)
    return strategy is None or strategy.folds


def _resolve(waiting: asyncio.Future[None] | None) -> None:
    if waiting is not None and not waiting.done():
        waiting.set_result(None)


def done_future() -> asyncio.Future[None]:
    """A future already done: the answer of an upload that waits for nothing more."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    done.set_result(None)
    return done


__all__ = ["Rounds", "AcceptedUpload", "run_blocked_message", "done_future"]
