"""branchkey-local over real HTTP: the leaf API, rounds, access control, WebSocket, CLI, restarts."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import io
import json
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from branchkey_integrations.core import wire
from branchkey_integrations.server.store import Store

from ..conftest import wait_until

LAYERS = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2, 3], dtype=np.int64)]


def layers(value: float) -> list[np.ndarray]:
    return [np.full((2, 3), value, np.float32), np.array([1, 2, 3], np.int64) * int(value)]


def savez(**members: Any) -> bytes:
    """An archive with arbitrary members (np.savez pickles object arrays), to build bad uploads."""
    buffer = io.BytesIO()
    np.savez(buffer, **members)
    return buffer.getvalue()


def weighted_mean(uploads: list[tuple[list[np.ndarray], float]]) -> list[np.ndarray]:
    weights = np.array([w for _, w in uploads])
    result = []
    for i, first in enumerate(uploads[0][0]):
        mean = np.average(np.stack([u[i].astype(np.float64) for u, _ in uploads]), axis=0, weights=weights)
        result.append(np.rint(mean).astype(first.dtype) if first.dtype.kind in "iu" else mean.astype(first.dtype))
    return result


def assert_layers(archive: wire.Archive, expected: list[np.ndarray]) -> None:
    assert archive.weighting is None and len(archive.layers) == len(expected)
    for got, want in zip(archive.layers, expected):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-6)


def open_ws(live, leaf):
    data = live.ticket(leaf)
    socket = connect(live.url.replace("http://", "ws://") +
                     f"/api/v1/ws?ticket={data['ticket_id']}&request_id={data['request_id']}")
    branch_id = leaf["branch_id"]
    live.wait_for(lambda: live.thread.server.notifier.connected(branch_id) > 0)
    return socket


def receive(socket, message_type: str) -> dict[str, Any]:
    while True:
        message = json.loads(socket.recv(timeout=10))
        if message["message_type"] == message_type:
            return message


# -- a full round ---------------------------------------------------------------------------


def test_round_completes_and_leaves_download_the_weighted_mean(live) -> None:
    branch, leaves = live.make_branch(2)
    run = requests.get(f"{live.url}/api/v1/run/{branch['id']}", headers=live.auth(leaves[0]), timeout=10)
    assert run.status_code == 200 and run.json() == {"data": {"run_status": "start", "run_number": 1}}
    uploads = [(layers(1), 10.0), (layers(4), 30.0)]
    for leaf, (arrays, weighting) in zip(leaves, uploads):
        answer = live.upload(leaf, wire.encode(arrays, weighting))
        assert answer.status_code == 201, answer.text
        assert answer.json()["data"]["run_number"] == 1 and answer.json()["data"]["round_index"] == 0
        assert set(answer.json()["data"]) == {"file_id", "run_number", "round_index", "kind"}
        assert answer.json()["data"]["kind"] == "federated_learning"
    aggregate_id = live.wait_aggregate(branch["id"])
    for leaf in leaves:
        assert_layers(live.fetch(leaf, aggregate_id), weighted_mean(uploads))
    rounds = live.rounds(branch["id"])
    assert [(r["round_index"], r["status"], r["upload_count"]) for r in rounds] == [(0, "aggregated", 2), (1, "open", 0)]
    # round 1 has no upload yet: the layout it expects is that of the run's latest aggregate
    changed = live.upload(leaves[0], wire.encode([np.zeros(4, np.float32)], 1.0))
    assert changed.status_code == 400 and "expected 2 layers" in changed.json()["error"]


def test_official_3x_headers_and_2x_metadata_are_accepted(live) -> None:
    branch, (leaf, _) = live.make_branch(2)
    content = wire.encode(LAYERS, 2.0)
    digest = base64.b64encode(hashlib.sha256(content).digest()).decode()
    answer = live.upload(leaf, content, data=json.dumps({"leaf_name": leaf["name"],
                                                         "metadata": "{'key1':'value1', 'key2':'value2'}"}),
                         headers={"x-bk-file-size": str(len(content)), "x-bk-file-digest": f"sha256={digest}",
                                  "LEAF": "true"})
    assert answer.status_code == 201, answer.text
    record = live.thread.server.store.get_file(answer.json()["data"]["file_id"])
    assert record.metadata == "{'key1':'value1', 'key2':'value2'}"
    assert record.sha256 == hashlib.sha256(content).hexdigest()


def test_reupload_by_the_same_leaf_replaces_the_earlier_one(live) -> None:
    branch, (a, b) = live.make_branch(2)
    first = live.upload(a, wire.encode(layers(1), 1.0))
    assert first.status_code == 201
    assert live.upload(a, wire.encode(layers(5), 3.0)).status_code == 201
    # the replaced upload's file is removed after the answer, in the background
    replaced = live.thread.server.store.files_dir / f"{first.json()['data']['file_id']}.npz"
    live.wait_for(lambda: not replaced.exists(), 10)
    assert live.upload(b, wire.encode(layers(2), 1.0)).status_code == 201
    aggregate_id = live.wait_aggregate(branch["id"])
    assert_layers(live.fetch(a, aggregate_id), weighted_mean([(layers(5), 3.0), (layers(2), 1.0)]))


def test_concurrent_uploads_aggregate_exactly_once(live) -> None:
    branch, leaves = live.make_branch(6)
    uploads = [(layers(i), float(i + 1)) for i in range(6)]
    results: list[int] = []

    def send(leaf, arrays, weighting):
        results.append(requests.post(live.url + "/api/v1/file/upload", headers=live.auth(leaf), timeout=30,
                                     files={"file": ("w.npz", wire.encode(arrays, weighting))},
                                     data={"data": "{}"}).status_code)

    threads = [threading.Thread(target=send, args=(leaf, *u)) for leaf, u in zip(leaves, uploads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [201] * 6
    aggregate_id = live.wait_aggregate(branch["id"])
    assert_layers(live.fetch(leaves[0], aggregate_id), weighted_mean(uploads))
    assert [(r["status"], r["upload_count"]) for r in live.rounds(branch["id"])] == [("aggregated", 6), ("open", 0)]


def test_round_deadline_aggregates_what_is_there(start_server) -> None:
    live = start_server(deadline_check_interval_s=0.05)
    branch, leaves = live.make_branch(3, round_deadline_s=0.2)
    assert live.upload(leaves[0], wire.encode(layers(3), 5.0)).status_code == 201
    aggregate_id = live.wait_aggregate(branch["id"])
    assert_layers(live.fetch(leaves[1], aggregate_id), layers(3))


def test_min_leaves_completes_a_round_before_every_leaf_uploads(live) -> None:
    branch, leaves = live.make_branch(3, min_leaves=2)
    for leaf in leaves[:2]:
        assert live.upload(leaf, wire.encode(layers(1), 1.0)).status_code == 201
    live.wait_aggregate(branch["id"])


# -- bad uploads ----------------------------------------------------------------------------

BAD_UPLOADS = [
    ("not a zip", b"this is not an npz", {}, 400, "Not a valid NPZ"),
    ("pickled object array", savez(weighting=np.array([1.0]), layer_0=np.array([{"a": 1}], dtype=object)),
     {}, 400, "pickle"),
    ("missing weighting", wire.encode(LAYERS), {}, 400, "no 'weighting'"),
    ("weighting 0", savez(weighting=np.array([0.0]), layer_0=LAYERS[0], layer_1=LAYERS[1]), {}, 400, "> 0"),
    ("weighting negative", savez(weighting=np.array([-2.0]), layer_0=LAYERS[0], layer_1=LAYERS[1]), {}, 400, "> 0"),
    ("weighting NaN", savez(weighting=np.array([np.nan]), layer_0=LAYERS[0], layer_1=LAYERS[1]), {}, 400, "finite"),
    ("weighting inf", savez(weighting=np.array([np.inf]), layer_0=LAYERS[0], layer_1=LAYERS[1]), {}, 400, "finite"),
    ("layer gap", savez(weighting=np.array([1.0]), layer_0=LAYERS[0], layer_2=LAYERS[1]), {}, 400, "missing: layer_1"),
    ("layer count", wire.encode([*LAYERS, LAYERS[1]], 1.0), {}, 400, "expected 2 layers, received 3"),
    ("layer shape", wire.encode([LAYERS[0].reshape(3, 2), LAYERS[1]], 1.0), {}, 400, "layer_0: expected float32[2, 3]"),
    ("layer dtype", wire.encode([LAYERS[0].astype(np.float64), LAYERS[1]], 1.0), {}, 400, "expected float32"),
    ("NaN values", wire.encode([np.full((2, 3), np.nan, np.float32), LAYERS[1]], 1.0), {}, 400, "non-finite"),
    ("inf values", wire.encode([np.full((2, 3), np.inf, np.float32), LAYERS[1]], 1.0), {}, 400, "non-finite"),
    ("digest mismatch", wire.encode(LAYERS, 1.0),
     {"x-bk-file-digest": "sha256=" + base64.b64encode(b"\0" * 32).decode()}, 400, "x-bk-file-digest does not match"),
    ("malformed digest", wire.encode(LAYERS, 1.0), {"x-bk-file-digest": "md5=abc"}, 400, "sha256=<base64"),
    ("size mismatch", wire.encode(LAYERS, 1.0), {"x-bk-file-size": "7"}, 400, "x-bk-file-size says 7"),
]


def test_bad_uploads_are_refused_and_leave_the_round_as_it_was(live) -> None:
    branch, (a, b, c) = live.make_branch(3)
    assert live.upload(a, wire.encode(LAYERS, 1.0)).status_code == 201  # the round now has a layout
    store = live.thread.server.store
    # the round's aggregate-to-be, which the server writes ahead once the round has an upload, is there too
    files_before = sorted(p.name for p in live.wait_for(lambda: len(list(store.files_dir.iterdir())) == 2 and
                                                        list(store.files_dir.iterdir())))
    uploads_before = live.admin("GET", f"/admin/v1/branches/{branch['id']}/uploads", expect=200)
    for name, content, headers, status, message in BAD_UPLOADS:
        answer = live.upload(b, content, headers=headers)
        assert answer.status_code == status, f"{name}: {answer.status_code} {answer.text}"
        assert message in answer.json()["error"], f"{name}: {answer.json()['error']}"
        assert sorted(p.name for p in store.files_dir.iterdir()) == files_before, name
        assert live.admin("GET", f"/admin/v1/branches/{branch['id']}/uploads") == uploads_before, name
    assert live.rounds(branch["id"])[0]["upload_count"] == 1
    good = [(LAYERS, 1.0), ([LAYERS[0] * 2, LAYERS[1] * 2], 2.0), ([LAYERS[0] * 3, LAYERS[1]], 3.0)]
    for leaf, (arrays, weighting) in zip((b, c), good[1:]):
        assert live.upload(leaf, wire.encode(arrays, weighting)).status_code == 201
    assert_layers(live.fetch(c, live.wait_aggregate(branch["id"])), weighted_mean(good))


def test_malformed_multipart_is_refused(live) -> None:
    branch, (leaf, _) = live.make_branch(2)
    no_file = requests.post(live.url + "/api/v1/file/upload", headers=live.auth(leaf),
                            files={"data": (None, "{}")}, timeout=10)
    assert no_file.status_code == 400 and "no part 'file'" in no_file.json()["error"]
    bad_data = live.upload(leaf, wire.encode(LAYERS, 1.0), data="{not json")
    assert bad_data.status_code == 400 and "Part 'data' is not JSON" in bad_data.json()["error"]
    not_multipart = requests.post(live.url + "/api/v1/file/upload", headers=live.auth(leaf), data=b"x", timeout=10)
    assert not_multipart.status_code == 400 and "multipart/form-data" in not_multipart.json()["error"]
    for content_type, body in (("multipart/form-data", b"x"), ("multipart/form-data; boundary=b", b"junk"),
                               ("multipart/form-data; boundary=b", b'--b\r\nContent-Disposition: form-data; name="file"\r\n\r\nab')):
        broken = requests.post(live.url + "/api/v1/file/upload", data=body, timeout=10,
                               headers={**live.auth(leaf), "Content-Type": content_type})
        assert broken.status_code == 400 and "Malformed multipart" in broken.json()["error"], broken.text
    assert live.rounds(branch["id"])[0]["upload_count"] == 0


def test_too_large_uploads_get_413(start_server) -> None:
    live = start_server(max_upload_bytes=2048, max_members=3)
    branch, (leaf, _) = live.make_branch(2)
    big = wire.encode([np.random.default_rng(0).normal(size=4096).astype(np.float32)], 1.0)
    answer = live.upload(leaf, big)
    assert answer.status_code == 413 and "2048 bytes" in answer.json()["error"]
    declared = live.upload(leaf, wire.encode(LAYERS, 1.0), headers={"x-bk-file-size": "999999"})
    assert declared.status_code == 413
    many = live.upload(leaf, wire.encode([np.zeros(1, np.float32)] * 4, 1.0))
    assert many.status_code == 413 and "members" in many.json()["error"]
    assert live.rounds(branch["id"])[0]["upload_count"] == 0
    assert list(live.thread.server.store.files_dir.iterdir()) == []
    assert live.upload(leaf, wire.encode([np.zeros(2, np.float32)], 1.0)).status_code == 201


# -- authentication and access --------------------------------------------------------------


def test_authentication_failures_are_401(live) -> None:
    branch, (leaf, _) = live.make_branch(2)
    url = f"{live.url}/api/v1/run/{branch['id']}"
    for headers in ({}, {"Authorization": "Bearer " + leaf["id"]}, {"Authorization": f"Basic {leaf['id']}:x"},
                    {"Authorization": f"Bearer {leaf['id']}:wrong"},
                    {"Authorization": f"Bearer nobody:{leaf['session_token']}"},
                    {"Authorization": "Bearer \u00e9:\u00fc".encode().decode("latin-1")}):
        answer = requests.get(url, headers=headers, timeout=10)
        assert answer.status_code == 401 and "error" in answer.json(), headers
    assert requests.post(live.url + "/api/v1/file/upload", timeout=10).status_code == 401
    admin = requests.get(live.url + "/admin/v1/branches", headers={"Authorization": "Bearer " + leaf["session_token"]})
    assert admin.status_code == 401


def test_other_branch_is_403_and_unknown_route_is_json_404(live) -> None:
    mine, (leaf, _) = live.make_branch(2)
    other, _ = live.make_branch(1)
    for path in (f"/api/v1/run/{other['id']}", f"/api/v1/config/branch/{other['id']}"):
        answer = requests.get(live.url + path, headers=live.auth(leaf), timeout=10)
        assert answer.status_code == 403 and mine["id"] in answer.json()["error"]
    missing = requests.get(live.url + "/api/v1/nope", headers=live.auth(leaf), timeout=10)
    assert missing.status_code == 404 and "/api/v1" in missing.json()["error"]


def test_download_access_control(live) -> None:
    branch, (a, b) = live.make_branch(2)
    other_branch, (stranger,) = live.make_branch(1)
    file_id = live.upload(a, wire.encode(LAYERS, 1.0)).json()["data"]["file_id"]
    own = live.fetch(a, file_id)  # a leaf may download its own upload
    assert own.weighting == 1.0 and np.array_equal(own.layers[0], LAYERS[0])
    assert live.download(b, file_id).status_code == 403
    hidden = live.download(stranger, file_id)
    assert hidden.status_code == 404 and file_id in hidden.json()["error"]
    assert live.download(a, "0" * 8 + "-unknown").status_code == 404


@pytest.mark.parametrize("path", [
    "/api/v1/file/download/../../store.sqlite3",
    "/api/v1/file/download/%2F..%2Fstore.sqlite3",
    "/api/v1/file/download/..%2F..%2Fadmin_token",
    "/api/v1/file/download/%2e%2e",
    "/api/v1/file/blob/..%2Fstore.sqlite3?expires=9999999999&signature=00",
])
def test_path_traversal_is_400(live, path: str) -> None:
    _, (leaf, _) = live.make_branch(2)
    host, port = live.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request("GET", path, headers=live.auth(leaf))  # sent as is: no client-side normalising
    answer = connection.getresponse()
    assert answer.status == 400
    assert "error" in json.loads(answer.read())


def test_signed_urls_expire_and_resist_tampering(live) -> None:
    branch, (leaf, _) = live.make_branch(2)
    content = wire.encode(LAYERS, 1.0)
    file_id = live.upload(leaf, content).json()["data"]["file_id"]
    url = live.download(leaf, file_id).json()["data"]["download_url"]
    assert url.startswith(live.url + "/api/v1/file/blob/" + file_id)
    assert requests.get(url, timeout=10).content == content
    server = live.thread.server
    past = int(time.time()) - 1
    expired = f"{live.url}/api/v1/file/blob/{file_id}?expires={past}&signature={server.auth.sign(file_id, past)}"
    tampered = url[:-1] + ("0" if url[-1] != "0" else "1")
    later = int(time.time()) + 10_000
    moved = url.split("?")[0] + f"?expires={later}&signature={url.rsplit('=', 1)[1]}"
    for bad in (expired, tampered, moved, url.split("?")[0]):
        answer = requests.get(bad, timeout=10)
        assert answer.status_code == 403 and "error" in answer.json(), bad


def test_download_and_login_links_name_the_server_never_the_host_header(start_server, tmp_path) -> None:
    """Issue 22 (9): a client's ``Host`` header was put into the signed URLs it (or the admin) was handed."""
    for public_url, expected in ((None, None), ("https://fl.example.org/", "https://fl.example.org")):
        live = start_server(tmp_path / f"data-{expected is None}", public_url=public_url)
        expected = expected or live.url  # by default, the address the server listens on
        _, (leaf, _) = live.make_branch(2)
        file_id = live.upload(leaf, wire.encode(LAYERS, 1.0)).json()["data"]["file_id"]
        download = requests.get(f"{live.url}/api/v1/file/download/{file_id}", timeout=10,
                                headers={**live.auth(leaf), "Host": "evil.example"})
        assert download.json()["data"]["download_url"].startswith(f"{expected}/api/v1/file/blob/{file_id}?")
        link = requests.post(live.url + "/admin/v1/dashboard/links", timeout=10,
                             headers={"Authorization": f"Bearer {live.admin_token}", "Host": "evil.example:8080"})
        assert link.status_code == 201 and link.json()["data"]["url"].startswith(expected + "/#login="), link.text


