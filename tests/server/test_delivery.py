"""Results reach their leaves (issue 11, server side), on the real in-process server.

- catch-up: a leaf whose WebSocket (re)connects is sent the aggregate of the round it took part in
  and has not downloaded, and nothing else (never an earlier aggregate, never one of a round it left out);
- WebSocket tickets: a wrong request_id does not use up the holder's ticket;
- the AMQP outbox: a notification stays in the store until the publisher confirms it, retried with
  backoff, and goes out after a restart (a publish that fails on purpose is the injected fault here; the
  real broker outage is tests/integration/test_broker_outage.py);
- a stalled upload is answered 408 after the idle timeout and its file removed.
"""

from __future__ import annotations

import asyncio
import json
import socket as socketlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from branchkey_integrations.core import wire
from branchkey_integrations.core.errors import BrokerError
from branchkey_integrations.core.protocol import aggregation_message, run_status_message
from branchkey_integrations.server.outbox import Outbox, backoff_s
from branchkey_integrations.server.presence import PRESENCE
from branchkey_integrations.server.store import Store
from branchkey_integrations.server.workers import Workers

from ..conftest import wait_until

LAYERS = [np.arange(6, dtype=np.float32).reshape(2, 3)]


def ws_url(live, data: dict[str, str], request_id: str | None = None) -> str:
    return (live.url.replace("http://", "ws://") +
            f"/api/v1/ws?ticket={data['ticket_id']}&request_id={request_id or data['request_id']}")


def first_message(live, leaf, branch_id: str) -> dict[str, Any]:
    """Connect the leaf's WebSocket and return the first message it gets; a run_status is sent after connecting,
    so a leaf that is owed nothing receives that one (no waiting on silence).

    The run_status is sent only once the server counts the socket as open, which it does after the catch-up
    (if any) went out, so the two never race; and the socket is seen closed before the next call connects."""
    presence = live.thread.app[PRESENCE]
    with connect(ws_url(live, live.ticket(leaf))) as socket:
        live.wait_for(lambda: presence.of(leaf["id"])["websocket"])
        live.admin("POST", f"/admin/v1/branches/{branch_id}/run", {"run_status": "start"}, expect=200)
        message = json.loads(socket.recv(timeout=10))
    live.wait_for(lambda: not presence.of(leaf["id"])["websocket"])
    return message


def test_a_leaf_that_connects_after_the_aggregate_is_sent_it_once_until_it_downloads(live) -> None:
    branch, (a, b, c) = live.make_branch(3, min_leaves=2)
    for leaf in (a, b):
        assert live.upload(leaf, wire.encode(LAYERS, 1.0)).status_code == 201
    aggregate = live.wait_aggregate(branch["id"])

    caught_up = first_message(live, a, branch["id"])
    assert caught_up == aggregation_message(aggregate, 1, 0)
    assert first_message(live, a, branch["id"]) == caught_up  # not downloaded yet: sent again
    assert first_message(live, c, branch["id"]) == run_status_message("start")  # c took no part in round 0

    assert live.download(a, aggregate).status_code == 200  # a has its result now
    assert first_message(live, a, branch["id"]) == run_status_message("start")
    assert first_message(live, b, branch["id"]) == caught_up  # b has not downloaded


def test_catch_up_never_sends_an_earlier_rounds_aggregate(live) -> None:
    branch, (a, b) = live.make_branch(2)
    for leaf in (a, b):
        assert live.upload(leaf, wire.encode(LAYERS, 1.0)).status_code == 201
    live.wait_aggregate(branch["id"])
    assert live.upload(a, wire.encode(LAYERS, 2.0)).status_code == 201  # round 1 is open, a waits in it
    assert first_message(live, a, branch["id"]) == run_status_message("start")
    assert live.upload(b, wire.encode(LAYERS, 2.0)).status_code == 201
    second = live.wait_aggregate(branch["id"], index=1)
    assert first_message(live, a, branch["id"]) == aggregation_message(second, 1, 1)


def test_a_wrong_request_id_does_not_use_up_the_holders_ticket(live) -> None:
    branch, (a, _) = live.make_branch(2)
    data = live.ticket(a)
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(live, data, request_id="not-the-request-id"))
    assert refused.value.response.status_code == 401
    with connect(ws_url(live, data)):  # the real holder still gets in
        live.wait_for(lambda: live.thread.server.notifier.connected(branch["id"]) == 1)
    with pytest.raises(InvalidStatus) as spent:  # and the ticket is spent now
        connect(ws_url(live, data))
    assert spent.value.response.status_code == 401


# -- the AMQP outbox --------------------------------------------------------------------------


