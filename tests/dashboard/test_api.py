"""The dashboard's JSON, event stream and access rules against a real in-process server (real HTTP,
real uploads through the Client): what the page shows is what these routes answer."""

from __future__ import annotations

import json
import threading
from queue import Empty, Queue

import numpy as np
import pytest
import requests

from branchkey_integrations import Client
from branchkey_integrations.core.errors import ApiError

from ..conftest import wait_until

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ROUTES = ["/admin/v1/overview", "/admin/v1/branches/{b}/live", "/admin/v1/branches/{b}/history",
          "/admin/v1/branches/{b}/metrics/summary", "/admin/v1/events"]


def upload(credentials, server, weighting: float, value: float) -> None:
    with Client(credentials, host=server.url, transport="none") as client:
        client.upload_weights(weighting, [np.full(4, value, np.float32), np.full((2, 2), value, np.float32)])


def metrics(credentials, server, aggregation_id: str, mode: str, **values: float) -> None:
    with Client(credentials, host=server.url, transport="none") as client:
        client.send_performance_metrics(aggregation_id, values, mode=mode)


def get(server, path: str) -> dict:
    answer = server.admin("GET", path)
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


class Stream:
    """The event stream read in a thread: its events land in a queue."""

    def __init__(self, server) -> None:
        self.events: Queue = Queue()
        self.response = server.admin("GET", "/admin/v1/events", stream=True)
        assert self.response.status_code == 200 and self.response.headers["Content-Type"].startswith("text/event-stream")
        threading.Thread(target=self._read, daemon=True).start()
        assert self.next()["kind"] == "hello"

    def _read(self) -> None:
        try:
            for line in self.response.iter_lines():
                if line.startswith(b"data: "):
                    self.events.put(json.loads(line[6:]))
        except (requests.RequestException, AttributeError):  # closed by the test (urllib3 drops its file)
            pass

    def next(self, kind: str | None = None, timeout: float = 10) -> dict:
        while True:
            try:
                event = self.events.get(timeout=timeout)
            except Empty:
                raise AssertionError(f"no {kind or 'event'} within {timeout} s") from None
            if kind is None or event["kind"] == kind:
                return event

    # no close(): closing a response another thread reads from blocks; the server's shutdown ends the stream


def test_every_data_route_and_button_refuses_without_the_admin_token(inprocess_server):
    server, leaves = inprocess_server(2)
    branch = leaves[0]["branch_id"]
    page = requests.get(server.url + "/", timeout=10)
    assert page.status_code == 200 and "branchkey-local" in page.text
    assert branch not in page.text and leaves[0]["name"] not in page.text  # the page itself holds no data
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {leaves[0]['id']}:{leaves[0]['session_token']}"}):
        for path in ROUTES:
            answer = requests.get(server.url + path.format(b=branch), headers=headers, timeout=10)
            assert answer.status_code == 401, (path, headers, answer.text)
            assert "admin token" in answer.json()["error"]
        for status in ("pause", "stop"):  # the page's run control buttons
            answer = requests.post(f"{server.url}/admin/v1/branches/{branch}/run", json={"run_status": status},
                                   headers=headers, timeout=10)
            assert answer.status_code == 401
        answer = requests.post(server.url + "/admin/v1/dashboard/links", headers=headers, timeout=10)
        assert answer.status_code == 401
    assert get(server, f"/admin/v1/branches/{branch}")["run_status"] == "start"


def test_a_login_code_trades_once_for_the_admin_token(inprocess_server):
    server, _ = inprocess_server(1)
    answer = server.admin("POST", "/admin/v1/dashboard/links")
    assert answer.status_code == 201
    url = answer.json()["data"]["url"]
    assert url.startswith(server.url + "/#login=") and server.admin_token not in url
    code = url.split("#login=", 1)[1]
    first = requests.post(server.url + "/admin/v1/dashboard/login", json={"code": code}, timeout=10)
    assert first.status_code == 200 and first.json()["data"]["token"] == server.admin_token
    again = requests.post(server.url + "/admin/v1/dashboard/login", json={"code": code}, timeout=10)
    assert again.status_code == 401 and "already used or has expired" in again.json()["error"]
    forged = requests.post(server.url + "/admin/v1/dashboard/login", json={"code": code[:-2] + "xx"}, timeout=10)
    assert forged.status_code == 401