# -- run status -----------------------------------------------------------------------------


def test_pause_refuses_uploads_and_notifies(live) -> None:
    branch, (a, b) = live.make_branch(2)
    assert live.upload(a, wire.encode(layers(1), 1.0)).status_code == 201
    with open_ws(live, b) as socket:
        live.admin("POST", f"/admin/v1/branches/{branch['id']}/run", {"run_status": "pause"}, expect=200)
        assert receive(socket, "run_status") == {"message_type": "run_status", "body": {"run_status": "pause"}}
        refused = live.upload(b, wire.encode(layers(3), 1.0))
        assert refused.status_code == 409 and refused.json()["error"].startswith("run is pause")
        run = requests.get(f"{live.url}/api/v1/run/{branch['id']}", headers=live.auth(b), timeout=10).json()
        assert run["data"] == {"run_status": "pause", "run_number": 1}
        live.admin("POST", f"/admin/v1/branches/{branch['id']}/run", {"run_status": "start"}, expect=200)
        assert receive(socket, "run_status")["body"]["run_status"] == "start"
        assert live.upload(b, wire.encode(layers(3), 1.0)).status_code == 201
        aggregate_id = receive(socket, "aggregation_status")["body"]["aggregation_id"]
    assert_layers(live.fetch(b, aggregate_id), weighted_mean([(layers(1), 1.0), (layers(3), 1.0)]))


