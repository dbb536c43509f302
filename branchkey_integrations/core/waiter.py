"""What a leaf waits on during a round, and the waits themselves, event-driven.

This module owns one leaf's view of its branch: the run status, the run number and the
aggregation ids received, all under one ``threading.Condition``. Notification callbacks and
REST refreshes update it through :meth:`RoundWaiter.set_run` and
:meth:`RoundWaiter.add_aggregation`, which wake every waiter at once. A wait sleeps until the
next thing that must happen (a state change, its deadline, or a periodic action such as a
progress log or a REST re-read of the run status) and never polls on a fixed tick.

It also feeds ``queue``, the official 2.7.1 client's ``LifoQueue(maxsize=1)`` that holds only
the newest unread aggregation id, from the same event, so :class:`~.client.Client` keeps that
interface while :class:`~.federation.Federation` waits on the same state.

Every aggregate is kept with the run and round it closes when the platform names them
(branchkey-local does): a round that knows where its upload went accepts only that round's aggregate
(or a later one, when its own was missed), never an earlier round's late one.

:meth:`RoundWaiter.interrupt` (safe from a signal handler and from any thread) wakes every wait at
once; each then raises :class:`RoundInterrupted`, and so does every later wait until
:meth:`RoundWaiter.clear_interrupt`. :meth:`RoundWaiter.request_refresh` (a notification channel that
reconnected) makes the waits run their ``on_refresh`` actions now instead of at their next interval.

Analytics aggregates (``federated_analytics``: their notification says so) are kept apart, counted and
waited on by :meth:`RoundWaiter.wait_for_analytics`: a model's round never sees one, and an analytics round
never sees a model's (neither reaches ``queue``, which holds models' aggregates, as the official client's does).

Why a count of aggregation ids: a round must accept only an aggregate that arrived after its
own upload. Taking :meth:`RoundWaiter.drain` before the upload and waiting for
:meth:`RoundWaiter.wait_for_aggregate_after` that mark cannot mistake an earlier id for this
round's, whoever else reads the queue.

Example:
    >>> waiter = RoundWaiter("branch-1")
    >>> waiter.set_run("start", 1)
    True
    >>> mark, stale = waiter.drain()
    >>> waiter.add_aggregation("agg-1", run_number=1, round_index=0)
    True
    >>> waiter.wait_for_aggregate_after(mark, deadline=None, stopped="during round 1")
    'agg-1'
"""

from __future__ import annotations

import logging
import queue as queue_module
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

from .errors import AnalyticsRoundMissedError, RoundInterrupted, RunStopped
from .protocol import KIND_FEDERATED_ANALYTICS, KIND_FEDERATED_LEARNING, START, STOP

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Every:
    """An action a wait runs periodically: ``action(waited_s)`` every ``interval`` s.

    The first run is ``first`` seconds into the wait (default: ``interval``). Actions run with
    the lock released, so one may call back into the platform (a REST refresh that ends in
    :meth:`RoundWaiter.set_run`); an exception from one ends the wait. With ``on_refresh``, a
    :meth:`RoundWaiter.request_refresh` (the notification channel reconnected) runs it at once.
    """

    interval: float
    action: Callable[[float], object]  # what it returns is ignored
    first: float | None = None
    on_refresh: bool = False


