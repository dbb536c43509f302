"""Waiting leaves against a ``branchkey-local serve`` subprocess that is killed with -9: a notification missed
while the server was away costs seconds (the leaves' round-view safety net), not the timeout; and a leaf with
``on_timeout="continue"`` trains through an outage and rejoins (issue 11's done-when tests for the leaf side)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from branchkey_integrations import Client
from branchkey_integrations.core.federation import Federation

from ..conftest import LocalServer, init_branch, wait_until
from .test_official_clients import weighted_mean

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = [(3, 4), (3,), (2, 3), (2,)]  # the trainable parameters of tests/lightning/models.py's TinyModel


def layers_for(seed: int, size: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((size, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32)]


def timed(fn, *args, **kwargs) -> dict:
    """Run ``fn`` in a thread; the dict gets 'result' or 'error', and 'at' (time.monotonic() when it returned)."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc
        box["at"] = time.monotonic()

    box["thread"] = threading.Thread(target=target, daemon=True)
    box["thread"].start()
    return box


def stay_down(server: LocalServer, seconds: float, *leaves) -> None:
    """kill -9 the server and keep it down ``seconds`` (the outage under test), until each leaf noticed."""
    server.kill()
    down_since = time.monotonic()
    wait_until(lambda: time.monotonic() - down_since >= seconds
               and not any(leaf.notifications.connected.is_set() for leaf in leaves),
               seconds + 30, f"{seconds} s of outage noticed by every leaf")


@pytest.fixture
def started(tmp_path: Path, request):
    """``started(leaves, *init_args)``: a server subprocess and its credentials files; stopped at the end."""
    closers: list = []

    def make(leaves: int, *init_args: str):
        data_dir = tmp_path / "data"
        credentials = init_branch(data_dir, leaves, *init_args)
        server = LocalServer(data_dir).start()
        closers.append(server.stop)
        return server, credentials

    yield make, closers
    for close in reversed(closers):
        close()


