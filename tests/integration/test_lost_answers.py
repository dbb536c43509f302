"""A lost 201 never files a retried upload in the next round (issue 22, defect 1).

A round's last upload completes the round; if its answer is lost on the way (the connection cut while the
201 travels, or the server killed after the commit), the client sends the upload again. By then the round
has aggregated, so without idempotency the server filed the retry in the next round: the leaf waited for
that round and timed out, and the next round held a stale copy of its weights. Our client sends an
``Idempotency-Key`` with every upload; a retry of a counted upload is answered with the original 201 (same
file id, run and round), and the leaf gets its round's aggregate.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import requests

from branchkey_integrations import Client

from ..answer_cutter import AnswerCutter
from ..conftest import LocalServer, init_branch, partner_upload, wait_until

LAYERS = [(3, 2), (2,)]


def layers(value: float) -> list[np.ndarray]:
    return [np.full(shape, value, np.float32) for shape in LAYERS]


def rounds_of(server: LocalServer, branch_id: str) -> list[dict]:
    response = server.admin("GET", f"/admin/v1/branches/{branch_id}/rounds")
    response.raise_for_status()
    return response.json()["data"]["rounds"]


def upload_in_thread(client: Client, value: float) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def upload() -> None:
        try:
            outcome["file_id"] = client.upload_weights(1.0, layers(value))
        except Exception as exc:  # reported by the test's assertion below
            outcome["error"] = exc

    thread = threading.Thread(target=upload, daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("fault", ["connection cut", "kill -9"])
def test_a_retried_last_upload_is_answered_from_its_round_not_filed_in_the_next(fault, tmp_path: Path, request) -> None:
    data_dir = tmp_path / "data"
    credentials = init_branch(data_dir, 3)
    server = LocalServer(data_dir).start()
    request.addfinalizer(server.stop)
    cutter = AnswerCutter(server.port)
    request.addfinalizer(cutter.close)
    partner_upload(credentials[0], server, layers(10.0), 1.0)
    partner_upload(credentials[1], server, layers(20.0), 1.0)
    last = Client(credentials[2], host=cutter.url, transport="none", output_dir=tmp_path / "out")
    request.addfinalizer(last.close)
    branch_id = last.branch_id

    thread, outcome = upload_in_thread(last, 3.0)
    assert cutter.held.wait(30), f"the last upload's 201 never came:\n{server.log()}"
    # the server counted it, and its round aggregated with it
    wait_until(lambda: rounds_of(server, branch_id)[0]["status"] == "aggregated", 30, "round 0 to aggregate")
    if fault == "kill -9":
        server.kill()
        server.start()
    cutter.cut()  # the client never reads the 201 and sends the upload again
    thread.join(60)
    assert "error" not in outcome, outcome.get("error")

    rounds = rounds_of(server, branch_id)
    assert [(r["round_index"], r["status"], r["upload_count"]) for r in rounds] == [(0, "aggregated", 3), (1, "open", 0)]
    uploads = server.admin("GET", f"/admin/v1/branches/{branch_id}/uploads").json()["data"]["uploads"]
    mine = [u["file_id"] for u in uploads if u["leaf_id"] == last.leaf_id]
    assert mine == [outcome["file_id"]], "the retry was answered with another file than the one counted"
    aggregation_id = last.wait_for_aggregation(30, check_every_s=0.2)
    assert aggregation_id == rounds[0]["aggregate_id"]
    aggregate = last.download_aggregate(aggregation_id)
    for got, shape in zip(aggregate.layers, LAYERS):
        np.testing.assert_array_equal(got, np.full(shape, 11.0, np.float32))  # mean(10, 20, 3): counted once


def test_an_upload_without_a_key_is_filed_as_before_and_a_bad_key_is_refused(tmp_path: Path, request) -> None:
    """The official clients send no key: the same bytes sent twice are two uploads (the second replaces the
    first, as before). A malformed key is a 400 naming the header, and nothing is filed."""
    data_dir = tmp_path / "data"
    credentials = init_branch(data_dir, 2)
    server = LocalServer(data_dir).start()
    request.addfinalizer(server.stop)
    with Client(credentials[0], host=server.url, transport="none") as client:
        branch_id, leaf_id, token = client.branch_id, client.leaf_id, client.credentials.session_token
    body = {"file": ("weights.npz", wire_bytes(tmp_path)), "data": (None, '{"leaf_name": "leaf_1", "metadata": "{}"}')}
    auth = {"Authorization": f"Bearer {leaf_id}:{token}"}
    url = server.url + "/api/v1/file/upload"
    answers = [requests.post(url, headers=auth, files=body, timeout=10) for _ in range(2)]
    assert [a.status_code for a in answers] == [201, 201]
    assert answers[0].json()["data"]["file_id"] != answers[1].json()["data"]["file_id"]
    refused = requests.post(url, headers={**auth, "Idempotency-Key": "a key with spaces"}, files=body, timeout=10)
    assert refused.status_code == 400 and "Idempotency-Key" in refused.json()["error"]
    uploads = server.admin("GET", f"/admin/v1/branches/{branch_id}/uploads").json()["data"]["uploads"]
    assert [u["file_id"] for u in uploads] == [answers[1].json()["data"]["file_id"]]


def wire_bytes(tmp_path: Path) -> bytes:
    from branchkey_integrations.core import wire

    wire.encode(layers(1.0), 1.0, tmp_path / "w.npz")
    return (tmp_path / "w.npz").read_bytes()