def test_stop_abandons_the_round_and_start_begins_a_new_run(live) -> None:
    branch, (a, b) = live.make_branch(2)
    assert live.upload(a, wire.encode(layers(9), 1.0)).status_code == 201
    live.admin("POST", f"/admin/v1/branches/{branch['id']}/run", {"run_status": "stop"}, expect=200)
    assert live.upload(b, wire.encode(layers(1), 1.0)).status_code == 409
    started = live.admin("POST", f"/admin/v1/branches/{branch['id']}/run", {"run_status": "start"}, expect=200)
    assert (started["run_status"], started["run_number"]) == ("start", 2)
    rounds = live.rounds(branch["id"])
    assert [(r["run_number"], r["round_index"], r["status"]) for r in rounds] == [(1, 0, "abandoned"), (2, 0, "open")]
    for leaf, value in ((a, 2), (b, 4)):
        assert live.upload(leaf, wire.encode(layers(value), 1.0)).status_code == 201
    aggregate_id = live.wait_aggregate(branch["id"], run=2)
    assert_layers(live.fetch(a, aggregate_id), weighted_mean([(layers(2), 1.0), (layers(4), 1.0)]))
    bad = live.admin("POST", f"/admin/v1/branches/{branch['id']}/run", {"run_status": "go"}, expect=400)
    assert "run_status" in bad["error"]