class RoundWaiter:
    """Run status, run number and newest aggregation id of one leaf, and event-driven waits on them.

    Args:
        branch_id: names the branch in :class:`RunStopped` messages.

    Attributes:
        queue: ``LifoQueue(maxsize=1)`` holding the newest aggregation id not yet taken (2.7.1's
            ``client.queue``); readers may take from it directly.
    """

    def __init__(self, branch_id: str = "") -> None:
        self.branch_id = branch_id
        self.queue: queue_module.LifoQueue[str] = queue_module.LifoQueue(maxsize=1)
        self._condition = threading.Condition()
        self._run_status: str | None = None
        self._run_number: int | None = None
        self._received = 0
        self._latest: str | None = None
        self._rounds: dict[str, tuple[int | None, int | None]] = {}  # aggregation id -> (run, round index)
        self._history: list[str] = []  # aggregation ids in arrival order; index i is the (i+1)-th received
        self._analytics: list[str] = []  # analytics aggregates' ids in arrival order (their rounds in _rounds)
        self._interrupted: str | None = None
        self._refreshes = 0

    # ------------------------------------------------------------------ state
    @property
    def run_status(self) -> str | None:
        return self._run_status

    @property
    def run_number(self) -> int | None:
        return self._run_number

    @property
    def latest_aggregation_id(self) -> str | None:
        """The newest aggregation id received, read or not."""
        return self._latest

    @property
    def received(self) -> int:
        """How many aggregation ids of models have arrived so far."""
        return self._received

    def received_of(self, kind: str) -> int:
        """How many aggregation ids of payload ``kind`` have arrived so far (the mark of an upload of it)."""
        return len(self._analytics) if kind == KIND_FEDERATED_ANALYTICS else self._received

    # ---------------------------------------------------------------- updates
    def set_run(self, status: str, number: int | None = None) -> bool:
        """Record the run status (and number, when known) and wake waiters; return whether the status changed."""
        with self._condition:
            changed = status != self._run_status
            self._run_status = status
            if number is not None:
                self._run_number = number
            self._condition.notify_all()
        return changed

    def round_of(self, aggregation_id: str) -> tuple[int | None, int | None]:
        """``(run_number, round_index)`` of a received aggregate, as the platform named them (or Nones)."""
        return self._rounds.get(aggregation_id, (None, None))

    def add_aggregation(self, aggregation_id: str, run_number: int | None = None,
                        round_index: int | None = None, *, kind: str = KIND_FEDERATED_LEARNING) -> bool:
        """Record a new aggregate (of that run and round, when known), keep it as the only unread id (LIFO of
        size 1) and wake waiters. An id already received (a notification and a REST look-up both found it)
        is not counted twice; returns whether it was new. An analytics aggregate (``kind``) is kept apart, for
        :meth:`wait_for_analytics` only.
        """
        with self._condition:
            if kind == KIND_FEDERATED_ANALYTICS and aggregation_id not in self._rounds:
                self._rounds[aggregation_id] = (run_number, round_index)
                self._analytics.append(aggregation_id)
                self._condition.notify_all()
                return True
            if aggregation_id in self._rounds:
                known = self._rounds[aggregation_id]
                if known == (None, None) and (run_number, round_index) != (None, None):
                    self._rounds[aggregation_id] = (run_number, round_index)
                    self._condition.notify_all()
                return False
            self._rounds[aggregation_id] = (run_number, round_index)
            self._history.append(aggregation_id)
            self._received += 1
            self._latest = aggregation_id
            dropped = self._take_unread()
            self.queue.put_nowait(aggregation_id)  # cannot be full: emptied under the same lock just now
            self._condition.notify_all()
        if dropped is not None:
            logger.debug("Replacing unread aggregation %s with %s", dropped, aggregation_id)
        return True

    # -------------------------------------------------------------- interrupt
    def interrupt(self, reason: str = "interrupted") -> None:
        """Wake every wait at once; each raises :class:`RoundInterrupted` with ``reason``, as does every later
        wait until :meth:`clear_interrupt`. Safe from a signal handler (main thread) and from any thread."""
        self._interrupted = reason  # seen by a wait even before the lock below is taken
        with self._condition:  # an RLock: a signal handler in the thread that holds it re-enters it
            self._condition.notify_all()

    def clear_interrupt(self) -> None:
        """Let waits run again after :meth:`interrupt`."""
        with self._condition:
            self._interrupted = None

    @property
    def interrupted(self) -> str | None:
        """The reason given to :meth:`interrupt`, or None."""
        return self._interrupted

    def check_interrupt(self) -> None:
        """Raise :class:`RoundInterrupted` when :meth:`interrupt` was called (and not cleared)."""
        reason = self._interrupted
        if reason is not None:
            raise RoundInterrupted(f"The round of branch {self.branch_id} was interrupted: {reason}")

    def request_refresh(self) -> None:
        """Run the ``on_refresh`` actions of every wait now (the notification channel (re)connected)."""
        with self._condition:
            self._refreshes += 1
            self._condition.notify_all()

    # ------------------------------------------------------------------ takes
    def take_latest(self) -> str | None:
        """The unread aggregation id, now marked read, or None (never blocks)."""
        with self._condition:
            return self._take_unread()

    def drain(self) -> tuple[int, str | None]:
        """Before an upload: take the unread id (it belongs to an earlier round) and return a mark.

        Returns ``(mark, stale)``: pass ``mark`` to :meth:`wait_for_aggregate_after`; ``stale``
        is the id taken, or None.
        """
        with self._condition:
            return self._received, self._take_unread()

    def _take_unread(self) -> str | None:
        try:
            return self.queue.get_nowait()
        except queue_module.Empty:
            return None

    # ------------------------------------------------------------------ waits
    def wait_for_start(self, deadline: float | None, periodic: Sequence[Every] = (), *,
                       stopped: str | None = None) -> bool:
        """Wait until the run is in ``start``; False when ``deadline`` (``time.monotonic()``) passes first.

        With ``stopped`` (such as ``"before round 3"``), a ``stop`` raises :class:`RunStopped`
        saying when; without it, a stopped run is waited out like a paused one (2.7.1's
        ``wait_for_run``).
        """
        def ready() -> bool | None:
            if self._run_status == START:
                return True
            if stopped is not None and self._run_status == STOP:
                raise RunStopped(f"The run of branch {self.branch_id} was stopped {stopped}.")
            return None

        return self._wait(ready, deadline, periodic) is not None

    def wait_for_unread(self, deadline: float | None, periodic: Sequence[Every] = ()) -> str | None:
        """Take the unread aggregation id as soon as there is one; None when ``deadline`` passes first."""
        return self._wait(self._take_unread, deadline, periodic)

    def wait_until(self, predicate: Callable[[], bool], deadline: float | None) -> bool:
        """Wait until ``predicate()`` holds, checked each time the waiter is woken (an update, a
        :meth:`request_refresh`, an :meth:`interrupt`); False when ``deadline`` passes first."""
        return self._wait(lambda: True if predicate() else None, deadline, ()) is not None

    def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` unless :meth:`interrupt` comes first (then :class:`RoundInterrupted`)."""
        self._wait(lambda: None, time.monotonic() + seconds, ())

    def wait_for_aggregate_after(self, mark: int, deadline: float | None, periodic: Sequence[Every] = (), *,
                                 stopped: str | None, target: tuple[int, int] | None = None) -> str | None:
        """The aggregation id that ends a round whose upload took ``mark`` (from :meth:`drain`), marked read.

        With ``target`` (the ``(run_number, round_index)`` the upload went into): the aggregate of that
        round; or, when only later rounds' aggregates arrive (this one's was missed), the newest of those;
        an earlier round's aggregate is ignored, whenever it arrives. An aggregate whose round the platform
        did not name, and every aggregate when ``target`` is None, counts when it arrived after ``mark``.

        None when ``deadline`` passes first; a ``stop`` of the run raises :class:`RunStopped`
        (``stopped`` says when, such as ``"during round 3"``), and wins over an aggregate that
        arrived in the same instant; with ``stopped=None`` the run status is not looked at.
        """
        ignored: set[str] = set()

        def ready() -> str | None:
            if stopped is not None and self._run_status == STOP:
                raise RunStopped(f"The run of branch {self.branch_id} was stopped {stopped}.")
            found = self._aggregate_for(mark, target, ignored)
            if found is not None:
                self._take_unread()  # read now, whether or not someone else took it from the queue first
            return found

        return self._wait(ready, deadline, periodic)

    def wait_for_analytics(self, mark: int, deadline: float | None, periodic: Sequence[Every] = (), *,
                           stopped: str | None, target: tuple[int, int] | None = None) -> str | None:
        """The id of the analytics aggregate that ends an analytics round whose upload took ``mark``
        (:meth:`received_of`); as :meth:`wait_for_aggregate_after`, but of analytics aggregates only, and of
        ``target``'s round only: a later round's result holds other uploads, so once one arrives without this
        round's, :class:`AnalyticsRoundMissedError`. Without ``target``, the first to arrive after ``mark``.
        """
        def ready() -> str | None:
            if stopped is not None and self._run_status == STOP:
                raise RunStopped(f"The run of branch {self.branch_id} was stopped {stopped}.")
            later = None
            for aggregation_id in self._analytics[mark:]:
                run, index = self._rounds[aggregation_id]
                if target is None or run is None or index is None or (run, index) == target:
                    return aggregation_id
                if (run, index) > target:
                    later = later or (aggregation_id, run, index)
            if later is not None and target is not None:
                raise AnalyticsRoundMissedError(
                    f"The analytics aggregate of run {target[0]} round index {target[1]} (branch {self.branch_id}) "
                    f"was not received, and a later analytics round's ({later[0]}, run {later[1]} round index "
                    f"{later[2]}) was: run the analytics round again.")
            return None

        return self._wait(ready, deadline, periodic)

    def _aggregate_for(self, mark: int, target: tuple[int, int] | None, ignored: set[str]) -> str | None:
        """Under the lock: the aggregate among those received after ``mark`` that ends the round (see above)."""
        later: str | None = None
        for aggregation_id in self._history[mark:]:
            run, index = self._rounds[aggregation_id]
            if target is None or run is None or index is None or (run, index) > target:
                later = aggregation_id  # the newest that counts, unless the exact round turns up
            elif (run, index) == target:
                return aggregation_id
            elif aggregation_id not in ignored:
                ignored.add(aggregation_id)
                logger.info("Ignoring aggregate %s of run %d round index %d: this leaf's upload went into run %d "
                            "round index %d", aggregation_id, run, index, *target)
        return later

    def _wait(self, ready: Callable[[], T | None], deadline: float | None, periodic: Sequence[Every]) -> T | None:
        """Wait until ``ready()`` (called under the lock) returns a value; None once ``deadline`` passes.

        The Condition is waited on for exactly as long as the next deadline or periodic action is
        away, so a notification wakes the waiter at once and an idle wait costs nothing.
        """
        since = time.monotonic()
        due = [since + (every.interval if every.first is None else every.first) for every in periodic]
        with self._condition:
            refreshes = self._refreshes
            while True:
                self.check_interrupt()
                result = ready()
                if result is not None:
                    return result
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return None
                if refreshes != self._refreshes:
                    refreshes = self._refreshes
                    due = [now if every.on_refresh else due[i] for i, every in enumerate(periodic)]
                ran = False
                for index, every in enumerate(periodic):
                    if now >= due[index]:
                        due[index] = now + every.interval
                        ran = True
                        self._condition.release()
                        try:
                            every.action(now - since)
                        finally:
                            self._condition.acquire()
                if ran:
                    continue  # the state may have changed while the lock was released
                wake = min([t for t in (deadline, *due) if t is not None], default=None)
                self._condition.wait(None if wake is None else max(0.0, wake - now))


__all__ = ["Every", "RoundWaiter"]
