"""The leaf lifecycle against a real server: a revoked leaf is refused on every leaf route and its WebSocket
closes within a second, a rotated leaf works with its new token only, the other leaves' rounds go on, a leaf
added mid-round counts from the next round; every admin action is in the audit trail once, without a secret;
and the CLI's ``leaf`` and ``admin-token`` commands on a store (files 0600, audit origin ``cli``)."""

from __future__ import annotations

import http.client
import json
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from branchkey_integrations.core import wire
from branchkey_integrations.server.durable import TEMP_PREFIX
from branchkey_integrations.server.store import Store

from ..conftest import cli


def model(value: float) -> bytes:
    return wire.encode([np.full(3, value, np.float32)], 1.0)


def ws_url(live, ticket: dict[str, str]) -> str:
    return live.url.replace("http://", "ws://") + f"/api/v1/ws?ticket={ticket['ticket_id']}&request_id={ticket['request_id']}"


def refused_everywhere(live, leaf: dict[str, str], upload_id: str) -> dict[str, int]:
    """The status of every leaf route called with ``leaf``'s credentials."""
    auth = live.auth(leaf)
    branch = leaf["branch_id"]
    metrics = {"leaf_id": leaf["id"], "branch_id": branch, "tree_id": leaf["tree_id"], "mode": "test", "data": "{}"}
    calls = {
        "run": requests.get(f"{live.url}/api/v1/run/{branch}", headers=auth, timeout=10),
        "round": requests.get(f"{live.url}/api/v1/round/{branch}", headers=auth, timeout=10),
        "config": requests.get(f"{live.url}/api/v1/config/branch/{branch}", headers=auth, timeout=10),
        "upload": live.upload(leaf, model(9.0)),
        "download": live.download(leaf, upload_id),
        "metrics": requests.post(f"{live.url}/api/v1/performance/analysis", json=metrics, headers=auth, timeout=10),
        "ticket": requests.post(f"{live.url}/api/v1/ws/ticket", headers=auth, timeout=10),
    }
    return {name: answer.status_code for name, answer in calls.items()}


def test_revoke_and_rotate_while_the_other_leaves_rounds_go_on(live) -> None:
    branch, (one, two, three) = live.make_branch(3)
    first = live.upload(one, model(1.0))
    assert first.status_code == 201
    spare = live.ticket(one)  # unspent when the leaf is revoked: it must die with the token
    with connect(ws_url(live, live.ticket(one)), open_timeout=10) as socket:
        live.wait_for(lambda: live.thread.server.notifier.connected(branch["id"]) == 1)
        started = time.monotonic()
        revoked = live.admin("POST", f"/admin/v1/branches/{branch['id']}/leaves/leaf_1/revoke", {}, expect=200)
        with pytest.raises(ConnectionClosed) as closed:
            socket.recv(timeout=1.0)
        assert time.monotonic() - started < 1.0 and closed.value.rcvd.code == 1008
    assert revoked["websockets_closed"] == 1 and revoked["dropped"] == [] and revoked["amqp"] == "none"
    assert refused_everywhere(live, one, first.json()["data"]["file_id"]) == {
        name: 401 for name in ("run", "round", "config", "upload", "download", "metrics", "ticket")}
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(live, spare), open_timeout=10)
    assert refused.value.response.status_code == 401

    rotated = live.admin("POST", f"/admin/v1/branches/{branch['id']}/leaves/{two['id']}/rotate", expect=200)["leaf"]
    assert rotated["id"] == two["id"] and rotated["session_token"] != two["session_token"]
    assert requests.get(f"{live.url}/api/v1/run/{branch['id']}", headers=live.auth(two), timeout=10).status_code == 401
    assert live.upload(rotated, model(2.0)).status_code == 201
    assert live.upload(three, model(4.0)).status_code == 201  # leaf_1's upload was kept: three of three
    aggregate = live.wait_aggregate(branch["id"])
    assert live.fetch(three, aggregate).layers[0].tolist() == pytest.approx([7 / 3] * 3)
    assert live.upload(rotated, model(1.0)).status_code == 201  # round 1 needs the two leaves left
    assert live.upload(three, model(3.0)).status_code == 201
    assert live.fetch(rotated, live.wait_aggregate(branch["id"], index=1)).layers[0].tolist() == [2.0] * 3


def test_revoking_drops_an_upload_on_request_and_may_complete_the_round(live) -> None:
    branch, (one, two, three) = live.make_branch(3)
    assert live.upload(one, model(1.0)).status_code == 201
    assert live.upload(two, model(5.0)).status_code == 201
    dropped = live.admin("POST", f"/admin/v1/branches/{branch['id']}/leaves/leaf_1/revoke",
                         {"drop_upload": True, "note": "left the consortium"}, expect=200)
    assert dropped["dropped"] == ["leaf_1"] and dropped["aggregated"] is None  # leaf_3 still missing
    done = live.admin("POST", f"/admin/v1/branches/{branch['id']}/leaves/leaf_3/revoke", {}, expect=200)
    assert done["aggregated"] is not None  # the round needed leaf_2 alone now
    assert live.fetch(two, done["aggregated"]).layers[0].tolist() == [5.0] * 3
    again = live.admin("POST", f"/admin/v1/branches/{branch['id']}/leaves/leaf_3/revoke", {}, expect=404)
    assert "was revoked at" in again["error"]