# -- WebSocket, metrics, config -------------------------------------------------------------


def test_websocket_tickets_are_single_use_and_required(live) -> None:
    branch, (leaf, _) = live.make_branch(2)
    base = live.url.replace("http://", "ws://") + "/api/v1/ws"
    for query in ("", "?ticket=forged&request_id=x"):
        with pytest.raises(InvalidStatus) as caught:
            connect(base + query)
        assert caught.value.response.status_code == 401
    data = live.ticket(leaf)
    assert set(data) == {"ticket_id", "request_id", "expires_at"}
    with pytest.raises(InvalidStatus):
        connect(f"{base}?ticket={data['ticket_id']}&request_id=wrong")  # a failed try spends the ticket too
    data = live.ticket(leaf)
    with connect(f"{base}?ticket={data['ticket_id']}&request_id={data['request_id']}"):
        pass
    with pytest.raises(InvalidStatus) as caught:
        connect(f"{base}?ticket={data['ticket_id']}&request_id={data['request_id']}")
    assert caught.value.response.status_code == 401


def test_websocket_receives_aggregation_status(live) -> None:
    branch, (a, b) = live.make_branch(2)
    with open_ws(live, a) as socket:
        for leaf in (a, b):
            assert live.upload(leaf, wire.encode(LAYERS, 1.0)).status_code == 201
        message = receive(socket, "aggregation_status")
    assert message["body"]["aggregation_id"] == live.wait_aggregate(branch["id"])


