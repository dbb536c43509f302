"""Client behaviour under faults, against a scripted in-process HTTP server (fault injection only:
the real protocol paths are exercised against branchkey-local in tests/integration)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import requests
import pytest

from branchkey_integrations import Client
from branchkey_integrations.core import wire
from branchkey_integrations.core.client import DownloadBuffer
from branchkey_integrations.core.errors import (
    AggregationTimeoutError,
    ApiError,
    ProtocolError,
    AuthenticationError,
    InsufficientStorageError,
    RequestRejectedError,
    RoundInterrupted,
    RunBlockedError,
    ServerError,
    TransportError,
)
from branchkey_integrations.core.federation import Federation
from branchkey_integrations.core.protocol import AGGREGATION_STATUS, RUN_STATUS, Notification

from ..conftest import SHORT_CREDS as CREDS
from ..conftest import wait_until



class Scripted(ThreadingHTTPServer):
    """Answers each path from a list of (status, body) in turn; records every request."""

    daemon_threads = True

    def __init__(self, script, port=0):
        super().__init__(("127.0.0.1", port), Handler)
        self.script = {path: list(answers) for path, answers in script.items()}
        self.requests = []

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.requests.append((self.command, self.path, dict(self.headers), body))
        answers = self.server.script.get(self.path) or [(404, {"error": "no route"})]
        status, payload = answers.pop(0) if len(answers) > 1 else answers[0]
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


RUN_OK = (200, {"data": {"run_status": "start", "run_number": 1}})


@pytest.fixture
def scripted():
    servers = []

    def make(script):
        server = Scripted(script)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()  # quick shutdown
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.shutdown()


def client_for(server, **kwargs):
    return Client(CREDS, host=server.url, transport="none", backoff_factor=0, **kwargs)


def test_retries_transient_5xx_then_succeeds(scripted):
    server = scripted({"/api/v1/run/b": [(503, {"error": "busy"}), (502, {"error": "bad gw"}), RUN_OK]})
    client = client_for(server, max_retries=3)
    assert client.run_status == "start" and client.run_number == 1
    assert len(server.requests) == 3


def test_persistent_5xx_becomes_server_error(scripted):
    server = scripted({"/api/v1/run/b": [(500, {"error": "down"})]})
    with pytest.raises(ServerError, match="retries"):
        client_for(server, max_retries=2)
    assert len(server.requests) == 3  # one try plus two retries


def test_401_is_not_retried_and_is_typed(scripted):
    server = scripted({"/api/v1/run/b": [(401, {"error": "invalid token"})]})
    with pytest.raises(AuthenticationError, match="invalid token") as excinfo:
        client_for(server)
    assert excinfo.value.status_code == 401 and len(server.requests) == 1


def test_unreachable_host_is_a_transport_error_with_the_cause_kept():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TransportError, match=f"127.0.0.1:{port}") as excinfo:
        Client(CREDS, host=f"http://127.0.0.1:{port}", transport="none", max_retries=0)
    # one line a person can act on, the lower-level error kept as detail (not chained: a short traceback)
    assert str(excinfo.value) == (
        f"GET /api/v1/run/b: cannot reach a BranchKey server at http://127.0.0.1:{port} (connection refused). Is "
        "'branchkey-local serve' running there? Start it, or give the client the host that serves your branch.")
    assert isinstance(excinfo.value.detail, requests.exceptions.ConnectionError)
    assert excinfo.value.__cause__ is None and excinfo.value.__suppress_context__


def test_non_json_answer_is_a_protocol_error(scripted):
    server = scripted({"/api/v1/run/b": [(200, b"<html>proxy page</html>")]})
    with pytest.raises(ProtocolError, match="expected JSON") as refused:
        client_for(server)
    assert not isinstance(refused.value, ApiError)  # the answer was 200: not an error status


def test_upload_sends_the_protocol_exactly(scripted, tmp_path):
    server = scripted({"/api/v1/run/b": [RUN_OK], "/api/v1/file/upload": [(201, {"data": {"file_id": "f-1"}})]})
    client = client_for(server)
    path = client.save_weights(tmp_path / "w", 42, [np.ones((2, 2), np.float32)])
    assert path.endswith("w.npz") and wire.decode(path).weighting == 42.0
    assert client.file_upload(path) == "f-1"
    method, route, headers, body = server.requests[-1]
    raw = open(path, "rb").read()
    assert headers["Authorization"] == "Bearer leaf-1:tok" and headers["LEAF"] == "true"
    assert headers["x-bk-file-size"] == str(len(raw))
    assert headers["x-bk-file-digest"] == "sha256=" + base64.b64encode(hashlib.sha256(raw).digest()).decode()
    assert b'name="file"' in body and raw in body
    data_part = body.split(b'name="data"\r\n\r\n')[1].split(b"\r\n--")[0]
    data = json.loads(data_part)
    assert data["leaf_name"] == "site-a"
    assert json.loads(data["metadata"])["file_digest"] == headers["x-bk-file-digest"]


def test_upload_while_paused_is_blocked_before_any_request(scripted):
    server = scripted({"/api/v1/run/b": [(200, {"data": {"run_status": "pause", "run_number": 1}})]})
    client = client_for(server)
    with pytest.raises(RunBlockedError, match="wait_for_run=True"):
        client.upload_weights(1, [np.ones(1)])
    assert [r[1] for r in server.requests] == ["/api/v1/run/b"]


def test_metrics_failure_returns_false_and_logs(scripted, caplog):
    server = scripted({"/api/v1/run/b": [RUN_OK], "/api/v1/performance/analysis": [(400, {"error": "bad mode"})]})
    client = client_for(server)
    assert client.send_performance_metrics("agg", {"acc": 1}, "train") is False
    assert "bad mode" in caplog.text
    with pytest.raises(ValueError, match="mode"):
        client.send_performance_metrics("agg", "{}", "validation")


@pytest.mark.parametrize("bad", ["../x", "..", "a/b", "/etc/passwd", "", "a\\b"])
def test_traversal_file_ids_never_reach_the_network_or_disk(scripted, tmp_path, bad):
    server = scripted({"/api/v1/run/b": [RUN_OK]})
    client = client_for(server, output_dir=tmp_path / "out")
    with pytest.raises(ValueError, match="Invalid file_id"):
        client.file_download(bad)
    assert len(server.requests) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"transport": "mqtt"}, "transport"), ({"host": "app.branchkey.com"}, "host"),
    ({"timeout": 0}, "timeout"), ({"rbmq_port": 0}, "rbmq_port"), ({"max_retries": -1}, "max_retries"),
])
def test_bad_arguments_fail_at_construction_naming_the_value(kwargs, message):
    with pytest.raises(ValueError, match=f"Received: {message}"):
        Client(CREDS, **{"host": "http://127.0.0.1:9", **kwargs})


def test_a_download_buffer_grows_for_a_larger_aggregate_and_is_reused_for_a_smaller_one(scripted):
    small, large = ([np.full(n, float(n), np.float32)] for n in (10, 1000))
    server = scripted({"/api/v1/run/b": [RUN_OK], "/blob": [(200, wire.encode(layers, compression="none"))
                                                            for layers in (small, large, small)]})
    server.script["/api/v1/file/download/a"] = [(200, {"data": {"download_url": server.url + "/blob"}})]
    client, buffer = client_for(server), DownloadBuffer()
    first = client.download_aggregate("a", buffer=buffer).layers[0]
    grown = client.download_aggregate("a", buffer=buffer).layers[0]
    assert buffer.nbytes >= grown.nbytes > first.nbytes and not np.shares_memory(first, grown)
    again = client.download_aggregate("a", buffer=buffer).layers[0]
    np.testing.assert_array_equal(again, small[0])
    assert np.shares_memory(again, grown)  # refilled in place: the larger memory was kept


def test_wait_for_run_start_rechecks_over_rest_and_wakes_on_a_notification(scripted):
    paused, started = (200, {"data": {"run_status": "pause", "run_number": 1}}), (200, {"data": {"run_status": "start",
                                                                                                  "run_number": 2}})
    server = scripted({"/api/v1/run/b": [paused, paused, started]})
    client = client_for(server, run_check_interval_s=0.1)
    client.wait_for_run_start(timeout=10)  # two REST re-reads later
    assert (client.run_status, client.run_number) == ("start", 2) and len(server.requests) == 3

    client._on_notification(Notification(RUN_STATUS, {"run_status": "pause"}))
    notifier = threading.Timer(0.2, client._on_notification, [Notification(RUN_STATUS, {"run_status": "start"})])
    notifier.start()
    client.wait_for_run_start(timeout=10)
    assert client.run_status == "start"
    notifier.join(10)  # it re-reads the run details after 'start': let that finish before pausing again
    client._on_notification(Notification(RUN_STATUS, {"run_status": "pause"}))
    client.options = dataclasses.replace(client.options, run_check_interval_s=30.0)
    with pytest.raises(RunBlockedError, match="still 'pause' after 0.2 s"):
        client.wait_for_run_start(timeout=0.2)


def test_the_queue_holds_the_newest_aggregation_id_as_in_2_7_1(scripted):
    client = client_for(scripted({"/api/v1/run/b": [RUN_OK]}))
    for aggregation_id in ("a-1", "a-2"):
        client._on_notification(Notification(AGGREGATION_STATUS, {"aggregation_id": aggregation_id}))
    assert client.queue.qsize() == 1 and client.get_latest_aggregation_id() == "a-2"
    assert client.get_latest_aggregation_id() is None
    with pytest.raises(AggregationTimeoutError, match="within 0.1 s"):
        client.wait_for_aggregation(0.1)
    threading.Timer(0.1, client._on_notification, [Notification(AGGREGATION_STATUS, {"aggregation_id": "a-3"})]).start()
    assert client.wait_for_aggregation(10) == "a-3"


def test_each_path_checks_the_values_once(scripted, monkeypatch):
    """upload_weights checks finiteness itself; a Federation round checks up front, and the client not again."""
    layers = [np.ones((2, 2), np.float32)]
    server = scripted({"/api/v1/run/b": [RUN_OK], "/api/v1/file/upload": [(201, {"data": {"file_id": "f-1"}})],
                       "/blob": [(200, wire.encode(layers, compression="none"))]})
    server.script["/api/v1/file/download/agg-1"] = [(200, {"data": {"download_url": server.url + "/blob"}})]
    calls = []
    check_finite = wire.check_finite
    monkeypatch.setattr(wire, "check_finite", lambda *args: (calls.append(args), check_finite(*args))[1])

    client_for(server).upload_weights(1, layers)
    assert len(calls) == 1

    calls.clear()
    federation = Federation(CREDS, server.url, transport="none", timeout=30, client_options={"backoff_factor": 0})
    federation.connect()
    uploads = len([r for r in server.requests if r[1] == "/api/v1/file/upload"])
    uploaded = lambda: len([r for r in server.requests if r[1] == "/api/v1/file/upload"]) > uploads  # noqa: E731
    feeder = threading.Thread(target=lambda: (wait_until(uploaded, 10, "the upload"),
                                              federation.client.waiter.add_aggregation("agg-1")), daemon=True)
    feeder.start()
    try:
        result = federation.run_round(layers, 3.0, names=["w"])
    finally:
        federation.close()
    assert result.aggregation_id == "agg-1" and len(calls) == 1 and calls[0][1] == ["w"]


def test_507_is_not_retried_and_its_message_reaches_the_user(scripted):
    server = scripted({"/api/v1/run/b": [RUN_OK], "/api/v1/file/upload": [
        (507, {"error": "The server is out of disk space: free space under its data directory, then upload again."})]})
    client = client_for(server, max_retries=3)
    with pytest.raises(InsufficientStorageError, match="out of disk space: free space") as refused:
        client.upload_weights(1.0, [np.zeros(4, np.float32)])
    assert refused.value.status_code == 507 and isinstance(refused.value, ServerError)
    assert [path for _, path, _, _ in server.requests].count("/api/v1/file/upload") == 1  # the body went once


def test_a_platform_without_the_round_view_is_asked_once(scripted, caplog):
    server = scripted({"/api/v1/run/b": [RUN_OK]})  # every other path answers 404, as the hosted platform does
    client = client_for(server)
    with caplog.at_level("INFO", logger="branchkey_integrations"):
        assert client.get_round() is None and client.get_round() is None
    assert [path for _, path, _, _ in server.requests].count("/api/v1/round/b") == 1
    assert "offers no round progress" in caplog.text


def test_the_round_named_by_the_upload_answer_is_the_one_wait_for_aggregation_takes(scripted):
    server = scripted({"/api/v1/run/b": [RUN_OK], "/api/v1/file/upload": [
        (201, {"data": {"file_id": "f-1", "run_number": 1, "round_index": 4}})]})
    client = client_for(server)
    client.upload_weights(1.0, [np.zeros(4, np.float32)])
    client._on_notification(Notification(AGGREGATION_STATUS, {"aggregation_id": "late-3", "run_number": 1,
                                                               "round_index": 3}))
    with pytest.raises(AggregationTimeoutError):
        client.wait_for_aggregation(timeout=0.2)  # round 3's late aggregate is not this upload's
    threading.Timer(0.1, client._on_notification, [Notification(
        AGGREGATION_STATUS, {"aggregation_id": "agg-4", "run_number": 1, "round_index": 4})]).start()
    assert client.wait_for_aggregation(timeout=30) == "agg-4"


def test_the_round_view_is_asked_once_without_retries(scripted):
    server = scripted({"/api/v1/run/b": [RUN_OK], "/api/v1/round/b": [(503, {"error": "restarting"})]})
    client = client_for(server, max_retries=3)
    with pytest.raises(ServerError, match="restarting") as failed:
        client.get_round()  # a look that the waits repeat every few seconds: never retried, never long
    assert "retries" not in str(failed.value)
    assert [path for _, path, _, _ in server.requests].count("/api/v1/round/b") == 1


# ------------------------------------------------------------------ a platform that is away for a while
def restartable(port: int, script):
    """A scripted server on ``port`` (a restart of one that stopped there)."""
    server = Scripted(script, port)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


def test_retrying_until_rides_out_a_restart_and_reports_each_try(scripted):
    script = {"/api/v1/run/b": [RUN_OK], "/api/v1/config/branch/b": [(200, {"data": {"branch": {}}})]}
    first = scripted(script)
    port = first.server_address[1]
    client = client_for(first, max_retries=1)
    first.shutdown()
    first.server_close()  # the port refuses connections now
    with pytest.raises(TransportError, match="connection refused"):
        client.get_branch_config()  # without patience: the session's few quick retries, then an error
    reports, restarted = [], []

    def on_away(away):
        reports.append(away)
        if not restarted:  # the platform comes back after the first failure was reported
            restarted.append(restartable(port, script))

    try:
        with client.retrying_until(time.monotonic() + 30, on_away=on_away):
            assert client.get_branch_config() == {"branch": {}}
    finally:
        for server in restarted:
            server.shutdown()
    assert reports[0].reason == "connection refused" and reports[0].call == "GET /api/v1/config/branch/b"
    assert 0 < reports[0].left_s <= 30 and reports[-1].back


def test_retrying_until_ends_at_its_deadline_or_an_interrupt(scripted):
    server = scripted({"/api/v1/run/b": [RUN_OK], "/api/v1/config/branch/b": [(503, {"error": "recovering"})]})
    client = client_for(server, max_retries=0)
    started = time.monotonic()
    with client.retrying_until(time.monotonic() + 1.0):
        with pytest.raises(ServerError, match=r"recovering \(tried again for \d s, until the round's deadline\)"):
            client.get_branch_config()  # 503: away (branchkey-local recovering, a proxy before a restart)
    assert 1.0 <= time.monotonic() - started < 4
    assert [path for _, path, _, _ in server.requests].count("/api/v1/config/branch/b") > 2
    with client.retrying_until(None, on_away=lambda away: client.waiter.interrupt("SIGTERM")):
        with pytest.raises(RoundInterrupted, match="SIGTERM"):
            client.get_branch_config()  # no deadline: only the answer or an interrupt ends it
    client.waiter.clear_interrupt()
    server.script["/api/v1/round/b"] = [(503, {"error": "recovering"})]
    server.script["/api/v1/file/upload"] = [(409, {"error": "run is paused"})]
    started = time.monotonic()
    with client.retrying_until(time.monotonic() + 30):
        with pytest.raises(ServerError):
            client.get_round()  # a look sent once is never prolonged
        with pytest.raises(RequestRejectedError):
            client.upload_weights(1.0, [np.zeros(4, np.float32)])  # a refusal is not "away": raised at once
    assert time.monotonic() - started < 5