def test_an_upload_in_flight_when_its_leaf_is_revoked_does_not_count(live) -> None:
    branch, (one, two, three) = live.make_branch(3)
    assert live.upload(two, model(2.0)).status_code == 201
    body = requests.Request("POST", live.url + "/api/v1/file/upload", files={"file": ("w.npz", model(9.0))},
                            data={"data": json.dumps({"leaf_name": one["name"], "metadata": "{}"})}).prepare()
    host, port = live.url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.putrequest("POST", "/api/v1/file/upload")
        for name, value in {**live.auth(one), "Content-Type": body.headers["Content-Type"],
                            "Content-Length": str(len(body.body))}.items():
            connection.putheader(name, value)
        connection.endheaders()
        cut = len(body.body) // 2
        connection.send(body.body[:cut])
        files = live.thread.server.store.files_dir  # the server writes a body it is receiving to a temp file there
        live.wait_for(lambda: any(p.name.startswith(TEMP_PREFIX) for p in files.iterdir()))
        live.admin("POST", f"/admin/v1/branches/{branch['id']}/leaves/{one['id']}/revoke", {}, expect=200)
        connection.send(body.body[cut:])
        answer = connection.getresponse()
        text = answer.read().decode()
    finally:
        connection.close()
    assert answer.status == 401 and "was revoked while its upload was being received" in text
    progress = requests.get(f"{live.url}/api/v1/round/{branch['id']}", headers=live.auth(two), timeout=10).json()["data"]
    assert progress["required"] == 2 and progress["missing"] == ["leaf_3"]  # leaf_1's body never counted
    assert live.upload(three, model(4.0)).status_code == 201
    assert live.fetch(two, live.wait_aggregate(branch["id"])).layers[0].tolist() == [3.0] * 3  # (2 + 4) / 2


def test_a_leaf_added_mid_round_counts_from_the_next_round_and_the_audit_has_each_action_once(live) -> None:
    branch, (one, two) = live.make_branch(2)
    branch_path = f"/admin/v1/branches/{branch['id']}"
    assert live.upload(one, model(1.0)).status_code == 201
    [new] = live.admin("POST", branch_path + "/leaves", {"count": 1}, expect=201)["leaves"]
    assert live.upload(two, model(3.0)).status_code == 201
    live.wait_aggregate(branch["id"])  # two of the two leaves the round knew
    assert live.upload(one, model(1.0)).status_code == 201
    assert live.upload(two, model(1.0)).status_code == 201
    progress = requests.get(f"{live.url}/api/v1/round/{branch['id']}", headers=live.auth(new), timeout=10).json()
    assert progress["data"]["required"] == 3 and progress["data"]["missing"] == ["leaf_3"]
    live.admin("POST", branch_path + "/run", {"run_status": "pause"}, expect=200)
    live.admin("POST", branch_path + "/rounds/open/reset", {"note": "restart"}, expect=200)
    live.admin("PUT", branch_path + "/strategy", {"strategy": "fedadam"}, expect=200)
    live.admin("POST", branch_path + "/run", {"run_status": "start"}, expect=200)
    assert live.upload(one, model(1.0)).status_code == 201
    live.admin("DELETE", branch_path + "/rounds/open/uploads/leaf_1", {}, expect=200)
    live.admin("POST", branch_path + "/leaves/leaf_2/rotate", expect=200)
    live.admin("POST", branch_path + "/leaves/leaf_3/revoke", {}, expect=200)
    code = live.admin("POST", "/admin/v1/dashboard/links", expect=201)["url"].rsplit("#login=", 1)[-1]
    assert requests.post(live.url + "/admin/v1/dashboard/login", json={"code": code}, timeout=10).status_code == 200
    old_admin = live.admin_token
    token = live.admin("POST", "/admin/v1/admin-token/rotate", expect=200)["token"]
    assert live.admin("GET", "/admin/v1/audit")["error"].startswith("Admin API needs")  # the old token is refused
    live.admin_token = token
    entries = live.admin("GET", "/admin/v1/audit?limit=1000", expect=200)["entries"]
    actions = [entry["action"] for entry in entries]
    assert actions == ["branch.create", "leaf.add", "leaf.add", "run.set", "round.reset",
                       "branch.strategy", "run.set", "round.drop_upload", "leaf.rotate", "leaf.revoke",
                       "dashboard.login_link", "dashboard.login", "admin_token.rotate"]
    assert {entry["peer"] for entry in entries} == {"127.0.0.1"}
    assert [e["detail"]["leaves"] for e in entries if e["action"] == "leaf.add"] == [["leaf_1", "leaf_2"], ["leaf_3"]]
    text = json.dumps(entries)
    for secret in (old_admin, token, one["session_token"], two["session_token"], new["session_token"], code):
        assert secret not in text