def test_live_history_metrics_and_events_follow_the_rounds(inprocess_server):
    server, leaves = inprocess_server(3)
    branch = leaves[0]["branch_id"]
    stream = Stream(server)
    live = get(server, f"/admin/v1/branches/{branch}/live")
    assert live["round_index"] == 0 and live["uploaded"] == [] and len(live["missing"]) == 3
    upload(leaves[0], server, 10, 1.0)
    event = stream.next("upload")
    assert event["at"] > 0 and {k: v for k, v in event.items() if k != "at"} == {
        "kind": "upload", "branch_id": branch, "leaf": "leaf_1", "run_number": 1, "round_index": 0,
        "payload_kind": "federated_learning"}
    live = get(server, f"/admin/v1/branches/{branch}/live")
    states = {leaf["name"]: leaf["state"] for leaf in live["leaves"]}
    assert states == {"leaf_1": "uploaded", "leaf_2": "missing", "leaf_3": "missing"}
    assert live["leaves"][0]["last_seen"] is not None and live["leaves"][1]["last_seen"] is None
    with pytest.raises(ApiError):  # a layout that does not fit the round is refused, with the reason shown
        with Client(leaves[1], host=server.url, transport="none") as client:
            client.upload_weights(5, [np.zeros(3, np.float32)])
    refused = stream.next("refused")
    assert refused["leaf"] == "leaf_2" and refused["reason"]
    row = next(leaf for leaf in get(server, f"/admin/v1/branches/{branch}/live")["leaves"] if leaf["name"] == "leaf_2")
    assert row["state"] == "refused" and row["reason"] == refused["reason"]

    aggregates = []
    for number, values in enumerate(([0.5, 0.7, 0.9], [0.6, 0.8, 1.0])):
        for leaf, weighting in zip(leaves, (10, 20, 30)):
            if not (number == 0 and leaf is leaves[0]):
                upload(leaf, server, weighting, float(number))
        aggregates.append(stream.next("aggregation_status")["aggregation_id"])
        for leaf, value in zip(leaves, values):
            metrics(leaf, server, aggregates[-1], "test", accuracy=value, loss=1 - value)
            metrics(leaf, server, aggregates[-1], "train", accuracy=value / 2)
        assert stream.next("metrics")["mode"] == "test"
    history = get(server, f"/admin/v1/branches/{branch}/history")
    assert [r["round_index"] for r in history["rounds"]] == [0, 1] and history["runs"] == [1]
    assert [r["leaves"] for r in history["rounds"]] == [3, 3]
    assert [r["total_weighting"] for r in history["rounds"]] == [60, 60]
    assert [r["aggregate_id"] for r in history["rounds"]] == aggregates
    assert all(r["aggregate_size"] > 0 and r["round_s"] >= r["aggregation_s"] >= 0 for r in history["rounds"])

    summary = get(server, f"/admin/v1/branches/{branch}/metrics/summary")
    series = {(s["mode"], s["metric"]): s for s in summary["series"]}
    assert set(series) == {("test", "accuracy"), ("test", "loss"), ("train", "accuracy")}
    accuracy = series[("test", "accuracy")]
    assert accuracy["rounds"] == [0, 1]
    # weighted by each leaf's upload weighting (its sample count): (0.5*10 + 0.7*20 + 0.9*30) / 60
    assert accuracy["mean"] == pytest.approx([46 / 60, 52 / 60])
    assert accuracy["per_leaf"] == {"leaf_1": [0.5, 0.6], "leaf_2": [0.7, 0.8], "leaf_3": [0.9, 1.0]}

    server.set_run(branch, "pause")
    assert stream.next("run_status")["run_status"] == "pause"
    overview = get(server, "/admin/v1/overview")
    assert overview["branches"][0]["run_status"] == "pause" and overview["branches"][0]["round_index"] == 2

    # a second run: its summary holds its own round only, and run 1's is unchanged
    server.set_run(branch, "stop")
    server.set_run(branch, "start")
    for leaf in leaves:
        upload(leaf, server, 10, 5.0)
    second = stream.next("aggregation_status")["aggregation_id"]
    for leaf in leaves:
        metrics(leaf, server, second, "test", accuracy=0.25)
    latest = {(s["mode"], s["metric"]): s for s in get(server, f"/admin/v1/branches/{branch}/metrics/summary")["series"]}
    assert latest[("test", "accuracy")]["rounds"] == [0] and set(latest) == {("test", "accuracy")}
    assert latest[("test", "accuracy")]["per_leaf"] == {"leaf_1": [0.25], "leaf_2": [0.25], "leaf_3": [0.25]}
    first = get(server, f"/admin/v1/branches/{branch}/metrics/summary?run=1")
    assert {(s["mode"], s["metric"]): s for s in first["series"]}[("test", "accuracy")]["per_leaf"] == \
        accuracy["per_leaf"]


