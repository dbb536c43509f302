"""RoundWaiter: the one place a leaf waits, woken by events rather than a polling tick."""

from __future__ import annotations

import threading
import time

import pytest

from branchkey_integrations.core.errors import RunStopped
from branchkey_integrations.core.waiter import Every, RoundWaiter


class CountingCondition(threading.Condition):
    """A Condition that counts its waits: a polling loop would wait many times, an event-driven one once."""

    def __init__(self) -> None:
        super().__init__()
        self.waits = 0

    def wait(self, timeout=None):
        self.waits += 1
        return super().wait(timeout)


def later(seconds: float, fn, *args) -> threading.Thread:
    thread = threading.Timer(seconds, fn, args)
    thread.daemon = True
    thread.start()
    return thread


def test_the_queue_keeps_only_the_newest_unread_id():
    waiter = RoundWaiter("b")
    for aggregation_id in ("a-1", "a-2", "a-3"):
        waiter.add_aggregation(aggregation_id)
    assert waiter.queue.qsize() == 1 and waiter.received == 3
    assert waiter.take_latest() == "a-3" and waiter.take_latest() is None
    assert waiter.latest_aggregation_id == "a-3"  # read, but still known


def test_set_run_reports_a_change_and_keeps_the_number_when_none_is_given():
    waiter = RoundWaiter("b")
    assert waiter.set_run("pause", 3) is True
    assert waiter.set_run("pause") is False and waiter.run_number == 3
    assert waiter.set_run("start", 4) is True and (waiter.run_status, waiter.run_number) == ("start", 4)


def test_a_notification_wakes_the_wait_at_once_with_a_single_condition_wait():
    waiter = RoundWaiter("b")
    waiter._condition = CountingCondition()
    later(0.2, waiter.add_aggregation, "a-1")
    started = time.monotonic()
    assert waiter.wait_for_unread(deadline=started + 30) == "a-1"
    assert time.monotonic() - started < 5 and waiter._condition.waits == 1


def test_a_deadline_is_one_wait_of_its_length_and_returns_none():
    waiter = RoundWaiter("b")
    waiter._condition = CountingCondition()
    started = time.monotonic()
    assert waiter.wait_for_unread(deadline=started + 0.5) is None
    assert time.monotonic() - started >= 0.5 and waiter._condition.waits <= 2  # a 0.1 s poll would wait 5 times


def test_an_aggregate_counts_only_after_the_mark():
    waiter = RoundWaiter("b")
    waiter.set_run("start", 1)
    waiter.add_aggregation("stale")
    mark, stale = waiter.drain()
    assert stale == "stale" and waiter.queue.empty()
    assert waiter.wait_for_aggregate_after(mark, time.monotonic() + 0.05, stopped="during round 1") is None
    later(0.1, waiter.add_aggregation, "fresh")
    assert waiter.wait_for_aggregate_after(mark, time.monotonic() + 30, stopped="during round 1") == "fresh"
    assert waiter.queue.empty()  # taken as read, as the queue reader of 2.7.1 would


def test_an_aggregate_taken_from_the_queue_by_someone_else_still_ends_the_round():
    waiter = RoundWaiter("b")
    mark, _ = waiter.drain()
    waiter.add_aggregation("a-1")
    assert waiter.queue.get_nowait() == "a-1"
    assert waiter.wait_for_aggregate_after(mark, None, stopped="during round 1") == "a-1"


def test_stop_ends_a_round_wait_and_wins_over_a_simultaneous_aggregate():
    waiter = RoundWaiter("branch-7")
    waiter.set_run("start", 1)
    mark, _ = waiter.drain()
    later(0.1, waiter.set_run, "stop")
    with pytest.raises(RunStopped, match="The run of branch branch-7 was stopped during round 2."):
        waiter.wait_for_aggregate_after(mark, time.monotonic() + 30, stopped="during round 2")
    waiter.add_aggregation("a-1")
    with pytest.raises(RunStopped):
        waiter.wait_for_aggregate_after(mark, None, stopped="during round 2")


def test_wait_for_start_waits_out_a_stop_unless_told_that_stop_ends_it():
    waiter = RoundWaiter("b")
    waiter.set_run("stop", 1)
    assert waiter.wait_for_start(time.monotonic() + 0.05) is False  # 2.7.1's wait_for_run waits through stop
    with pytest.raises(RunStopped, match="stopped before round 3"):
        waiter.wait_for_start(None, stopped="before round 3")
    later(0.1, waiter.set_run, "start")
    assert waiter.wait_for_start(time.monotonic() + 30) is True


def test_periodic_actions_run_unlocked_on_their_schedule_and_may_end_the_wait():
    """A REST refresh is a periodic action that updates the waiter itself: it must not deadlock."""
    waiter = RoundWaiter("b")
    waiter.set_run("pause", 1)
    logged: list[float] = []

    def refresh(waited: float) -> None:
        waiter.set_run("start" if waited >= 0.25 else "pause")

    started = time.monotonic()
    assert waiter.wait_for_start(started + 30, [Every(10.0, logged.append, first=0.0), Every(0.1, refresh)])
    assert logged == [pytest.approx(0.0, abs=0.05)]  # first at once, the next not before 10 s
    assert 0.25 <= time.monotonic() - started < 5


def test_an_action_that_raises_ends_the_wait_and_releases_the_lock():
    waiter = RoundWaiter("b")

    def fail(waited: float) -> None:
        raise ConnectionError("refresh failed")

    with pytest.raises(ConnectionError):
        waiter.wait_for_start(None, [Every(0.01, fail)])
    assert waiter.set_run("start") is True  # the lock is free again