def test_the_cli_adds_lists_revokes_and_rotates_leaves_in_a_store(tmp_path: Path) -> None:
    data, creds = tmp_path / "data", tmp_path / "creds"
    cli("init", "--data-dir", str(data), "--leaves", "2", "--credentials-dir", str(creds))
    added = cli("leaf", "add", "--data-dir", str(data), "--credentials-dir", str(creds)).stdout
    assert "leaf leaf_3" in added and stat.S_IMODE((creds / "leaf_3.json").stat().st_mode) == 0o600
    old = json.loads((creds / "leaf_2.json").read_text())
    cli("leaf", "rotate", "leaf_2", "--data-dir", str(data), "--credentials-dir", str(creds))
    new = json.loads((creds / "leaf_2.json").read_text())
    assert new["id"] == old["id"] and new["session_token"] != old["session_token"]
    assert stat.S_IMODE((creds / "leaf_2.json").stat().st_mode) == 0o600
    cli("leaf", "revoke", "leaf_1", "--data-dir", str(data))
    token_before = (data / "admin_token").read_text()
    cli("admin-token", "rotate", "--data-dir", str(data))
    assert (data / "admin_token").read_text() != token_before
    listing = json.loads(cli("leaf", "list", "--json", "--data-dir", str(data)).stdout)
    assert [(leaf["name"], leaf["revoked_at"] is not None) for leaf in listing] == \
        [("leaf_1", True), ("leaf_2", False), ("leaf_3", False)]
    store = Store(data)
    try:
        assert store.get_leaf(listing[0]["id"]) is None and store.get_leaf(old["id"]).session_token == new["session_token"]
    finally:
        store.close()
    status = json.loads(cli("status", "--json", "--data-dir", str(data)).stdout)
    assert [(e["action"], e["peer"]) for e in status["audit"]] == [
        ("leaf.add", "cli"), ("leaf.rotate", "cli"), ("leaf.revoke", "cli"), ("admin_token.rotate", "cli")]
    assert status["branches"][0]["leaves"] == 2 and status["tls"] is False
    assert "session_token" not in json.dumps(status["audit"])


@pytest.mark.amqp
def test_a_revoked_leaf_loses_its_rabbitmq_login_and_a_rotated_one_logs_in_with_its_new_token(start_server,
                                                                                             rabbitmq) -> None:
    import pika.exceptions

    from ..conftest import AMQP_URL, MANAGEMENT_URL
    from .test_rabbitmq import connect_as_leaf

    live = start_server(amqp_url=AMQP_URL, amqp_management_url=MANAGEMENT_URL)
    branch, (one, two) = live.make_branch(2)
    try:
        connect_as_leaf(one["tree_id"], one["id"], one["session_token"]).close()
        answer = live.admin("POST", f"/admin/v1/branches/{branch['id']}/leaves/leaf_1/revoke", {}, expect=200)
        assert answer["amqp"] == "done"
        with pytest.raises(pika.exceptions.ProbableAuthenticationError):
            connect_as_leaf(one["tree_id"], one["id"], one["session_token"])
        rotated = live.admin("POST", f"/admin/v1/branches/{branch['id']}/leaves/leaf_2/rotate", expect=200)
        assert rotated["amqp"] == "done"
        with pytest.raises(pika.exceptions.ProbableAuthenticationError):
            connect_as_leaf(two["tree_id"], two["id"], two["session_token"])
        connect_as_leaf(two["tree_id"], two["id"], rotated["leaf"]["session_token"]).close()
    finally:
        live.admin("DELETE", f"/admin/v1/trees/{branch['tree_id']}/broker", expect=200)


@pytest.mark.amqp
def test_a_leaf_revoked_with_no_server_running_loses_its_rabbitmq_login_when_one_starts(start_server, rabbitmq,
                                                                                       tmp_path) -> None:
    import pika.exceptions

    from ..conftest import AMQP_URL, MANAGEMENT_URL
    from .test_rabbitmq import connect_as_leaf

    first = start_server(tmp_path / "data", amqp_url=AMQP_URL, amqp_management_url=MANAGEMENT_URL)
    branch, (one, _) = first.make_branch(2)
    store = Store(tmp_path / "data")  # beside the first server, as a CLI would be with no live server found
    try:
        store.revoke_leaf(branch["id"], "leaf_1")  # what 'branchkey-local leaf revoke' does with no server
    finally:
        store.close()
    connect_as_leaf(one["tree_id"], one["id"], one["session_token"]).close()  # the broker does not know yet
    second = start_server(tmp_path / "data", amqp_url=AMQP_URL, amqp_management_url=MANAGEMENT_URL)
    try:
        with pytest.raises(pika.exceptions.ProbableAuthenticationError):
            connect_as_leaf(one["tree_id"], one["id"], one["session_token"])
    finally:
        second.admin("DELETE", f"/admin/v1/trees/{branch['tree_id']}/broker", expect=200)
