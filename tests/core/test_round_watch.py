"""What a waiting leaf knows and does: round views, stale aggregates, interrupts, progress reports, the REST
safety net under the notifications, catching up, and skipped rounds. Values and the waiter without a server;
rounds against a real branchkey-local running in-process (real HTTP and WebSocket)."""

from __future__ import annotations

import doctest
import logging
import os
import re
import signal
import socket
import threading
import time

import numpy as np
import pytest

from branchkey_integrations.core.errors import ProtocolError, RoundInterrupted, TransportError
from branchkey_integrations.core.federation import Federation
from branchkey_integrations.core.progress import (AggregateRef, RefusedUpload, RoundView, WaitProgress,
                                                  parse_round_view, rounds_behind)
from branchkey_integrations.core.protocol import AGGREGATION_STATUS, Notification
from branchkey_integrations.core import progress as progress_module
from branchkey_integrations.core import waiter as waiter_module
from branchkey_integrations.core.waiter import Every, RoundWaiter

from ..conftest import wait_until
from ..inprocess import InProcessServer
from .test_federation import connect, federations, in_thread, layers_for  # noqa: F401 - fixtures

VIEW = {"run_status": "start", "run_number": 1, "round_index": 2, "uploaded": ["leaf_1"], "missing": ["leaf_2"],
        "required": 2, "refused": [{"leaf": "leaf_2", "reason": "layer_0 has shape (3,)", "at": "2026-01-01T00:00Z"}],
        "opened_at": "2026-01-01T00:00Z", "deadline_at": None,
        "latest_aggregate": {"aggregation_id": "agg-1", "run_number": 1, "round_index": 1}}


# ------------------------------------------------------------------------------------------------ values
def test_a_round_view_is_parsed_and_checked():
    view = parse_round_view(VIEW)
    assert (view.run_number, view.round_index, view.uploaded, view.missing, view.required) == (
        1, 2, ("leaf_1",), ("leaf_2",), 2)
    assert view.refused == (RefusedUpload("leaf_2", "layer_0 has shape (3,)", "2026-01-01T00:00Z"),)
    assert view.latest_aggregate == AggregateRef("agg-1", 1, 1) and view.latest_aggregate.tagged
    assert parse_round_view({**VIEW, "latest_aggregate": None, "round_index": None}).latest_aggregate is None
    with pytest.raises(ProtocolError, match="round_index=-1"):
        parse_round_view({**VIEW, "round_index": -1})
    with pytest.raises(ProtocolError, match="uploaded=.*expected a list of leaf names"):
        parse_round_view({**VIEW, "uploaded": "leaf_1"})
    with pytest.raises(ProtocolError, match="expected run_status and run_number"):
        parse_round_view({"round_index": 1})


@pytest.mark.parametrize("latest, last, done, behind", [
    (AggregateRef("a5", 1, 4), AggregateRef("a2", 1, 2), 3, 2),     # two aggregates missed: catch up
    (AggregateRef("a5", 1, 4), AggregateRef("a4", 1, 3), 4, 1),     # one missed (a timed-out round): upload
    (AggregateRef("a5", 1, 4), AggregateRef("a5", 1, 4), 5, 0),     # holds the latest
    (AggregateRef("b0", 2, 0), AggregateRef("a5", 1, 4), 5, 2),     # a later run: far behind
    (AggregateRef("a5", 1, 4), None, 0, 0),                         # a newcomer uploads
    (AggregateRef("a5"), AggregateRef("a1"), 1, 4),                  # untagged: by the round count (open round 5)
    (None, AggregateRef("a1", 1, 0), 1, 0),
])
def test_rounds_behind(latest, last, done, behind):
    assert rounds_behind(RoundView("start", 1, 5, latest_aggregate=latest), last, done) == behind


def test_wait_progress_says_round_count_missing_leaves_and_refusals():
    progress = WaitProgress(3, "aggregate", 12.4, 1, 2, ("leaf_1",), ("leaf_2",), 2,
                            (RefusedUpload("leaf_2", "layer_0 has shape (3,)"),), "start", known=True)
    assert progress.message.startswith(
        "Round 3 of run 1: waiting for the aggregate for 12 s; 1 of 2 uploads; missing: leaf_2; upload of leaf_2 "
        "refused: layer_0 has shape (3,); the round completes when leaf_2 uploads a model of the same layout, or on "
        "the operator's 'branchkey-local round drop-upload LEAF'")
    assert "--round-deadline" in progress.message  # what unblocks the round, not only why it waits
    assert WaitProgress(1, "run start", 0.0, run_status="pause").message == \
        "Round 1: waiting for the run to start for 0 s (run is 'pause')"
    with pytest.raises(ValueError, match="waiting_for"):
        WaitProgress(1, "coffee", 0.0)