def test_metrics_are_stored_from_a_raw_body(live) -> None:
    branch, (a, b) = live.make_branch(2)
    for leaf in (a, b):
        assert live.upload(leaf, wire.encode(LAYERS, 1.0)).status_code == 201
    aggregation_id = live.wait_aggregate(branch["id"])
    body = {"mode": "test", "aggregation_id": aggregation_id, "leaf_id": a["id"], "branch_id": a["branch_id"],
            "tree_id": a["tree_id"], "data": json.dumps({"accuracy": 0.5})}

    def post(payload: dict[str, Any]) -> requests.Response:
        # the official clients send a str body: no Content-Type header at all
        return requests.post(live.url + "/api/v1/performance/analysis", data=json.dumps(payload),
                             headers=live.auth(a), timeout=10)

    created = post(body)
    assert created.status_code == 201 and "id" in created.json()["data"]
    assert post({**body, "mode": "eval"}).status_code == 400
    assert post({**body, "leaf_id": b["id"]}).status_code == 403
    assert post({**body, "data": "{oops"}).status_code == 400
    metrics = live.admin("GET", f"/admin/v1/branches/{branch['id']}/metrics", expect=200)["metrics"]
    assert [(m["mode"], m["data"], m["aggregation_id"], m["leaf_id"]) for m in metrics] == [
        ("test", '{"accuracy": 0.5}', aggregation_id, a["id"])]


