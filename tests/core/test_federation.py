"""Federation, the framework-free round logic: checks without a server, rounds against a real branchkey-local
running in-process (real HTTP and WebSocket, no subprocess, so these tests stay in the fast lane)."""

from __future__ import annotations

import logging
import pickle
import threading

import numpy as np
import pytest

from branchkey_integrations.core.errors import AggregationTimeoutError, ArchiveError
from branchkey_integrations.core.errors import AggregateMismatchError, RunStopped
from branchkey_integrations.core.federation import Federation
from branchkey_integrations.core.wire import LayerSpec

from ..conftest import CREDS, wait_until

NAMES = ["encoder.weight", "encoder.bias"]


def layers_for(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32)]


def weighted_mean(uploads, weights):
    total = sum(weights)
    return [sum(w * u[i].astype(np.float64) for u, w in zip(uploads, weights)) / total for i in range(len(uploads[0]))]


# ------------------------------------------------------------------------------------------- no server
@pytest.mark.parametrize("kwargs, message", [
    ({"timeout": 0}, "Expected timeout to be a number of seconds > 0 or None (wait forever). Received: timeout=0"),
    ({"timeout": float("inf")}, "Received: timeout=inf"),
    ({"on_timeout": "ignore"}, "Expected on_timeout in ('raise', 'continue'). Received: on_timeout='ignore'"),
    ({"log_every_s": -1}, "Received: log_every_s=-1"),
    ({"check_every_s": 0}, "Expected check_every_s to be a number of seconds > 0. Received: check_every_s=0"),
    ({"on_progress": "print"}, "Expected on_progress to be a function of one WaitProgress. Received: 'print'"),
    ({"client_options": {"host": "x"}}, "without 'host'"),
])
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError) as info:
        Federation(CREDS, "http://127.0.0.1:1", **kwargs)
    assert message in str(info.value)


def test_construction_does_not_connect_and_pickles_without_client():
    federation = Federation(CREDS, "http://127.0.0.1:1", timeout=None)
    assert not federation.connected and federation.timeout is None
    with pytest.raises(RuntimeError, match="call connect"):
        federation.client  # noqa: B018
    federation._client = object()  # a live client must never travel in a pickle
    clone = pickle.loads(pickle.dumps(federation))
    assert not clone.connected and clone.credentials == federation.credentials


def test_state_dict_round_trip_reads_old_state_with_defaults():
    federation = Federation(CREDS, "http://127.0.0.1:1")
    federation.load_state_dict({"round": 7, "last_aggregation_id": "abc"})
    assert federation.state_dict() == {"round": 7, "last_aggregation_id": "abc"}
    federation.load_state_dict({})
    assert federation.state_dict() == {"round": 0, "last_aggregation_id": None}


def test_check_aggregate_casts_back_to_the_upload_dtype():
    expected = [LayerSpec((2,), np.dtype(np.float32)), LayerSpec((), np.dtype(np.int64))]
    checked = Federation.check_aggregate([np.array([0.5, 1.5]), np.array(3, np.int32)], expected, ["w", "steps"])
    assert [a.dtype for a in checked] == [np.float32, np.int64]
    np.testing.assert_array_equal(checked[0], [0.5, 1.5])


@pytest.mark.parametrize("received, message", [
    ([np.zeros((3, 4), np.float32)], "The aggregate has 1 layers but the local model has 2"),
    ([np.zeros((4, 3), np.float32), np.zeros(4, np.float32)], "encoder.weight: the aggregate has shape (4, 3)"),
    ([np.zeros((3, 4), np.float32), np.zeros(4, np.int32)], "encoder.bias: the aggregate has dtype int32"),
    ([np.zeros((3, 4), np.float32), np.array([0, np.nan, 0, 0], np.float32)], "encoder.bias: the aggregate holds NaN"),
    ([np.full((3, 4), np.inf, np.float32), np.zeros(4, np.float32)], "encoder.weight: the aggregate holds NaN or inf"),
])
def test_check_aggregate_names_the_parameter_that_does_not_fit(received, message):
    expected = [LayerSpec.of(a) for a in layers_for(0)]
    with pytest.raises(AggregateMismatchError) as info:
        Federation.check_aggregate(received, expected, NAMES)
    assert message in str(info.value)
    assert isinstance(info.value, ArchiveError)


