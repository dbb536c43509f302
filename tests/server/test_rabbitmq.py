"""RabbitMQBroker against a real RabbitMQ, with leaves that connect exactly like the official 2.7.1 client.

Needs RabbitMQ with the management plugin (the ``rabbitmq`` fixture of tests/conftest.py: a
skip on a developer machine without one, a failure under CI).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator
from urllib.parse import quote, unquote, urlsplit

import pika
import pika.exceptions
import pytest
import requests

from branchkey_integrations.core.errors import BranchKeyError
from branchkey_integrations.core.errors import BrokerArgumentError, BrokerError
from branchkey_integrations.server.rabbitmq import RabbitMQBroker

from ..conftest import AMQP_URL, MANAGEMENT_URL

_AMQP = urlsplit(AMQP_URL)
HOST, PORT = _AMQP.hostname or "127.0.0.1", _AMQP.port or 5672
ADMIN = (unquote(_AMQP.username or "guest"), unquote(_AMQP.password or "guest"))
RECEIVE_TIMEOUT_S = 10.0
needs_rabbitmq = pytest.mark.amqp


def _q(name: str) -> str:
    return quote(name, safe="")


def _api(method: str, path: str, auth: tuple[str, str] = ADMIN, **kwargs) -> requests.Response:
    return requests.request(method, f"{MANAGEMENT_URL}{path}", auth=auth, timeout=10, **kwargs)


@dataclass
class Scratch:
    """Fresh ids for one test, and the vhosts and users to delete after it."""

    vhosts: list[str] = field(default_factory=list)
    users: list[str] = field(default_factory=list)

    def tree(self) -> str:
        tree_id = str(uuid.uuid4())
        self.vhosts.append(tree_id)
        return tree_id

    def leaf(self) -> tuple[str, str]:
        """A new leaf id and session token."""
        leaf_id = str(uuid.uuid4())
        self.users.append(leaf_id)
        return leaf_id, uuid.uuid4().hex


@pytest.fixture
def scratch(rabbitmq: None) -> Iterator[Scratch]:
    made = Scratch()
    yield made
    for vhost in made.vhosts:
        _api("DELETE", f"/api/vhosts/{_q(vhost)}")
    for user in made.users:  # users are global in RabbitMQ: deleting the vhost leaves them
        _api("DELETE", f"/api/users/{_q(user)}")


@pytest.fixture
def broker(rabbitmq: None) -> Iterator[RabbitMQBroker]:
    with RabbitMQBroker(AMQP_URL, MANAGEMENT_URL) as made:
        yield made


def connect_as_leaf(tree_id: str, leaf_id: str, token: str) -> pika.BlockingConnection:
    """Connect the way the official client's Consumer does (one attempt, to fail fast)."""
    return pika.BlockingConnection(
        pika.ConnectionParameters(
            host=HOST,
            port=PORT,
            virtual_host=tree_id,
            credentials=pika.PlainCredentials(leaf_id, token),
            heartbeat=30,
            connection_attempts=1,
            client_properties={"connection_name": "leaf-" + leaf_id},
        )
    )


def receive(connection: pika.BlockingConnection, queue: str, count: int) -> list[tuple[pika.BasicProperties, dict]]:
    """Consume ``count`` messages like the official client (basic_consume, manual ack), then check
    that the queue holds no more. Waits at most RECEIVE_TIMEOUT_S."""
    got: list[tuple[pika.BasicProperties, dict]] = []

    def on_message(channel, method, properties, body: bytes) -> None:
        got.append((properties, json.loads(body.decode())))
        channel.basic_ack(delivery_tag=method.delivery_tag)

    channel = connection.channel()
    channel.basic_consume(queue=queue, on_message_callback=on_message)
    deadline = time.monotonic() + RECEIVE_TIMEOUT_S
    while len(got) < count and time.monotonic() < deadline:
        connection.process_data_events(time_limit=0.1)
    channel.close()  # requeues anything delivered beyond ``count`` but not acked
    assert len(got) == count, f"expected {count} messages on queue {queue}, got {len(got)}"
    assert connection.channel().basic_get(queue)[0] is None, f"queue {queue} holds more than {count}"
    return got


