"""Each leaf's connection state on the dashboard, from real connections: a WebSocket (the Client's) and
an AMQP consumer on the leaf's queue in a real RabbitMQ (read from the broker while a dashboard watches)."""

from __future__ import annotations

import pika
import pytest

from branchkey_integrations import Client
from branchkey_integrations.server import dashboard

from ..conftest import MANAGEMENT_URL, wait_until
from ..inprocess import InProcessServer
from .test_api import Stream, get


def presence(stream: Stream, leaf: str, transport: str, connected: bool) -> dict:
    """The next presence event that says ``leaf`` is now (dis)connected over ``transport``."""
    while True:
        event = stream.next("presence", timeout=20)
        if (event["leaf"], event["transport"], event["connected"]) == (leaf, transport, connected):
            return event


def states(server, branch: str) -> dict[str, dict]:
    return {leaf["name"]: leaf for leaf in get(server, f"/admin/v1/branches/{branch}/live")["leaves"]}


def test_a_websocket_shows_connected_then_gone(inprocess_server):
    server, leaves = inprocess_server(2)
    branch = leaves[0]["branch_id"]
    stream = Stream(server)
    assert states(server, branch)["leaf_1"]["websocket"] is False
    with Client(leaves[0], host=server.url, transport="websocket") as client:
        client.run_status  # noqa: B018  (the client is up; its WebSocket connects in the background)
        event = stream.next("presence", timeout=20)
        assert (event["leaf"], event["transport"], event["connected"]) == ("leaf_1", "websocket", True)
        now = states(server, branch)
        assert now["leaf_1"]["websocket"] is True and now["leaf_2"]["websocket"] is False
        assert now["leaf_1"]["amqp"] is None  # no broker on this server
    event = stream.next("presence", timeout=20)
    assert (event["leaf"], event["connected"]) == ("leaf_1", False)
    assert states(server, branch)["leaf_1"]["websocket"] is False


@pytest.mark.amqp
@pytest.mark.slow  # RabbitMQ's management API refreshes consumer counts every 5 s
def test_an_amqp_consumer_shows_connected_while_a_dashboard_watches(rabbitmq, tmp_path, monkeypatch):
    monkeypatch.setattr(dashboard, "AMQP_POLL_S", 0.2)
    server = InProcessServer(tmp_path / "data", amqp_url=rabbitmq, amqp_management_url=MANAGEMENT_URL)
    try:
        leaves = server.create_branch(2)
        branch, tree = leaves[0]["branch_id"], leaves[0]["tree_id"]
        stream = Stream(server)  # a dashboard watching: the server reads the queues' consumers
        wait_until(lambda: states(server, branch)["leaf_1"]["amqp"] is False, 20, "the broker's first answer")
        leaf = leaves[0]
        connection = pika.BlockingConnection(pika.ConnectionParameters(
            "127.0.0.1", 5672, tree, pika.PlainCredentials(leaf["id"], leaf["session_token"])))
        try:
            channel = connection.channel()
            channel.basic_consume(leaf["id"], lambda *args: None)
            presence(stream, "leaf_1", "amqp", True)
            assert states(server, branch)["leaf_1"]["amqp"] is True
            assert states(server, branch)["leaf_2"]["amqp"] is False
        finally:
            connection.close()
        presence(stream, "leaf_1", "amqp", False)
    finally:
        server.admin("DELETE", f"/admin/v1/trees/{tree}/broker")
        server.stop()