def test_kill_9_with_two_of_three_uploads_both_waiting_leaves_get_the_aggregate_within_10_s(started, tmp_path):
    (make, closers) = started
    server, credentials = make(3)
    waiting_client = Client(credentials[0], host=server.url, transport="websocket", output_dir=tmp_path / "out")
    closers.append(waiting_client.close)
    federation = Federation(credentials[1], server.url, transport="websocket", timeout=120, log_every_s=5)
    closers.append(federation.close)
    federation.connect()
    uploads, weights = [layers_for(1), layers_for(2), layers_for(3)], [30.0, 20.0, 10.0]

    waiting_client.upload_weights(weights[0], uploads[0])
    client_box = timed(waiting_client.wait_for_aggregation, 120)
    federation_box = timed(federation.run_round, uploads[1], weights[1])
    wait_until(lambda: len(waiting_client.get_round().uploaded) == 2, 30, "2 of 3 uploads accepted")

    stay_down(server, 3.0, waiting_client, federation.client)
    server.start()
    third = Client(credentials[2], host=server.url, transport="none")
    closers.append(third.close)
    third.upload_weights(weights[2], uploads[2])
    last_upload = time.monotonic()

    for box in (client_box, federation_box):
        box["thread"].join(30)
    assert "error" not in client_box and "error" not in federation_box, (client_box, federation_box, server.log())
    result = federation_box["result"]
    assert client_box["result"] == result.aggregation_id
    assert client_box["at"] - last_upload < 10 and federation_box["at"] - last_upload < 10, (
        client_box["at"] - last_upload, federation_box["at"] - last_upload)
    for got, want in zip(result.layers, weighted_mean(uploads, weights)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_kill_9_with_two_of_three_uploads_a_client_and_a_lightning_leaf_get_the_aggregate_within_10_s(
        started, tmp_path):
    (make, closers) = started
    server, credentials = make(3)
    waiting_client = Client(credentials[0], host=server.url, transport="websocket")
    closers.append(waiting_client.close)
    out, log_path = tmp_path / "lightning", tmp_path / "lightning.log"
    with open(log_path, "w") as log:  # one epoch, one round, with BranchKeyCallback (timeout 60 s)
        leaf = subprocess.Popen([sys.executable, "-m", "tests.lightning.leaf", str(credentials[1]), server.url,
                                 str(out), "16", "1", "1"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    closers.append(lambda: leaf.poll() is None and leaf.kill())
    rng = np.random.default_rng(5)
    waiting_client.upload_weights(30.0, [rng.standard_normal(shape).astype(np.float32) for shape in TINY_MODEL])
    client_box = timed(waiting_client.wait_for_aggregation, 120)
    wait_until(lambda: len(waiting_client.get_round().uploaded) == 2, 120, "the Lightning leaf's upload")

    stay_down(server, 3.0, waiting_client)
    server.start()
    third = Client(credentials[2], host=server.url, transport="none")
    closers.append(third.close)
    third.upload_weights(10.0, [rng.standard_normal(shape).astype(np.float32) for shape in TINY_MODEL])
    last_upload = time.monotonic()

    finished = wait_until(lambda: (out / "done.json").exists() and time.monotonic(), 60, "the Lightning leaf's round")
    assert leaf.wait(60) == 0, log_path.read_text()[-3000:]
    client_box["thread"].join(30)
    assert "error" not in client_box, client_box
    assert client_box["at"] - last_upload < 10 and finished - last_upload < 10, (
        client_box["at"] - last_upload, finished - last_upload)
    assert json.loads((out / "done.json").read_text())["round"] == 1


def test_kill_9_during_the_aggregation_of_a_large_round_the_waiting_leaves_get_the_recovered_aggregate(
        started, tmp_path):
    (make, closers) = started
    server, credentials = make(3)
    big = layers_for(7, size=8_000_000)  # 128 MB per upload: the last fold and the write take a moment
    waiting_client = Client(credentials[0], host=server.url, transport="websocket")
    federation = Federation(credentials[1], server.url, transport="websocket", timeout=300, log_every_s=5)
    last = Client(credentials[2], host=server.url, transport="none")
    closers += [waiting_client.close, federation.close, last.close]
    federation.connect()

    recovered = None
    for attempt in range(3):  # a round whose aggregation beat the kill is no test of recovery: try the next one
        waiting_client.upload_weights(1.0, big)
        client_box = timed(waiting_client.wait_for_aggregation, 300)
        federation_box = timed(federation.run_round, big, 2.0)
        wait_until(lambda: len(waiting_client.get_round().uploaded) == 2, 60, "2 of 3 uploads accepted")
        last.upload_weights(3.0, big)
        server.kill()  # the 201 came back: the aggregation has begun
        logged = len(server.log())
        server.start()
        restarted = time.monotonic()
        for box in (client_box, federation_box):
            box["thread"].join(60)
        assert "error" not in client_box and "error" not in federation_box, (client_box, federation_box)
        assert client_box["result"] == federation_box["result"].aggregation_id
        assert client_box["at"] - restarted < 10 and federation_box["at"] - restarted < 10, (
            client_box["at"] - restarted, federation_box["at"] - restarted)
        if "recovered a complete round" in server.log()[logged:]:
            recovered = federation_box["result"]
            break
    assert recovered is not None, f"every aggregation finished before the kill:\n{server.log()[-3000:]}"
    for got, want in zip(recovered.layers, big):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_on_timeout_continue_trains_through_a_20_s_outage_and_completes_a_later_round(started, caplog):
    (make, closers) = started
    server, credentials = make(1)
    federation = Federation(credentials[0], server.url, transport="websocket", timeout=60, on_timeout="continue",
                            log_every_s=5)
    closers.append(federation.close)
    federation.connect()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 4)).astype(np.float32)
    y = x @ np.array([1.0, -2.0, 0.5, 3.0], np.float32)
    weights = [np.zeros(4, np.float32)]

    def train() -> None:  # one epoch of least squares by gradient descent: the local model changes every round
        weights[0] = weights[0] - 0.1 * (2 / len(x)) * x.T @ (x @ weights[0] - y)

    results = []
    down_at = up_at = None
    with caplog.at_level(logging.WARNING, logger="branchkey_integrations"):
        while len(results) < 50:
            train()
            result = federation.run_round(weights, 256.0)
            results.append(result)
            if result.layers is not None:
                weights[0] = result.layers[0].copy()
            if down_at is None and len(results) == 2:
                server.kill()
                down_at = time.monotonic()
            elif up_at is None and down_at is not None and time.monotonic() - down_at >= 20:
                server.start()
                up_at = time.monotonic()
            elif up_at is not None and result.layers is not None:
                break
    skipped = [r for r in results if r.skipped is not None]
    assert results[0].layers is not None and results[1].layers is not None
    assert skipped and all(r.skipped == "unreachable" for r in skipped), [r.skipped for r in results]
    assert results[-1].layers is not None and results[-1].round == 3, results[-1]
    assert caplog.text.count(" skipped: ") == len(skipped)  # each skipped round said once
    loss = float(np.mean((x @ weights[0] - y) ** 2))
    assert loss < float(np.mean(y ** 2))  # it kept training through the outage
