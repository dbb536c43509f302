"""A model's round and an analytics round never take each other's aggregate: an ``aggregation_status`` that says
``"kind": "federated_analytics"`` reaches only analytics waits (a real in-process branchkey-local and its real
WebSocket; the analytics notification is published through the server's own notifier)."""

from __future__ import annotations

import asyncio

import numpy as np

from branchkey_integrations.core.protocol import KIND_FEDERATED_ANALYTICS, aggregation_message

from ..conftest import wait_until
from .test_federation import connect, federations, in_thread, layers_for, weighted_mean  # noqa: F401 - fixtures


def publish(server, credentials, message) -> None:
    """Send ``message`` to the branch's leaves as the server sends its own notifications (to the leaves only: the
    dashboard's event hub is not what is tested here)."""
    notifier = server.server.notifier
    listeners, notifier.listeners = notifier.listeners, []
    try:
        coroutine = notifier.publish(credentials["tree_id"], credentials["branch_id"], message)
        asyncio.run_coroutine_threadsafe(coroutine, server.loop).result(10)
    finally:
        notifier.listeners = listeners


def analytics_message(aggregation_id: str, run_number: int, round_index: int) -> dict:
    message = aggregation_message(aggregation_id, run_number, round_index)
    message["body"]["kind"] = KIND_FEDERATED_ANALYTICS
    return message


def test_a_models_round_ignores_an_analytics_aggregate_of_the_same_run_and_round_index(inprocess_server, federations):
    server, credentials = inprocess_server(2)
    a, b = (connect(c, server, federations) for c in credentials)
    uploads = [layers_for(1), layers_for(2)]
    box = in_thread(a.run_round, uploads[0], 1.0)
    wait_until(lambda: a.client.last_upload is not None, 15, "leaf a's upload")
    assert a.client.last_upload.round == (1, 0)
    publish(server, credentials[0], analytics_message("analytics-agg-0", 1, 0))  # same (run, index): another kind
    publish(server, credentials[0], {"message_type": "aggregation_status",
                                     "body": {"aggregation_id": "future-kind", "kind": "federated_other"}})
    wait_until(lambda: a.client.waiter.received_of(KIND_FEDERATED_ANALYTICS) == 1, 15, "the analytics notification")
    assert box["thread"].is_alive() and a.client.queue.empty(), "the model's round took an analytics aggregate"
    assert a.client.waiter.received == 0  # nor was the unknown kind counted as a model's
    b.run_round(uploads[1], 3.0)
    box["thread"].join(30)
    result = box["result"]
    assert result.aggregation_id not in ("analytics-agg-0", "future-kind") and (result.run_number, result.round_index) == (1, 0)
    for got, want in zip(result.layers, weighted_mean(uploads, [1.0, 3.0])):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_the_official_clients_wait_for_aggregation_ignores_analytics_aggregates_too(inprocess_server, federations):
    server, credentials = inprocess_server(1)
    (leaf,) = [connect(c, server, federations) for c in credentials]
    publish(server, credentials[0], analytics_message("analytics-agg-0", 1, 0))
    wait_until(lambda: leaf.client.waiter.received_of(KIND_FEDERATED_ANALYTICS) == 1, 15, "the analytics notification")
    assert leaf.client.get_latest_aggregation_id() is None
    leaf.client.upload_weights(1.0, layers_for(0))
    aggregation_id = leaf.client.wait_for_aggregation(15)
    assert aggregation_id != "analytics-agg-0"
    assert leaf.client.download_aggregate(aggregation_id).kind == "federated_learning"
