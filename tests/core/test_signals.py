"""core/signals.py (SIGTERM and Ctrl-C interrupt a round's wait, then reach the previous handler) and the lines
the callbacks say at the end of a round (callback_kit). Real signals, sent to this process; SIGUSR1/SIGUSR2
stand in for SIGTERM/SIGINT so that nothing here can end the test run."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import replace

import pytest

from branchkey_integrations.core.callback_kit import FederatedCallbackMixin, describe_outcome
from branchkey_integrations.core.progress import AggregateRef, rounds_after_catching_up
from branchkey_integrations.core.errors import AggregationTimeoutError, RoundInterrupted, RunStopped
from branchkey_integrations.core.outcome import Outcome, RoundResult
from branchkey_integrations.core.progress import WaitProgress
from branchkey_integrations.core.signals import InterruptOnSignals, exit_status, interactive, signal_name
from branchkey_integrations.core.waiter import RoundWaiter

from ..conftest import CREDS




@pytest.fixture
def usr_signals():
    """SIGUSR1 and SIGUSR2 as they were, restored after the test."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_a_signal_interrupts_with_its_name_then_reaches_the_previous_handler(usr_signals):
    previous_calls, reasons = [], []
    previous = lambda signum, frame: previous_calls.append(signum)  # noqa: E731
    signal.signal(signal.SIGUSR1, previous)
    with InterruptOnSignals(reasons.append, (signal.SIGUSR1,)) as signals:
        assert signal.getsignal(signal.SIGUSR1) != previous
        signal.raise_signal(signal.SIGUSR1)
    assert reasons == ["SIGUSR1 received"] and previous_calls == [signal.SIGUSR1]
    assert signals.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is previous  # put back


def test_the_default_action_is_not_chained_and_an_ignored_signal_is_not_watched(usr_signals):
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # its default action would end this process
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    reasons: list[str] = []
    with InterruptOnSignals(reasons.append, (signal.SIGUSR1, signal.SIGUSR2)) as signals:
        assert signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN
        signal.raise_signal(signal.SIGUSR2)
        signal.raise_signal(signal.SIGUSR1)  # interrupts; the caller ends the run itself
    assert reasons == ["SIGUSR1 received"] and signals.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL and signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN


def test_a_handler_installed_meanwhile_stays_and_a_worker_thread_watches_nothing(usr_signals):
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    theirs = lambda signum, frame: None  # noqa: E731
    with InterruptOnSignals(lambda reason: None, (signal.SIGUSR1,)):
        signal.signal(signal.SIGUSR1, theirs)
    assert signal.getsignal(signal.SIGUSR1) is theirs

    seen = []

    def in_a_thread() -> None:
        with InterruptOnSignals(lambda reason: None, (signal.SIGUSR1,)):
            seen.append(signal.getsignal(signal.SIGUSR1))

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join(10)
    assert seen == [theirs]  # handlers belong to the main thread: nothing installed


def test_a_signal_ends_a_real_wait_at_once(usr_signals):
    """The wait of a round (RoundWaiter, no deadline) raises RoundInterrupted as soon as the signal comes,
    whether it arrives before the wait starts or during it (the interrupt stays until cleared)."""
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    waiter = RoundWaiter("branch-1")
    waiter.set_run("start", 1)
    mark, _ = waiter.drain()
    sender = threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGUSR1))
    started = time.monotonic()
    with InterruptOnSignals(waiter.interrupt, (signal.SIGUSR1,)):
        sender.start()
        with pytest.raises(RoundInterrupted, match="SIGUSR1 received"):
            waiter.wait_for_aggregate_after(mark, None, stopped="during round 1")
    sender.join(10)
    assert time.monotonic() - started < 10  # bounded only for a hung test; the wait itself had no deadline
    waiter.clear_interrupt()
    waiter.add_aggregation("agg-1")
    assert waiter.wait_for_aggregate_after(mark, None, stopped="during round 1") == "agg-1"