def aggregation(file_id: str) -> dict:
    return {"message_type": "aggregation_status", "body": {"aggregation_id": file_id}}


def access_refused(excinfo: pytest.ExceptionInfo) -> bool:
    return excinfo.value.reply_code == 403 and "ACCESS_REFUSED" in excinfo.value.reply_text


# -- delivery --------------------------------------------------------------------------------


@needs_rabbitmq
def test_leaf_receives_a_persistent_json_message_like_the_official_client(broker, scratch):
    tree_id, branch_id = scratch.tree(), str(uuid.uuid4())
    leaf_id, token = scratch.leaf()
    broker.provision_leaf(tree_id, branch_id, leaf_id, token)

    connection = connect_as_leaf(tree_id, leaf_id, token)
    broker.publish(tree_id, branch_id, aggregation("file-1"))
    [(properties, body)] = receive(connection, leaf_id, 1)
    connection.close()

    assert body == aggregation("file-1")
    assert properties.delivery_mode == 2
    assert properties.content_type == "application/json"


@needs_rabbitmq
def test_every_leaf_of_a_branch_receives_one_publish(broker, scratch):
    tree_id, branch_id, other_branch = scratch.tree(), str(uuid.uuid4()), str(uuid.uuid4())
    leaves = [scratch.leaf() for _ in range(2)]
    outsider = scratch.leaf()
    for leaf_id, token in leaves:
        broker.provision_leaf(tree_id, branch_id, leaf_id, token)
    broker.provision_leaf(tree_id, other_branch, *outsider)

    message = {"message_type": "run_status", "body": {"run_status": "start"}}
    broker.publish(tree_id, branch_id, message)

    for leaf_id, token in leaves:
        connection = connect_as_leaf(tree_id, leaf_id, token)
        assert [body for _, body in receive(connection, leaf_id, 1)] == [message]
        connection.close()
    connection = connect_as_leaf(tree_id, *outsider)
    receive(connection, outsider[0], 0)  # another branch of the same tree hears nothing
    connection.close()


@needs_rabbitmq
def test_a_message_waits_in_the_durable_queue_for_a_leaf_that_is_offline(broker, scratch):
    tree_id, branch_id = scratch.tree(), str(uuid.uuid4())
    leaf_id, token = scratch.leaf()
    broker.provision_leaf(tree_id, branch_id, leaf_id, token)
    broker.publish(tree_id, branch_id, aggregation("while-offline"))

    queue = _api("GET", f"/api/queues/{_q(tree_id)}/{_q(leaf_id)}").json()
    exchange = _api("GET", f"/api/exchanges/{_q(tree_id)}/{_q(branch_id)}").json()
    assert queue["durable"] and not queue["auto_delete"]
    assert exchange["durable"] and exchange["type"] == "fanout"

    connection = connect_as_leaf(tree_id, leaf_id, token)
    assert [body for _, body in receive(connection, leaf_id, 1)] == [aggregation("while-offline")]
    connection.close()


@needs_rabbitmq
def test_concurrent_publishes_from_many_threads_all_arrive(broker, scratch):
    tree_id, branch_id = scratch.tree(), str(uuid.uuid4())
    leaf_id, token = scratch.leaf()
    broker.provision_leaf(tree_id, branch_id, leaf_id, token)
    errors: list[BaseException] = []

    def publish_some(thread: int) -> None:
        try:
            for n in range(10):
                broker.publish(tree_id, branch_id, aggregation(f"{thread}-{n}"))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=publish_some, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors

    connection = connect_as_leaf(tree_id, leaf_id, token)
    ids = {body["body"]["aggregation_id"] for _, body in receive(connection, leaf_id, 80)}
    connection.close()
    assert ids == {f"{t}-{n}" for t in range(8) for n in range(10)}