def test_an_aggregate_downloads_through_a_signed_url_and_no_answer_holds_a_leaf_token(inprocess_server):
    server, leaves = inprocess_server(2)
    branch = leaves[0]["branch_id"]
    for leaf in leaves:
        upload(leaf, server, 1, 2.0)
    [row] = wait_until(lambda: get(server, f"/admin/v1/branches/{branch}/history")["rounds"], 10, "the aggregate")
    link = get(server, f"/admin/v1/aggregates/{row['aggregate_id']}/download")
    assert server.admin_token not in link["download_url"]
    blob = requests.get(link["download_url"], timeout=10)
    assert blob.status_code == 200 and len(blob.content) == row["aggregate_size"]
    assert server.admin("GET", "/admin/v1/aggregates/not-a-file/download").status_code == 404
    answers = [server.admin("GET", p.format(b=branch)).text for p in ROUTES[:-1]]
    for leaf in leaves:
        assert not any(leaf["session_token"] in text for text in answers)


def test_the_page_files_are_served_and_nothing_else(inprocess_server):
    server, _ = inprocess_server(1)
    for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css"),
                       ("vendor/uplot/uPlot.iife.min.js", "text/javascript")):
        answer = requests.get(f"{server.url}/dashboard/static/{name}", timeout=10)
        assert answer.status_code == 200 and answer.headers["Content-Type"].startswith(kind), name
    for name in ("vendor/uplot/LICENSE", "../store.py", "nothing.js"):
        assert requests.get(f"{server.url}/dashboard/static/{name}", timeout=10).status_code in (400, 404), name


def test_status_json_carries_the_aggregated_metrics(inprocess_server, capsys):
    from branchkey_integrations.cli import main

    server, leaves = inprocess_server(2)
    for leaf, weighting in zip(leaves, (1, 3)):
        upload(leaf, server, weighting, 1.0)
    [row] = wait_until(lambda: get(server, f"/admin/v1/branches/{leaves[0]['branch_id']}/history")["rounds"], 10,
                       "the aggregate")
    for leaf, value in zip(leaves, (0.2, 0.6)):
        metrics(leaf, server, row["aggregate_id"], "test", accuracy=value)
    capsys.readouterr()
    assert main(["status", "--json", "--data-dir", str(server.server.store.data_dir)]) == 0
    [branch] = json.loads(capsys.readouterr().out)["branches"]
    assert branch["metrics"]["latest"] == {"test/accuracy": {"round": 1, "round_index": 0, "mean": pytest.approx(0.5)}}
    assert branch["metrics"]["series"] == [{"mode": "test", "metric": "accuracy", "rounds": [0],
                                            "mean": [pytest.approx(0.5)], "round_numbers": [1]}]