# ------------------------------------------------------------------------------------------------ waiter
def test_a_stale_aggregate_of_an_earlier_round_is_ignored_even_when_it_arrives_after_the_upload():
    waiter = RoundWaiter("b")
    mark, _ = waiter.drain()
    waiter.add_aggregation("late-2", 1, 2)  # round 2's aggregate, late: this leaf timed out of round 2
    assert waiter.wait_for_aggregate_after(mark, time.monotonic() + 0.1, stopped=None, target=(1, 3)) is None
    threading.Timer(0.1, waiter.add_aggregation, ["agg-3", 1, 3]).start()
    assert waiter.wait_for_aggregate_after(mark, time.monotonic() + 30, stopped=None, target=(1, 3)) == "agg-3"
    assert waiter.round_of("agg-3") == (1, 3)


def test_a_later_round_counts_when_this_rounds_aggregate_was_missed_and_untagged_ones_count_after_the_mark():
    waiter = RoundWaiter("b")
    mark, _ = waiter.drain()
    waiter.add_aggregation("agg-5", 1, 5)
    assert waiter.wait_for_aggregate_after(mark, None, stopped=None, target=(1, 3)) == "agg-5"
    mark, _ = waiter.drain()
    waiter.add_aggregation("hosted")  # the hosted platform names no round: "after my upload" is the rule
    assert waiter.wait_for_aggregate_after(mark, None, stopped=None, target=(1, 6)) == "hosted"


def test_an_aggregate_found_twice_is_counted_once():
    waiter = RoundWaiter("b")
    assert waiter.add_aggregation("a-1") is True
    assert waiter.add_aggregation("a-1", 1, 0) is False  # the REST look-up found it too: names its round
    assert waiter.received == 1 and waiter.round_of("a-1") == (1, 0)


def test_interrupt_from_another_thread_wakes_a_wait_at_once_and_every_later_one():
    waiter = RoundWaiter("b")
    threading.Timer(0.2, waiter.interrupt, ["SIGTERM"]).start()
    started = time.monotonic()
    with pytest.raises(RoundInterrupted, match="interrupted: SIGTERM"):
        waiter.wait_for_unread(time.monotonic() + 60)
    assert time.monotonic() - started < 5
    with pytest.raises(RoundInterrupted):
        waiter.sleep(60)
    waiter.clear_interrupt()
    waiter.sleep(0.01)


def test_interrupt_from_a_signal_handler_in_the_waiting_thread():
    assert threading.current_thread() is threading.main_thread()  # pytest and its xdist workers test in main
    waiter = RoundWaiter("b")
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: waiter.interrupt("SIGUSR1"))
    try:
        threading.Timer(0.2, os.kill, [os.getpid(), signal.SIGUSR1]).start()
        started = time.monotonic()
        with pytest.raises(RoundInterrupted, match="SIGUSR1"):
            waiter.wait_for_aggregate_after(0, time.monotonic() + 60, stopped="during round 1")
        assert time.monotonic() - started < 5
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_refresh_request_runs_the_refresh_actions_at_once():
    waiter = RoundWaiter("b")
    ran: list[float] = []

    def look(waited: float) -> None:
        ran.append(waited)
        if len(ran) == 2:
            waiter.add_aggregation("found")

    threading.Timer(0.2, waiter.request_refresh).start()  # what a reconnecting notification channel does
    started = time.monotonic()
    assert waiter.wait_for_unread(started + 60, [Every(3600, look, first=0.0, on_refresh=True)]) == "found"
    assert len(ran) == 2 and time.monotonic() - started < 5