@needs_rabbitmq
def test_publish_reconnects_once_after_the_broker_drops_the_connection(scratch, rabbitmq):
    # A dedicated admin user, so that closing "its" connections touches no other test's.
    admin, password = f"bk-test-admin-{uuid.uuid4()}", uuid.uuid4().hex
    scratch.users.append(admin)
    _api("PUT", f"/api/users/{_q(admin)}", json={"password": password, "tags": "administrator"}).raise_for_status()
    amqp_url = f"amqp://{admin}:{password}@{HOST}:{PORT}/"
    tree_id, branch_id = scratch.tree(), str(uuid.uuid4())
    leaf_id, token = scratch.leaf()

    with RabbitMQBroker(amqp_url, MANAGEMENT_URL) as broker:
        broker.provision_leaf(tree_id, branch_id, leaf_id, token)
        broker.publish(tree_id, branch_id, aggregation("before"))
        _api("DELETE", f"/api/connections/username/{_q(admin)}").raise_for_status()
        broker.publish(tree_id, branch_id, aggregation("after"))

    connection = connect_as_leaf(tree_id, leaf_id, token)
    bodies = [body for _, body in receive(connection, leaf_id, 2)]
    connection.close()
    assert bodies == [aggregation("before"), aggregation("after")]


# -- provisioning and permissions ------------------------------------------------------------


@needs_rabbitmq
def test_provisioning_twice_is_harmless_and_rotates_the_token(broker, scratch):
    tree_id, branch_id = scratch.tree(), str(uuid.uuid4())
    leaf_id, token = scratch.leaf()
    broker.provision_leaf(tree_id, branch_id, leaf_id, token)
    broker.provision_leaf(tree_id, branch_id, leaf_id, token)

    broker.publish(tree_id, branch_id, aggregation("once"))
    connection = connect_as_leaf(tree_id, leaf_id, token)
    assert [body for _, body in receive(connection, leaf_id, 1)] == [aggregation("once")]  # one binding
    connection.close()

    new_token = uuid.uuid4().hex
    broker.provision_leaf(tree_id, branch_id, leaf_id, new_token)
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        connect_as_leaf(tree_id, leaf_id, token)
    connect_as_leaf(tree_id, leaf_id, new_token).close()

    user = _api("GET", f"/api/users/{_q(leaf_id)}").json()
    assert user["tags"] in ([], "")
    permissions = _api("GET", f"/api/permissions/{_q(tree_id)}/{_q(leaf_id)}").json()
    assert (permissions["configure"], permissions["write"]) == ("^$", "^$")


@needs_rabbitmq
def test_a_leaf_can_declare_nothing_and_publish_nothing(broker, scratch):
    tree_id, branch_id = scratch.tree(), str(uuid.uuid4())
    leaf_id, token = scratch.leaf()
    broker.provision_leaf(tree_id, branch_id, leaf_id, token)
    connection = connect_as_leaf(tree_id, leaf_id, token)

    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as excinfo:
        connection.channel().queue_declare(queue=f"{leaf_id}-extra", durable=True)
    assert access_refused(excinfo)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as excinfo:
        connection.channel().exchange_declare(exchange=f"{branch_id}-extra", exchange_type="fanout")
    assert access_refused(excinfo)
    channel = connection.channel()
    channel.confirm_delivery()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as excinfo:
        channel.basic_publish(exchange=branch_id, routing_key="", body=b"{}")
    assert access_refused(excinfo)
    connection.close()