# ---------------------------------------------------------------------------------- real server
@pytest.fixture
def federations():
    made: list[Federation] = []
    yield made
    for federation in made:
        federation.close()


def connect(credentials, server, made, **kwargs) -> Federation:
    kwargs = {"transport": "websocket", "log_every_s": 0.2, **kwargs}
    federation = Federation(credentials, server.url, **kwargs)
    federation.connect()
    made.append(federation)
    return federation


def in_thread(fn, *args, **kwargs):
    """Run ``fn`` in a thread; the returned dict gets 'result' or 'error' and the thread is in 'thread'."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    box["thread"] = threading.Thread(target=target, daemon=True)
    box["thread"].start()
    return box


def set_run(server, federation, status):
    response = server.admin("POST", f"/admin/v1/branches/{federation.client.branch_id}/run", json={"run_status": status})
    assert response.status_code == 200, response.text


def test_two_leaves_get_the_weighted_average_and_count_rounds(inprocess_server, federations):
    server, credentials = inprocess_server(2)
    a, b = (connect(c, server, federations) for c in credentials)
    for number in (1, 2):
        uploads = [layers_for(10 * number), layers_for(10 * number + 1)]
        box = in_thread(a.run_round, uploads[0], 30, names=NAMES)
        result_b = b.run_round(uploads[1], 10, names=NAMES)
        box["thread"].join(30)
        result_a = box["result"]
        assert result_a.aggregation_id == result_b.aggregation_id and result_a.round == result_b.round == number
        for result in (result_a, result_b):
            assert [x.dtype for x in result.layers] == [np.float32, np.float32]
            for got, want in zip(result.layers, weighted_mean(uploads, [30, 10])):
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        assert result_a.upload_mb == pytest.approx(16 * 4 / 1e6) and result_a.wait_s >= 0
    assert a.state_dict() == {"round": 2, "last_aggregation_id": result_a.aggregation_id, "last_run_number": 1,
                              "last_round_index": 1}
    assert (result_a.run_number, result_a.round_index) == (1, 1)
    assert a.send_metrics({"loss": 0.5}) is True


def test_a_stale_aggregate_is_drained_before_the_upload(inprocess_server, federations, caplog):
    """An aggregate that reached the leaf before its upload is never taken as this round's."""
    server, credentials = inprocess_server(2)
    a, b = (connect(c, server, federations) for c in credentials)
    a.client.upload_weights(1.0, layers_for(0))  # a round outside run_round: its id waits, unread, in a's queue
    b.client.upload_weights(1.0, layers_for(1))
    stale = b.client.wait_for_aggregation(15)
    wait_until(lambda: a.client.queue.qsize() == 1, 15, "the stale notification to reach leaf a")

    uploads = [layers_for(2), layers_for(3)]
    with caplog.at_level(logging.INFO, logger="branchkey_integrations.core.federation"):
        box = in_thread(a.run_round, uploads[0], 1.0)
        wait_until(lambda: "Ignoring aggregate" in caplog.text, 15, "leaf a to drain the stale aggregate")
        assert box["thread"].is_alive(), "run_round took the stale aggregate"
        b.run_round(uploads[1], 3.0)
        box["thread"].join(30)
    result = box["result"]
    assert result.aggregation_id != stale and result.round == 1
    for got, want in zip(result.layers, weighted_mean(uploads, [1.0, 3.0])):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_aggregate_that_does_not_fit_raises_and_keeps_the_round(inprocess_server, federations):
    server, credentials = inprocess_server(1)
    (leaf,) = [connect(c, server, federations) for c in credentials]
    expected = [LayerSpec((3, 4), np.dtype(np.float32)), LayerSpec((5,), np.dtype(np.float32))]
    with pytest.raises(AggregateMismatchError, match=r"encoder.bias: the aggregate has shape \(4,\), the local model \(5,\)"):
        leaf.run_round(layers_for(0), 1.0, expected, NAMES)
    assert leaf.state_dict() == {"round": 0, "last_aggregation_id": None}


