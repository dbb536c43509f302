"""Our AMQP transport against a real RabbitMQ: it reconnects with backoff after the broker drops
it, and a notification published while it was away is delivered, not lost (durable queue)."""

from __future__ import annotations

import queue
import uuid
from urllib.parse import quote

import pytest
import requests

from branchkey_integrations.core.notifications import AmqpTransport, Backoff
from branchkey_integrations.server.rabbitmq import RabbitMQBroker

from ..conftest import MANAGEMENT_URL, wait_until

ADMIN = ("guest", "guest")


def aggregation(aggregation_id: str) -> dict:
    return {"message_type": "aggregation_status", "body": {"aggregation_id": aggregation_id}}


@pytest.fixture
def provisioned(rabbitmq):
    tree, branch, leaf, token = (str(uuid.uuid4()) for _ in range(4))
    broker = RabbitMQBroker(rabbitmq, MANAGEMENT_URL)
    broker.provision_leaf(tree, branch, leaf, token)
    yield broker, tree, branch, leaf, token
    broker.close()
    requests.delete(f"{MANAGEMENT_URL}/api/vhosts/{quote(tree, safe='')}", auth=ADMIN, timeout=10)
    requests.delete(f"{MANAGEMENT_URL}/api/users/{quote(leaf, safe='')}", auth=ADMIN, timeout=10)


def leaf_connections(tree: str):
    response = requests.get(f"{MANAGEMENT_URL}/api/vhosts/{quote(tree, safe='')}/connections", auth=ADMIN, timeout=10)
    return [c for c in response.json() if c.get("client_properties", {}).get("connection_name", "").startswith("leaf-")]


@pytest.mark.amqp
def test_amqp_transport_reconnects_and_loses_nothing(provisioned):
    broker, tree, branch, leaf, token = provisioned
    received: queue.Queue = queue.Queue()
    # a long first backoff so the publish below surely lands while the transport is away
    transport = AmqpTransport("127.0.0.1", 5672, leaf, token, tree, backoff=Backoff(initial=1.5))
    transport.start(received.put)
    try:
        assert transport.wait_connected(15)
        broker.publish(tree, branch, aggregation("before"))
        assert received.get(timeout=10).aggregation_id == "before"

        (connection,) = wait_until(lambda: leaf_connections(tree), 10, "the management API to list the leaf")
        assert connection["client_properties"]["connection_name"] == f"leaf-{leaf}"
        assert connection["user"] == leaf
        requests.delete(f"{MANAGEMENT_URL}/api/connections/{quote(connection['name'], safe='')}", auth=ADMIN,
                        timeout=10).raise_for_status()
        wait_until(lambda: not transport.connected.is_set(), 10, "the transport to notice the drop")
        broker.publish(tree, branch, aggregation("while-away"))

        assert received.get(timeout=20).aggregation_id == "while-away"
        assert transport.reconnects >= 1 and transport.connected.is_set()
    finally:
        transport.close()
    assert not transport.connected.is_set()


@pytest.mark.amqp
def test_amqp_transport_with_wrong_password_keeps_retrying_without_leaking_it(provisioned, caplog):
    _, tree, _, leaf, _ = provisioned
    transport = AmqpTransport("127.0.0.1", 5672, leaf, "wrong-token-XYZ", tree, backoff=Backoff(initial=0.2))
    transport.start(lambda n: None)
    try:
        wait_until(lambda: transport.reconnects >= 2, 20, "two failed attempts")
        assert not transport.connected.is_set()
    finally:
        transport.close()
    assert "refused leaf" in caplog.text and "wrong-token-XYZ" not in caplog.text