@needs_rabbitmq
def test_a_leaf_cannot_read_another_leafs_queue(broker, scratch):
    tree_id, branch_id = scratch.tree(), str(uuid.uuid4())
    (leaf_a, token_a), (leaf_b, token_b) = scratch.leaf(), scratch.leaf()
    broker.provision_leaf(tree_id, branch_id, leaf_a, token_a)
    broker.provision_leaf(tree_id, branch_id, leaf_b, token_b)
    connection = connect_as_leaf(tree_id, leaf_a, token_a)

    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as excinfo:
        connection.channel().basic_consume(queue=leaf_b, on_message_callback=lambda *args: None)
    assert access_refused(excinfo)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as excinfo:
        connection.channel().basic_get(queue=leaf_b)
    assert access_refused(excinfo)
    connection.close()


@needs_rabbitmq
def test_a_leaf_cannot_open_another_trees_vhost(broker, scratch):
    tree_a, tree_b, branch_id = scratch.tree(), scratch.tree(), str(uuid.uuid4())
    (leaf_a, token_a), (leaf_b, token_b) = scratch.leaf(), scratch.leaf()
    broker.provision_leaf(tree_a, branch_id, leaf_a, token_a)
    broker.provision_leaf(tree_b, branch_id, leaf_b, token_b)
    with pytest.raises(pika.exceptions.ProbableAccessDeniedError):
        connect_as_leaf(tree_b, leaf_a, token_a)


@needs_rabbitmq
def test_remove_tree_deletes_its_vhost_and_may_repeat(broker, scratch):
    tree_id, branch_id = scratch.tree(), str(uuid.uuid4())
    leaf_id, token = scratch.leaf()
    broker.provision_leaf(tree_id, branch_id, leaf_id, token)
    broker.publish(tree_id, branch_id, aggregation("before"))  # opens a publishing connection to the vhost
    broker.remove_tree(tree_id)
    broker.remove_tree(tree_id)
    assert _api("GET", f"/api/vhosts/{_q(tree_id)}").status_code == 404
    with pytest.raises(BrokerError):
        broker.publish(tree_id, branch_id, aggregation("after"))  # the branch is gone with its vhost


@needs_rabbitmq
def test_remove_leaf_deletes_its_user_and_queue_and_may_repeat(broker, scratch):
    tree_id, branch_id = scratch.tree(), str(uuid.uuid4())
    leaf_id, token = scratch.leaf()
    broker.provision_leaf(tree_id, branch_id, leaf_id, token)
    broker.remove_leaf(tree_id, leaf_id)
    broker.remove_leaf(tree_id, leaf_id)

    assert _api("GET", f"/api/users/{_q(leaf_id)}").status_code == 404
    assert _api("GET", f"/api/queues/{_q(tree_id)}/{_q(leaf_id)}").status_code == 404
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        connect_as_leaf(tree_id, leaf_id, token)
    broker.publish(tree_id, branch_id, aggregation("nobody-listens"))  # a branch without leaves is fine


# -- errors ----------------------------------------------------------------------------------


@needs_rabbitmq
def test_check_passes_against_a_working_broker(broker):
    broker.check()


@needs_rabbitmq
def test_wrong_management_password_names_the_masked_url(rabbitmq):
    secret = "wrong-" + uuid.uuid4().hex
    broker = RabbitMQBroker(f"amqp://{ADMIN[0]}:{secret}@{HOST}:{PORT}/", MANAGEMENT_URL)
    with pytest.raises(BrokerError) as excinfo:
        broker.check()
    message = str(excinfo.value)
    assert secret not in message and secret not in repr(broker)
    assert f"{ADMIN[0]}:***@{HOST}:{PORT}" in message
    assert MANAGEMENT_URL in message and "401" in message

    token = uuid.uuid4().hex
    with pytest.raises(BrokerError) as excinfo:
        broker.provision_leaf(str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4()), token)
    assert token not in str(excinfo.value) and secret not in str(excinfo.value)