def test_non_finite_local_layers_are_refused_before_upload(inprocess_server, federations):
    server, credentials = inprocess_server(1)
    (leaf,) = [connect(c, server, federations) for c in credentials]
    layers = layers_for(0)
    layers[1][2] = np.nan
    with pytest.raises(ArchiveError, match="encoder.bias holds 1 non-finite"):
        leaf.run_round(layers, 1.0, names=NAMES)


def test_timeout_raises_or_continues(inprocess_server, federations):
    server, credentials = inprocess_server(2)  # the second leaf never uploads
    strict = connect(credentials[0], server, federations, timeout=0.5)
    with pytest.raises(AggregationTimeoutError, match="Round 1 of branch .*: still waiting for the aggregate after timeout=0.5 s"):
        strict.run_round(layers_for(0), 1.0)
    lenient = connect(credentials[0], server, federations, timeout=0.5, on_timeout="continue")
    result = lenient.run_round(layers_for(0), 1.0)
    assert result.timed_out and result.aggregation_id is None and result.round == 0 and result.wait_s > 0
    assert lenient.state_dict()["round"] == 0


def test_pause_waits_then_start_completes_the_round(inprocess_server, federations, caplog):
    server, credentials = inprocess_server(1)
    (leaf,) = [connect(c, server, federations) for c in credentials]
    set_run(server, leaf, "pause")
    wait_until(lambda: leaf.client.run_status == "pause", 10, "the leaf to see the pause")
    with caplog.at_level(logging.INFO, logger="branchkey_integrations"):
        box = in_thread(leaf.run_round, layers_for(0), 1.0)
        wait_until(lambda: "waiting for the run to start for 0 s (run is 'pause'); 0 of 1 uploads" in caplog.text, 10,
                   "the pause to be logged")
        assert box["thread"].is_alive()
        set_run(server, leaf, "start")
        box["thread"].join(30)
    assert box["result"].round == 1


def test_stop_while_waiting_for_the_aggregate_raises_run_stopped(inprocess_server, federations, caplog):
    server, credentials = inprocess_server(2)
    leaf = connect(credentials[0], server, federations)
    with caplog.at_level(logging.INFO, logger="branchkey_integrations"):
        box = in_thread(leaf.run_round, layers_for(0), 1.0)
        wait_until(lambda: "Uploaded" in caplog.text, 10, "the upload")
        set_run(server, leaf, "stop")
        box["thread"].join(15)
    assert isinstance(box.get("error"), RunStopped), box
    assert "stopped during round 1" in str(box["error"])
    with pytest.raises(RunStopped, match="stopped before round 1"):
        leaf.run_round(layers_for(0), 1.0)


def test_an_upload_says_what_it_uploaded_into_which_run_and_round(inprocess_server, federations, tmp_path):
    """Client.upload_arrays returns an UploadReceipt (Federation reads where its upload went from it, not from a
    private); upload_weights and file_upload still return the file id, as 2.7.1's do, and last_upload holds it."""
    server, credentials = inprocess_server(2)
    a, b = (connect(c, server, federations) for c in credentials)
    client = a.client
    file_id = client.upload_weights(5, layers_for(1))
    receipt = client.last_upload
    assert isinstance(file_id, str) and receipt is not None and receipt.file_id == file_id
    assert receipt.round == (receipt.run_number, receipt.round_index) == (1, 0) and receipt.size > 16 * 4
    path = client.save_weights(tmp_path / "w", 5, layers_for(2))
    assert client.file_upload(path) == client.last_upload.file_id and client.last_upload.round == (1, 0)
    again = client.upload_arrays(5, layers_for(3))  # the leaf's upload of the round, replaced
    assert again is client.last_upload and again.round == (1, 0)
    result = b.run_round(layers_for(4), 5)
    assert (result.run_number, result.round_index) == (1, 0)
    assert b.client.last_upload.round == (1, 0) and b.client.last_upload.file_id != again.file_id