# ------------------------------------------------------------------------------------- in-process server
def test_listeners_see_the_round_the_missing_leaf_and_a_final_report(inprocess_server, federations):
    server, credentials = inprocess_server(2)
    reports: list[WaitProgress] = []
    a = connect(credentials[0], server, federations, on_progress=reports.append, log_every_s=60)
    b = connect(credentials[1], server, federations)
    box = in_thread(a.run_round, layers_for(0), 1.0)
    first = wait_until(lambda: reports and reports[0], 10, "the first report")
    assert (first.round, first.waiting_for, first.run_number, first.round_index) == (1, "aggregate", 1, 0)
    assert first.known and first.uploaded == (credentials[0]["name"],) and first.missing == (credentials[1]["name"],)
    assert first.required == 2 and not first.final and box["thread"].is_alive()
    b.run_round(layers_for(1), 1.0)
    box["thread"].join(30)
    assert box["result"].round == 1 and reports[-1].final


def test_the_safety_net_finds_an_aggregate_whose_notification_never_came(inprocess_server, federations, caplog):
    server, credentials = inprocess_server(2)
    # no notification channel at all: only the round view can end these waits
    a, b = (connect(c, server, federations, transport="none", check_every_s=0.3) for c in credentials)
    with caplog.at_level(logging.INFO, logger="branchkey_integrations"):
        box = in_thread(a.run_round, layers_for(0), 1.0)
        result_b = b.run_round(layers_for(1), 1.0)
        box["thread"].join(30)
    assert box["result"].aggregation_id == result_b.aggregation_id is not None
    assert (result_b.run_number, result_b.round_index) == (1, 0)
    assert "found by asking the server (its notification did not arrive)" in caplog.text


def test_a_refused_upload_of_another_leaf_is_reported_by_name_and_reason(inprocess_server, federations, caplog):
    server, credentials = inprocess_server(2)
    reports: list[WaitProgress] = []
    a = connect(credentials[0], server, federations, on_progress=reports.append, check_every_s=0.3, timeout=60)
    b = connect(credentials[1], server, federations)
    with caplog.at_level(logging.WARNING, logger="branchkey_integrations"):
        box = in_thread(a.run_round, layers_for(0), 1.0)
        wait_until(lambda: reports, 10, "leaf a to wait")
        other_model = [np.zeros((5, 4), np.float32), np.zeros(4, np.float32)]
        outcome = b.exchange(other_model, 1.0)
        assert outcome.kind == "error"
        refused = wait_until(lambda: next((r.refused for r in reports if r.refused), None), 10, "the refusal")
        a.interrupt("test over")
        box["thread"].join(10)
    assert refused[0].leaf == credentials[1]["name"] and "layer_0" in refused[0].reason
    assert isinstance(box["error"], RoundInterrupted)
    assert caplog.text.count(f"the server refused the upload of leaf {credentials[1]['name']}") == 1


def test_interrupt_ends_a_wait_at_once_and_exchange_says_stopped(inprocess_server, federations):
    server, credentials = inprocess_server(2)
    a = connect(credentials[0], server, federations)
    reports: list[WaitProgress] = []
    a.add_progress_listener(reports.append)
    box = in_thread(a.exchange, layers_for(0), 1.0)
    wait_until(lambda: reports, 10, "the wait to start")
    started = time.monotonic()
    a.interrupt("SIGTERM")
    box["thread"].join(10)
    assert time.monotonic() - started < 2
    outcome = box["result"]
    assert outcome.kind == "stopped" and isinstance(outcome.error, RoundInterrupted)
    assert "SIGTERM" in str(outcome.error) and reports[-1].final
    with pytest.raises(RoundInterrupted):
        a.run_round(layers_for(0), 1.0)  # sticky until cleared
    a.clear_interrupt()
    assert a.interrupted is None


def test_a_leaf_two_rounds_behind_catches_up_and_then_completes_a_round_with_the_others(
        inprocess_server, federations, caplog):
    server, credentials = inprocess_server(2)
    a, b = (connect(c, server, federations) for c in credentials)

    def both(number):
        box = in_thread(a.run_round, layers_for(number), 1.0)
        result = b.run_round(layers_for(number + 10), 1.0)
        box["thread"].join(30)
        return result

    both(1)
    old_state = a.state_dict()  # a checkpoint of round 1
    both(2)
    latest = both(3)
    a.close()
    resumed = connect(credentials[0], server, federations)
    resumed.load_state_dict(old_state)
    box = in_thread(b.run_round, layers_for(14), 1.0)  # b goes on with the branch's round 4
    with caplog.at_level(logging.WARNING, logger="branchkey_integrations"):
        caught = resumed.run_round(layers_for(4), 1.0)
    assert caught.caught_up and caught.upload_mb == 0 and caught.aggregation_id == latest.aggregation_id
    assert caught.round == resumed.round == latest.round == 3  # the Federation numbers rounds as its branch does
    for got, want in zip(caught.layers, latest.layers):
        np.testing.assert_array_equal(got, want)
    assert "is 2 rounds behind branch" in caplog.text and "resumed from an older checkpoint?" in caplog.text
    together = resumed.run_round(layers_for(5), 1.0)
    box["thread"].join(30)
    assert not together.caught_up and together.aggregation_id == box["result"].aggregation_id
    assert (together.run_number, together.round_index) == (1, 3) and together.round == 4