@needs_rabbitmq
def test_unreachable_amqp_port_says_how_to_start_rabbitmq(rabbitmq):
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    broker = RabbitMQBroker(f"amqp://{ADMIN[0]}:{ADMIN[1]}@127.0.0.1:{free_port}/", MANAGEMENT_URL)
    with pytest.raises(BrokerError) as excinfo:
        broker.check()
    assert f"127.0.0.1:{free_port}" in str(excinfo.value)
    assert "rabbitmq-server" in str(excinfo.value)
    assert isinstance(excinfo.value.__cause__, pika.exceptions.AMQPConnectionError)


def test_unreachable_management_api_says_how_to_enable_it():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    broker = RabbitMQBroker("amqp://guest:guest@127.0.0.1:5672/", f"http://127.0.0.1:{free_port}")
    with pytest.raises(BrokerError) as excinfo:
        broker.check()
    assert f"http://127.0.0.1:{free_port}" in str(excinfo.value)
    assert "rabbitmq-plugins enable rabbitmq_management" in str(excinfo.value)
    assert isinstance(excinfo.value.__cause__, requests.RequestException)


@needs_rabbitmq
def test_publish_to_a_branch_or_tree_never_provisioned_raises(broker, scratch):
    tree_id, branch_id = scratch.tree(), str(uuid.uuid4())
    broker.provision_leaf(tree_id, branch_id, *scratch.leaf())
    with pytest.raises(BrokerError, match="provision a leaf of that branch"):
        broker.publish(tree_id, "no-such-branch", aggregation("x"))
    broker.publish(tree_id, branch_id, aggregation("still-works"))  # the failure did not poison the vhost
    with pytest.raises(BrokerError, match="Provision a leaf of that tree"):
        broker.publish(str(uuid.uuid4()), branch_id, aggregation("x"))


@needs_rabbitmq
def test_publish_after_close_raises(broker, scratch):
    tree_id, branch_id = scratch.tree(), str(uuid.uuid4())
    broker.provision_leaf(tree_id, branch_id, *scratch.leaf())
    broker.publish(tree_id, branch_id, aggregation("open"))
    broker.close()
    broker.close()
    with pytest.raises(BrokerError, match="closed"):
        broker.publish(tree_id, branch_id, aggregation("closed"))


# -- validation (no broker needed) -----------------------------------------------------------


@pytest.mark.parametrize(
    "amqp_url, management_url",
    [
        ("http://guest:guest@127.0.0.1:5672/", None),
        ("127.0.0.1:5672", None),
        ("amqp://guest:guest@127.0.0.1:notaport/", None),
        ("amqp://guest:guest@127.0.0.1:5672/", "ftp://127.0.0.1:15672"),
        ("amqp://guest:guest@127.0.0.1:5672/", "127.0.0.1:15672"),
    ],
)
def test_malformed_urls_fail_at_construction_without_leaking_the_password(amqp_url, management_url):
    with pytest.raises(BrokerArgumentError) as excinfo:
        RabbitMQBroker(amqp_url, management_url)
    assert isinstance(excinfo.value, (BranchKeyError, ValueError))
    assert "guest:guest" not in str(excinfo.value)


def test_default_management_url_and_masked_repr():
    broker = RabbitMQBroker("amqp://admin:s3cret@rabbit.example:5672/")
    assert "s3cret" not in repr(broker)
    assert "amqp://admin:***@rabbit.example:5672/" in repr(broker)
    assert "http://rabbit.example:15672" in repr(broker)
    broker.close()


@pytest.mark.parametrize("bad", ["", "amq.reserved", "x" * 256, None])
def test_invalid_names_are_refused_before_any_request(bad):
    broker = RabbitMQBroker("amqp://guest:guest@127.0.0.1:1/", "http://127.0.0.1:1")
    with pytest.raises(BrokerArgumentError, match="branch_id"):
        broker.provision_leaf("tree", bad, "leaf", "token")
    with pytest.raises(BrokerArgumentError, match="branch_id"):
        broker.publish("tree", bad, {})
    with pytest.raises(BrokerArgumentError, match="JSON"):
        broker.publish("tree", "branch", {"not": object()})