def test_metrics_name_an_aggregate_of_the_leafs_branch(live) -> None:
    """An unknown aggregation id is 404, another branch's aggregate (or an upload id) is 403/404; nothing is stored."""
    branch, (a, b) = live.make_branch(2)
    other, (c, d) = live.make_branch(2)
    for leaf in (a, b, c, d):
        assert live.upload(leaf, wire.encode(LAYERS, 1.0)).status_code == 201
    live.wait_aggregate(branch["id"])
    foreign = live.wait_aggregate(other["id"])

    def post(aggregation_id: str) -> requests.Response:
        body = {"mode": "test", "aggregation_id": aggregation_id, "leaf_id": a["id"], "branch_id": a["branch_id"],
                "tree_id": a["tree_id"], "data": json.dumps({"accuracy": 0.5})}
        return requests.post(live.url + "/api/v1/performance/analysis", data=json.dumps(body), headers=live.auth(a),
                             timeout=10)

    unknown = post("no-such-aggregate")
    assert unknown.status_code == 404 and "no-such-aggregate" in unknown.json()["error"]
    refused = post(foreign)
    assert refused.status_code == 403 and "another branch" in refused.json()["error"]
    own_upload = live.admin("GET", f"/admin/v1/branches/{branch['id']}/uploads", expect=200)
    upload_id = own_upload["uploads"][0]["file_id"]
    assert post(upload_id).status_code == 404  # an upload is not an aggregate
    assert live.admin("GET", f"/admin/v1/branches/{branch['id']}/metrics", expect=200)["metrics"] == []


def test_branch_config(live) -> None:
    branch, (leaf, _) = live.make_branch(2, min_leaves=2, round_deadline_s=30)
    answer = requests.get(f"{live.url}/api/v1/config/branch/{branch['id']}", headers=live.auth(leaf), timeout=10)
    data = answer.json()["data"]
    assert data["branch"] == {"id": branch["id"], "name": "b", "tree_id": branch["tree_id"]}
    assert data["service"] == {"algorithm": "fedavg", "config": {"min_leaves": 2, "round_deadline_s": 30},
                               "field_ops": {}}
    assert data["model_config"] == {} and data["created_at"] and data["updated_at"]