def test_continue_skips_a_round_whose_server_is_gone_and_says_so_once(tmp_path, federations, caplog):
    """A server that stays away is asked again until the round's timeout (the wait line says so), not longer;
    then the round is skipped (``continue``) or raises a TransportError that says how long it tried."""
    server = InProcessServer(tmp_path / "data")  # stopped by the test itself
    credentials = server.create_branch(1)
    lines: list[WaitProgress] = []
    leaf = connect(credentials[0], server, federations, on_timeout="continue", timeout=2.0,
                   client_options={"max_retries": 0}, on_progress=lines.append)
    assert leaf.run_round(layers_for(0), 1.0).round == 1
    server.stop()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="branchkey_integrations"):
        skipped = leaf.run_round(layers_for(1), 1.0)
    assert 2.0 <= time.monotonic() - started < 10
    assert skipped.skipped == "unreachable" and skipped.timed_out and skipped.round == 1
    assert caplog.text.count("Round 2 skipped") == 1
    away = [line for line in lines if line.waiting_for == "server"]
    assert away and "POST /api/v1/file/upload: connection refused" in away[0].message, lines
    assert re.search(r"trying again until the round's timeout, [12] s from now", away[0].message)
    assert caplog.text.count("waiting for the server") == 1  # at WARNING once; later lines at INFO
    leaf.on_timeout = "raise"
    with pytest.raises(TransportError, match=r"tried again for \d+ s, until the round's deadline"):
        leaf.run_round(layers_for(1), 1.0)


def test_interrupt_ends_the_wait_for_the_notification_channel_and_the_next_round_says_so(inprocess_server,
                                                                                         federations):
    server, credentials = inprocess_server(1)
    with socket.socket() as probe:  # a port nobody listens on: the AMQP channel can never open
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    leaf = Federation(credentials[0], server.url, transport="amqp", connect_timeout=60,
                      client_options={"rbmq_host": "127.0.0.1", "rbmq_port": port})
    federations.append(leaf)
    threading.Timer(0.3, leaf.interrupt, ["SIGTERM"]).start()
    started = time.monotonic()
    leaf.connect()  # AMQP never opens: only the interrupt ends this wait early
    assert time.monotonic() - started < 10
    with pytest.raises(RoundInterrupted, match="SIGTERM"):
        leaf.run_round(layers_for(0), 1.0)


@pytest.mark.parametrize("module", [progress_module, waiter_module])
def test_the_docstring_examples_run_as_written(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0



def test_a_late_aggregate_of_an_earlier_round_is_not_taken_for_this_one(inprocess_server, federations, caplog):
    server, credentials = inprocess_server(2)
    reports: list[WaitProgress] = []
    a = connect(credentials[0], server, federations, on_progress=reports.append, log_every_s=60)
    b = connect(credentials[1], server, federations)
    box = in_thread(a.run_round, layers_for(0), 1.0)
    b.run_round(layers_for(1), 1.0)
    box["thread"].join(30)
    box = in_thread(a.run_round, layers_for(2), 1.0)  # round 2: run 1, round index 1
    wait_until(lambda: any(r.round == 2 for r in reports), 10, "leaf a to wait for round 2")
    with caplog.at_level(logging.INFO, logger="branchkey_integrations"):
        # what a slow queue could deliver now: an aggregate of round index 0, which this leaf timed out of
        a.client._on_notification(Notification(AGGREGATION_STATUS, {"aggregation_id": "late-0", "run_number": 1,
                                                                     "round_index": 0}))
        assert box["thread"].is_alive()
        ours = b.run_round(layers_for(3), 1.0)
        box["thread"].join(30)
    assert box["result"].aggregation_id == ours.aggregation_id and (ours.run_number, ours.round_index) == (1, 1)
    assert "Ignoring aggregate late-0 of run 1 round index 0: this leaf's upload went into run 1 round index 1" in caplog.text