class FlakyBroker:
    """A publish that fails ``failures`` times, then records what it was given (the injected fault)."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.published: list[tuple[str, str, dict[str, Any]]] = []

    def publish(self, tree_id: str, branch_id: str, message: dict[str, Any]) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise BrokerError("Publishing failed: ConnectionRefusedError (injected)")
        self.published.append((tree_id, branch_id, message))


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [backoff_s(n, 0.5, 4.0) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_outbox_retries_until_confirmed_and_keeps_rows_across_a_restart(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    store = Store(tmp_path / "data")
    tree = store.create_tree("t")
    branch = store.create_branch(tree["id"], "b")
    message = aggregation_message("f00d", 1, 0)
    executor = ThreadPoolExecutor(2)

    async def stopped_server() -> None:  # a first server stores the message; its publisher never runs
        outbox = Outbox(store, Workers(executor), FlakyBroker(0).publish)
        await outbox.add(tree["id"], branch.id, message)

    asyncio.run(stopped_server())
    assert [json.loads(r["message"]) for r in store.due_outbox()] == [message]

    broker = FlakyBroker(failures=3)

    async def restarted_server() -> None:
        outbox = Outbox(store, Workers(executor), broker.publish, max_backoff_s=0.2)
        outbox.start()
        await asyncio.get_running_loop().run_in_executor(  # confirmed when its row is gone
            None, wait_until, lambda: not store.due_outbox(now=float("inf")), 20, "the outbox row to be confirmed")
        await outbox.close()

    asyncio.run(restarted_server())
    assert broker.published == [(tree["id"], branch.id, message)] and broker.calls == 4
    executor.shutdown()
    store.close()


def test_outbox_drops_a_row_unconfirmed_for_a_day(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from branchkey_integrations.server.outbox import MAX_AGE_S

    store = Store(tmp_path / "data")
    tree = store.create_tree("t")
    branch = store.create_branch(tree["id"], "b")
    young = store.add_outbox(tree["id"], branch.id, json.dumps(aggregation_message("young")))
    old = store.add_outbox(tree["id"], branch.id, json.dumps(aggregation_message("old")))
    with store._tx() as conn:  # as if queued a day ago
        conn.execute("UPDATE outbox SET created = created - ? WHERE id = ?", (MAX_AGE_S + 1, old))
    executor = ThreadPoolExecutor(1)
    outbox = Outbox(store, Workers(executor), FlakyBroker(failures=100).publish)
    assert asyncio.run(outbox.send_due()) == 0
    assert [row["id"] for row in store.due_outbox(now=float("inf"))] == [young]  # kept for its next try
    executor.shutdown()
    store.close()


def test_outbox_drops_a_row_whose_branch_is_gone(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    store = Store(tmp_path / "data")
    store.add_outbox("tree-gone", "branch-gone", json.dumps(aggregation_message("x")))
    executor = ThreadPoolExecutor(1)
    outbox = Outbox(store, Workers(executor), FlakyBroker(failures=100).publish)
    assert asyncio.run(outbox.send_due()) == 0
    assert store.due_outbox(now=float("inf")) == []
    executor.shutdown()
    store.close()


# -- a stalled upload -------------------------------------------------------------------------


def test_a_stalled_upload_is_dropped_and_its_file_removed(start_server) -> None:
    live = start_server(upload_idle_timeout_s=0.5)
    branch, (a, _) = live.make_branch(2)
    files_dir = live.thread.server.store.files_dir
    before = set(files_dir.iterdir())
    body_start = (b"--xx\r\nContent-Disposition: form-data; name=\"file\"; filename=\"w.npz\"\r\n"
                  b"Content-Type: application/octet-stream\r\n\r\n" + b"\0" * 1000)
    host, port = live.url.rsplit("/", 1)[1].split(":")
    with socketlib.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(b"POST /api/v1/file/upload HTTP/1.1\r\nHost: x\r\n"
                    + f"Authorization: Bearer {a['id']}:{a['session_token']}\r\n".encode()
                    + b"Content-Type: multipart/form-data; boundary=xx\r\nContent-Length: 100000\r\n\r\n" + body_start)
        live.wait_for(lambda: set(files_dir.iterdir()) != before)  # the temp file exists while the body arrives
        answer = raw.recv(65536)  # the server gives up after 0.5 s without data, answers and closes
    assert b" 408 " in answer.split(b"\r\n", 1)[0] and b"stalled" in answer
    live.wait_for(lambda: set(files_dir.iterdir()) == before)  # and the temporary file is gone


def test_an_aggregate_committed_but_never_queued_is_queued_at_the_next_start(tmp_path: Path) -> None:
    """The server died between committing an aggregate and queuing its notification (the window is
    milliseconds, so the test makes it: the second aggregate is committed through the store alone)."""
    from concurrent.futures import ThreadPoolExecutor

    store = Store(tmp_path / "data")
    tree = store.create_tree("t")
    branch = store.create_branch(tree["id"], "b")
    executor = ThreadPoolExecutor(2)

    def commit(round_index: int) -> str:
        temp = store.new_temp_path()
        temp.write_bytes(wire.encode(LAYERS, 1.0))
        return store.commit_aggregate(temp, branch_id=branch.id, run_number=1, round_index=round_index,
                                      specs=wire.decode(wire.encode(LAYERS, 1.0)).specs, size=1, sha256="0")

    first = commit(0)
    outbox = Outbox(store, Workers(executor), FlakyBroker(0).publish)
    asyncio.run(outbox.add(tree["id"], branch.id, aggregation_message(first, 1, 0)))  # announced as usual
    store.outbox_sent(store.due_outbox()[0]["id"])
    assert asyncio.run(outbox.requeue_unannounced()) == 0
    second = commit(1)  # ... and the server dies before queuing it
    assert asyncio.run(outbox.requeue_unannounced()) == 1
    assert [json.loads(r["message"]) for r in store.due_outbox()] == [aggregation_message(second, 1, 1)]
    assert asyncio.run(outbox.requeue_unannounced()) == 0  # queued once
    executor.shutdown()
    store.close()