# -- restarts -------------------------------------------------------------------------------


def test_rounds_complete_when_the_server_died_before_aggregating(tmp_path: Path, start_server) -> None:
    data_dir = tmp_path / "data"
    store = Store(data_dir)
    tree = store.create_tree("t")
    branch = store.create_branch(tree["id"], "b")
    leaves = store.create_leaves(branch.id, 2)
    uploads = [(layers(2), 1.0), (layers(6), 3.0)]
    for leaf, (arrays, weighting) in zip(leaves, uploads):
        temp = store.new_temp_path()
        temp.write_bytes(wire.encode(arrays, weighting))
        store.commit_upload(temp, leaf=leaf, run_number=1, round_index=0, weighting=weighting,
                            specs=[wire.LayerSpec.of(x) for x in arrays], size=1, sha256="00", metadata=None)
    store.new_temp_path().write_bytes(b"interrupted upload")
    store.close()
    live = start_server(data_dir)
    rounds = live.rounds(branch.id)  # start_server returns once the rounds are recovered: no waiting
    assert rounds[0]["status"] == "aggregated"
    assert_layers(live.fetch(leaves[0].credentials(), rounds[0]["aggregate_id"]), weighted_mean(uploads))
    assert not [p for p in (data_dir / "files").iterdir() if p.name.startswith(".tmp-")]


def test_the_server_listens_while_it_recovers_and_answers_503_until_done(tmp_path: Path, monkeypatch) -> None:
    """A long recovery (a large complete round to aggregate) no longer keeps the port closed: API calls are
    answered 503 with Retry-After (a leaf keeps asking, see Client.retrying_until) until it is done; the
    OpenAPI document and the dashboard's page are served at once."""
    from branchkey_integrations.server.rounds import Rounds

    from ..inprocess import ServerThread

    data_dir = tmp_path / "data"
    store = Store(data_dir)
    branch = store.create_branch(store.create_tree("t")["id"], "b")
    leaf = store.create_leaves(branch.id, 1)[0].credentials()
    store.close()
    release, recover = threading.Event(), Rounds.recover

    async def slow_recover(self: Rounds) -> None:
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 30)
        await recover(self)

    monkeypatch.setattr(Rounds, "recover", slow_recover)
    thread = ServerThread(data_dir, recovered=False)
    try:
        run = f"{thread.url}/api/v1/run/{branch.id}"
        headers = {"Authorization": f"Bearer {leaf['id']}:{leaf['session_token']}"}
        answer = requests.get(run, headers=headers, timeout=10)
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"
        assert "recovering after a restart" in answer.json()["error"]
        assert requests.get(thread.url + "/admin/v1/branches", timeout=10).status_code == 503
        assert requests.get(thread.url + "/api/v1/openapi.json", timeout=10).status_code == 200
        assert requests.get(thread.url + "/", timeout=10).status_code == 200
        release.set()
        wait_until(lambda: requests.get(run, headers=headers, timeout=10).status_code == 200, 10,
                   "the recovery to end")
    finally:
        release.set()
        thread.stop()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "branchkey_integrations.cli", *args],
                          capture_output=True, text=True, timeout=60)


def serve(data_dir: Path, wait: bool = True) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "branchkey_integrations.cli", "--log-level", "WARNING",
                                "serve", "--data-dir", str(data_dir), "--port", "0"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    info = data_dir / "server.json"

    def ready() -> str | None:
        assert process.poll() is None, process.stderr.read().decode()
        if info.exists() and json.loads(info.read_text())["pid"] == process.pid:
            return json.loads(info.read_text())["url"]
        return None

    deadline = time.monotonic() + 30
    while not (url := ready()):
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    return process, url


@pytest.mark.slow
def test_cli_init_writes_credentials(tmp_path: Path) -> None:
    result = cli("init", "--data-dir", str(tmp_path / "data"), "--leaves", "3", "--credentials-dir",
                 str(tmp_path / "creds"), "--min-leaves", "2", "--round-deadline", "60")
    assert result.returncode == 0, result.stderr
    files = sorted((tmp_path / "creds").iterdir())
    assert [f.name for f in files] == ["leaf_1.json", "leaf_2.json", "leaf_3.json"]
    for path in files:
        assert set(json.loads(path.read_text())) == {"id", "name", "session_token", "owner_id", "tree_id", "branch_id"}
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(files[0].read_text())["branch_id"] in result.stdout
    again = cli("init", "--data-dir", str(tmp_path / "data"), "--leaves", "1", "--credentials-dir", str(tmp_path / "creds"))
    assert again.returncode == 1 and "already exist" in again.stderr
    assert cli("init", "--data-dir", str(tmp_path / "d"), "--leaves", "0", "--credentials-dir", "x").returncode == 2
    for command in ("init", "serve", "run", "status"):
        assert cli(command, "--help").returncode == 0