def test_exit_status_and_names():
    assert exit_status(signal.SIGTERM) == 143 and exit_status(signal.SIGINT) == 130
    assert signal_name(signal.SIGTERM) == "SIGTERM" and signal_name(999) == "999"
    assert not interactive()  # a test run is a script: an ending signal may spare its exit the collector


def test_a_leaf_that_caught_up_counts_the_rounds_its_branch_went_through():
    latest = AggregateRef("agg-5", 1, 4)
    assert rounds_after_catching_up(1, AggregateRef("a", 1, 0), latest) == 5  # resumed after round 1 (index 0)
    assert rounds_after_catching_up(3, AggregateRef("a", 1, 2), latest) == 5
    assert rounds_after_catching_up(1, AggregateRef("a"), latest) == 2  # untagged: one more than before
    assert rounds_after_catching_up(1, None, latest) == 2
    assert rounds_after_catching_up(1, AggregateRef("a", 0, 7), latest) == 2  # another run: one more than before


@pytest.mark.parametrize("outcome, signum, line", [
    (Outcome("done", RoundResult("agg-3", [], 4.21, 1.0, 3)), None, "round 3 done: aggregate agg-3 after 4.2 s."),
    (Outcome("done", RoundResult("agg-5", [], 0.0, 0.0, 5, 1, 4, caught_up=True)), None,
     "this leaf was behind its branch (resumed from an older checkpoint?): it loaded the branch's latest "
     "aggregate agg-5 instead of uploading, and is now at round 5 of run 1."),
    (Outcome("done", RoundResult("agg-9", [], 1.0, 1.0, 9, 2, 0)), None,  # rounds from 1 within the run, as status
     "round 1 of run 2 (this leaf's round 9) done: aggregate agg-9 after 1.0 s."),
    (Outcome("timeout", RoundResult(None, None, 30.2, 1.0, 2, skipped="timeout")), None,
     "round 3: no aggregate after 30 s; training goes on with the local model (on_timeout='continue')."),
    (Outcome("timeout", RoundResult(None, None, 1.0, 1.0, 2, skipped="unreachable")), None,
     "round 3: the platform could not be reached; training goes on with the local model (on_timeout='continue')."),
    (Outcome("stopped", error=RunStopped("The run of branch b was stopped during round 1.")), None,
     "The run of branch b was stopped during round 1. Stopping training."),
    (Outcome("stopped", error=RoundInterrupted("interrupted: SIGTERM received")), signal.SIGTERM,
     "SIGTERM received: ending training."),
    (Outcome("error", error=AggregationTimeoutError("late")), None,
     "the round failed: AggregationTimeoutError: late"),
])
def test_the_line_said_at_the_end_of_a_round(outcome, signum, line):
    assert describe_outcome(outcome, signum) == line


class Said(FederatedCallbackMixin):
    """The mixin without a framework: what it would say, collected."""

    def __init__(self) -> None:
        super().__init__(CREDS, "http://127.0.0.1:1", log_every_s=10)
        self.lines: list[str] = []

    def _say(self, text: str) -> None:
        self.lines.append(text)


def test_a_wait_is_said_unless_every_upload_is_in_and_it_is_not_late():
    said = Said()
    missing = WaitProgress(round=1, waiting_for="aggregate", waited_s=0.0, uploaded=("leaf_1",), missing=("leaf_2",),
                           required=2, known=True)
    complete = WaitProgress(round=1, waiting_for="aggregate", waited_s=0.0, uploaded=("leaf_1", "leaf_2"),
                            required=2, known=True)
    for progress in (missing, complete, replace(complete, waited_s=10.0), replace(complete, final=True),
                     WaitProgress(round=1, waiting_for="run start", waited_s=0.0, run_status="pause")):
        said._on_progress(progress)
    assert said.lines == [
        "BranchKey: Round 1: waiting for the aggregate for 0 s; 1 of 2 uploads; missing: leaf_2",
        "BranchKey: Round 1: waiting for the aggregate for 10 s; 2 of 2 uploads",  # late: said
        "BranchKey: Round 1: waiting for the run to start for 0 s (run is 'pause')",
    ]
