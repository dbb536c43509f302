"""Our Client against a real branchkey-local: both transports, mixed branches, run control,
auth, path safety and a server restart in the middle of a round."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import requests

from branchkey_integrations import Client
from branchkey_integrations.core import wire
from branchkey_integrations.core.client import DownloadBuffer
from branchkey_integrations.core.errors import (
    AuthenticationError,
    NotFoundError,
    PermissionDeniedError,
    RunBlockedError,
)

from ..conftest import LocalServer, init_branch, wait_until
from .test_official_clients import weighted_mean


def layers_for(seed: int):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in [(4, 3), (3,), (2, 5)] + [(2,)] * 9]


def connect(creds, server, tmp_path, transport, **kwargs):
    client = Client(creds, host=server.url, transport=transport, output_dir=tmp_path / f"out-{creds.stem}",
                    run_check_interval_s=kwargs.pop("run_check_interval_s", 0.5), **kwargs)
    if client.notifications is not None:
        assert client.notifications.wait_connected(15), f"{transport} never connected:\n{server.log()}"
    return client


def federate_round(clients, seed, timeout=30):
    """Every client uploads, waits for the aggregate, downloads it; returns (expected, aggregates)."""
    uploads = [layers_for(seed + i) for i in range(len(clients))]
    weights = [float(10 * (i + 1)) for i in range(len(clients))]
    for client, layers, weight in zip(clients, uploads, weights):
        client.upload_weights(weight, layers)
    ids = [client.wait_for_aggregation(timeout) for client in clients]
    assert len(set(ids)) == 1
    return weighted_mean(uploads, weights), [client.download_aggregate(i) for client, i in zip(clients, ids)], ids[0]


def assert_aggregate(expected, archive):
    assert archive.weighting is None and len(archive.layers) == len(expected)
    for want, got in zip(expected, archive.layers):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.fixture
def clients():
    made = []
    yield made
    for client in made:
        client.close()


@pytest.mark.parametrize("transport", ["websocket", pytest.param("amqp", marks=pytest.mark.amqp)])
def test_rounds_over_each_transport(transport, request, server_factory, tmp_path, clients):
    if transport == "amqp":
        request.getfixturevalue("rabbitmq")
    server, credentials = server_factory(2, amqp=transport == "amqp")
    clients += [connect(c, server, tmp_path, transport) for c in credentials]
    assert [c.transport for c in clients] == [transport] * 2
    assert clients[0].run_status == "start" and clients[0].run_number == 1
    for round_index in range(2):
        expected, aggregates, aggregation_id = federate_round(clients, seed=10 * round_index)
        for archive in aggregates:
            assert_aggregate(expected, archive)
        path = clients[0].file_download(aggregation_id)
        assert path == str(tmp_path / f"out-{credentials[0].stem}" / f"{aggregation_id}.npz")
        assert_aggregate(expected, wire.decode(path))
        assert clients[1].send_performance_metrics(aggregation_id, {"accuracy": 0.9}, "test") is True
    config = clients[0].get_branch_config()
    assert config["branch"]["id"] == clients[0].branch_id


def test_a_kept_download_buffer_is_reused_round_after_round(server_factory, tmp_path, clients):
    server, credentials = server_factory(1)
    clients.append(connect(credentials[0], server, tmp_path, "websocket"))
    client, buffer = clients[0], DownloadBuffer()
    previous = None
    for round_index in range(3):
        uploads = layers_for(round_index)
        client.upload_weights(5.0, uploads)
        archive = client.download_aggregate(client.wait_for_aggregation(30), buffer=buffer)
        assert_aggregate(uploads, archive)  # one leaf: the aggregate is its upload
        if previous is not None:  # the same memory, refilled: the previous round's layers now hold this one
            assert np.shares_memory(archive.layers[0], previous[0])
            np.testing.assert_array_equal(previous[0], archive.layers[0])
        previous = archive.layers


@pytest.mark.amqp
def test_mixed_branch_one_leaf_on_amqp_one_on_websocket(rabbitmq, server_factory, tmp_path, clients):
    server, credentials = server_factory(2, amqp=True)
    clients += [connect(credentials[0], server, tmp_path, "amqp"), connect(credentials[1], server, tmp_path, "websocket")]
    expected, aggregates, _ = federate_round(clients, seed=5)
    for archive in aggregates:
        assert_aggregate(expected, archive)


def test_auto_transport_picks_websocket_on_branchkey_local_and_says_so(server_factory, tmp_path, clients, caplog):
    server, credentials = server_factory(1)
    with caplog.at_level(logging.INFO, logger="branchkey_integrations"):
        clients.append(connect(credentials[0], server, tmp_path, "auto"))
    assert clients[0].transport == "websocket"
    assert "transport=auto picked WebSocket" in caplog.text


@pytest.mark.parametrize("transport", ["websocket", pytest.param("amqp", marks=pytest.mark.amqp)])
def test_pause_and_stop_reach_clients_and_block_uploads(transport, request, server_factory, tmp_path, clients):
    if transport == "amqp":
        request.getfixturevalue("rabbitmq")
    server, credentials = server_factory(2, amqp=transport == "amqp")
    eager = connect(credentials[0], server, tmp_path, transport)
    patient = connect(credentials[1], server, tmp_path, transport, wait_for_run=True)
    clients += [eager, patient]
    branch = eager.branch_id

    server.set_run(branch, "pause")
    wait_until(lambda: eager.run_status == patient.run_status == "pause", 10, "run_status pause on both leaves")
    with pytest.raises(RunBlockedError, match="run is blocked"):
        eager.upload_weights(1.0, layers_for(0))
    # the server refuses too, whatever a client believes
    raw = requests.post(server.url + "/api/v1/file/upload", headers={"Authorization": f"Bearer {eager.leaf_id}:{eager.credentials.session_token}"},
                        files={"file": ("w.npz", wire.encode(layers_for(0), 1.0))},
                        data={"data": json.dumps({"leaf_name": "x", "metadata": "{}"})}, timeout=10)
    assert raw.status_code == 409 and "pause" in raw.json()["error"]

    result = {}
    waiter = threading.Thread(target=lambda: result.setdefault("id", patient.upload_weights(2.0, layers_for(1))))
    waiter.start()
    waiter.join(1.0)
    assert waiter.is_alive(), "wait_for_run=True must wait while paused"
    server.set_run(branch, "start")
    waiter.join(15)
    assert "id" in result and eager.run_number == 1

    server.set_run(branch, "stop")
    wait_until(lambda: eager.run_status == "stop", 10, "run_status stop")
    server.set_run(branch, "start")
    wait_until(lambda: eager.run_number == 2 and patient.run_number == 2, 10, "run number 2 after stop/start")


@pytest.mark.slow
def test_auth_and_path_safety(tmp_path, clients):
    data_dir = tmp_path / "data"
    credentials = init_branch(data_dir, 2)
    (stranger_file,) = init_branch(data_dir, 1, creds_dir=tmp_path / "other-branch")
    server = LocalServer(data_dir).start()
    try:
        creds = json.loads(credentials[0].read_text())
        with pytest.raises(AuthenticationError):
            Client({**creds, "session_token": "wrong"}, host=server.url, transport="none")
        with pytest.raises(AuthenticationError):
            Client({**creds, "id": "00000000-0000-0000-0000-000000000000"}, host=server.url, transport="none")

        a, b = (connect(c, server, tmp_path, "websocket") for c in credentials)
        stranger = connect(stranger_file, server, tmp_path, "none")
        clients += [a, b, stranger]
        assert stranger.branch_id != a.branch_id
        _, _, aggregation_id = federate_round([a, b], seed=3)

        with pytest.raises((NotFoundError, PermissionDeniedError)):
            stranger.download_aggregate(aggregation_id)
        with pytest.raises((NotFoundError, PermissionDeniedError)):
            stranger._http.request("GET", f"/api/v1/run/{a.branch_id}")  # another branch's run details

        output = Path(a.output_dir)
        for bad in ["../victim", "..", "a/../../victim", "/etc/passwd", "x/y", ""]:
            with pytest.raises(ValueError, match="Invalid file_id"):
                a.file_download(bad)
        assert not (tmp_path / "victim.npz").exists() and not output.exists()
        raw = requests.get(server.url + "/api/v1/file/download/..%2F..%2Fetc%2Fpasswd",
                           headers={"Authorization": f"Bearer {a.leaf_id}:{a.credentials.session_token}"}, timeout=10)
        assert raw.status_code in (400, 404) and "error" in raw.json()
        with pytest.raises(NotFoundError):
            a.download_aggregate("0" * 32)
    finally:
        server.stop()


@pytest.mark.slow
def test_server_restart_mid_round_loses_nothing(tmp_path, clients, request):
    """kill -9 between the uploads of a round: the accepted upload survives, the round completes,
    and the notification reaches a WebSocket client that had to reconnect."""
    data_dir = tmp_path / "data"
    credentials = init_branch(data_dir, 2)
    server = LocalServer(data_dir).start()
    request.addfinalizer(server.stop)
    first, second = (connect(c, server, tmp_path, "websocket") for c in credentials)
    clients += [first, second]
    uploads = [layers_for(40), layers_for(41)]
    first.upload_weights(30.0, uploads[0])

    server.kill()
    wait_until(lambda: not first.notifications.connected.is_set(), 10, "the client to notice the dead server")
    server.start()
    wait_until(lambda: first.notifications.connected.is_set() and second.notifications.connected.is_set(), 30,
               "both clients to reconnect")

    second.upload_weights(10.0, uploads[1])
    ids = [c.wait_for_aggregation(30) for c in (first, second)]
    assert ids[0] == ids[1]
    assert_aggregate(weighted_mean(uploads, [30.0, 10.0]), first.download_aggregate(ids[0]))


@pytest.mark.slow
def test_a_leaf_rides_out_a_restart_longer_than_its_quick_retries(tmp_path, request):
    """kill -9 while one leaf waits for the aggregate, before the other uploads: the second leaf's upload finds
    the port closed, is tried again until its round's timeout (its wait line says so), and lands once the server
    is back on the same port; both leaves complete the round with the right aggregate."""
    from ..core.test_federation import in_thread
    from branchkey_integrations.core.federation import Federation

    data_dir = tmp_path / "data"
    credentials = init_branch(data_dir, 2)
    server = LocalServer(data_dir).start()
    request.addfinalizer(server.stop)
    lines: dict[str, list] = {"first": [], "second": []}
    first, second = (Federation(c, server.url, transport="websocket", timeout=120, on_progress=lines[name].append,
                                client_options={"max_retries": 1})
                     for c, name in zip(credentials, lines))
    for leaf in (first, second):
        leaf.connect()
        request.addfinalizer(leaf.close)
    uploads = [layers_for(50), layers_for(51)]
    waiting = in_thread(first.run_round, uploads[0], 30.0)
    wait_until(lambda: any(p.waiting_for == "aggregate" for p in lines["first"]), 30, "the first leaf to upload")

    server.kill()
    uploading = in_thread(second.run_round, uploads[1], 10.0)
    wait_until(lambda: "error" in uploading or any(p.waiting_for == "server" for p in lines["second"]), 30,
               "the second leaf to find the server away")
    server.start()  # the same port; the quick retries (max_retries=1) are long over by now

    results = []
    for box in (uploading, waiting):
        box["thread"].join(60)
        assert "error" not in box, box.get("error")
        results.append(box["result"])
    away = next(p for p in lines["second"] if p.waiting_for == "server")
    assert "POST /api/v1/file/upload: connection refused" in away.message
    assert "trying again until the round's timeout" in away.message
    assert results[0].aggregation_id == results[1].aggregation_id
    for got, want in zip(results[0].layers, weighted_mean(uploads, [30.0, 10.0])):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