@pytest.mark.slow
def test_cli_run_offline_and_through_a_live_server(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert cli("init", "--data-dir", str(data_dir), "--leaves", "2", "--credentials-dir", str(tmp_path / "c")).returncode == 0
    offline = cli("run", "pause", "--data-dir", str(data_dir))
    assert offline.returncode == 0 and "run_status pause" in offline.stdout and "in the store" in offline.stdout
    leaf = json.loads((tmp_path / "c" / "leaf_1.json").read_text())
    headers = {"Authorization": f"Bearer {leaf['id']}:{leaf['session_token']}"}
    process, url = serve(data_dir)
    try:
        run_url = f"{url}/api/v1/run/{leaf['branch_id']}"
        assert requests.get(run_url, headers=headers, timeout=10).json()["data"]["run_status"] == "pause"
        data = requests.post(url + "/api/v1/ws/ticket", headers=headers, timeout=10).json()["data"]
        with connect(url.replace("http://", "ws://") +
                     f"/api/v1/ws?ticket={data['ticket_id']}&request_id={data['request_id']}") as socket:
            for status in ("start", "pause"):
                result = cli("run", status, "--data-dir", str(data_dir))
                assert result.returncode == 0 and "leaves notified" in result.stdout, result.stderr
                assert receive(socket, "run_status")["body"]["run_status"] == status
        assert requests.get(run_url, headers=headers, timeout=10).json()["data"] == {"run_status": "pause", "run_number": 1}
        status = cli("status", "--data-dir", str(data_dir))
        assert url in status.stdout and "run_status pause" in status.stdout
        second = subprocess.run([sys.executable, "-m", "branchkey_integrations.cli", "serve", "--data-dir",
                                 str(data_dir), "--port", "0"], capture_output=True, text=True, timeout=60)
        assert second.returncode == 1 and "already serves" in second.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    assert not (data_dir / "server.json").exists()


@pytest.mark.slow
def test_kill_9_loses_nothing_and_the_round_completes_after_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert cli("init", "--data-dir", str(data_dir), "--leaves", "2", "--credentials-dir", str(tmp_path / "c")).returncode == 0
    a, b = (json.loads((tmp_path / "c" / f"leaf_{i}.json").read_text()) for i in (1, 2))

    def upload(url: str, leaf: dict[str, str], arrays: list[np.ndarray], weighting: float) -> requests.Response:
        return requests.post(url + "/api/v1/file/upload", files={"file": ("w.npz", wire.encode(arrays, weighting))},
                             data={"data": "{}"}, timeout=30,
                             headers={"Authorization": f"Bearer {leaf['id']}:{leaf['session_token']}"})

    process, url = serve(data_dir)
    try:
        assert upload(url, a, layers(2), 3.0).status_code == 201
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    process, url = serve(data_dir)
    try:
        assert upload(url, b, layers(10), 1.0).status_code == 201
        token = (data_dir / "admin_token").read_text().strip()

        def aggregated() -> str | None:
            rounds = requests.get(f"{url}/admin/v1/branches/{a['branch_id']}/rounds", timeout=10,
                                  headers={"Authorization": f"Bearer {token}"}).json()["data"]["rounds"]
            return rounds[0]["aggregate_id"]

        deadline = time.monotonic() + 20
        while not (aggregate_id := aggregated()):
            assert time.monotonic() < deadline, "no aggregate after restart"
            time.sleep(0.02)
        headers = {"Authorization": f"Bearer {b['id']}:{b['session_token']}", "accept": "*/*"}
        link = requests.get(f"{url}/api/v1/file/download/{aggregate_id}", headers=headers, timeout=10)
        archive = wire.decode(requests.get(link.json()["data"]["download_url"], timeout=10).content)
        assert_layers(archive, weighted_mean([(layers(2), 3.0), (layers(10), 1.0)]))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
