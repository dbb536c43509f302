"""A leaf's view of the open round (GET ROUND_PATH), the upload's 201 answer, and refused uploads by leaf name."""

from __future__ import annotations

import json
import logging
from datetime import datetime

import numpy as np
import pytest
import requests

from branchkey_integrations.core import wire
from branchkey_integrations.core.protocol import ROUND_PATH
from branchkey_integrations.server.progress import round_progress
from branchkey_integrations.server.store import Store


def layers(value: float) -> list[np.ndarray]:
    return [np.full((2, 3), value, np.float32), np.arange(3, dtype=np.int64)]


def progress(live, leaf, branch_id: str | None = None) -> requests.Response:
    path = ROUND_PATH.format(branch_id=branch_id or leaf["branch_id"])
    return requests.get(live.url + path, headers=live.auth(leaf), timeout=10)


def data(live, leaf) -> dict:
    answer = progress(live, leaf)
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


def test_round_progress_names_uploaded_missing_and_refused_leaves_until_the_round_closes(live, caplog) -> None:
    caplog.set_level(logging.INFO, logger="branchkey_integrations.server")
    branch, (a, b, c) = live.make_branch(3)
    empty = data(live, a)
    assert empty == {
        "run_status": "start", "run_number": 1, "round_index": 0, "required": 3, "uploaded": [],
        "missing": ["leaf_1", "leaf_2", "leaf_3"], "refused": [], "opened_at": empty["opened_at"],
        "deadline_at": None, "latest_aggregate": None, "strategy": "fedavg", "strategy_params": {},
        "kind": "federated_learning", "analytics": None,
    }
    datetime.fromisoformat(empty["opened_at"])

    accepted = live.upload(a, wire.encode(layers(1), 1.0))
    assert accepted.status_code == 201, accepted.text
    assert {k: v for k, v in accepted.json()["data"].items() if k != "file_id"} == {"run_number": 1, "round_index": 0,
                                                                                    "kind": "federated_learning"}
    assert (data(live, b)["uploaded"], data(live, b)["missing"]) == (["leaf_1"], ["leaf_2", "leaf_3"])

    wrong = live.upload(b, wire.encode([np.zeros(4, np.float32)], 1.0))  # another model: refused, named
    assert wrong.status_code == 400, wrong.text
    [refusal] = data(live, a)["refused"]
    assert refusal["leaf"] == "leaf_2" and "layer" in refusal["reason"] and refusal["reason"] in wrong.json()["error"]
    datetime.fromisoformat(refusal["at"])
    assert any("leaf_2" in r.getMessage() and "refused" in r.getMessage()
               and "now round 1 of run 1: 1/3 uploaded; missing leaf_2, leaf_3" in r.getMessage() for r in caplog.records)
    assert any("leaf_1" in r.getMessage() and "uploaded" in r.getMessage() for r in caplog.records)

    garbage = live.upload(b, b"not an archive")  # the latest refusal per leaf replaces the earlier one
    assert garbage.status_code == 400
    [refusal] = data(live, a)["refused"]
    assert refusal["leaf"] == "leaf_2" and "NPZ" in refusal["reason"]

    assert live.upload(b, wire.encode(layers(2), 1.0)).status_code == 201  # accepted: the refusal is gone
    now = data(live, c)
    assert (now["uploaded"], now["missing"], now["refused"]) == (["leaf_1", "leaf_2"], ["leaf_3"], [])

    assert live.upload(c, wire.encode([np.zeros(4, np.float32)], 1.0)).status_code == 400
    assert [r["leaf"] for r in data(live, a)["refused"]] == ["leaf_3"]
    last = live.upload(c, wire.encode(layers(3), 1.0))
    assert last.status_code == 201
    aggregate_id = live.wait_aggregate(branch["id"])
    after = live.wait_for(lambda: (d := data(live, a))["round_index"] == 1 and d)
    assert after["latest_aggregate"] == {"aggregation_id": aggregate_id, "run_number": 1, "round_index": 0,
                                         "strategy": "fedavg", "strategy_note": None}
    assert (after["uploaded"], after["refused"], len(after["missing"])) == ([], [], 3)
    for leaf in (a, b, c):  # names only: no token in any answer
        assert leaf["session_token"] not in progress(live, a).text


def test_round_progress_is_for_leaves_of_the_branch_only(live) -> None:
    branch, (a, _) = live.make_branch(2)
    other_branch, (stranger, _) = live.make_branch(2)
    refused = progress(live, stranger, branch["id"])
    assert refused.status_code == 403 and branch["id"] in refused.json()["error"]
    anonymous = requests.get(live.url + ROUND_PATH.format(branch_id=branch["id"]), timeout=10)
    assert anonymous.status_code == 401
    assert progress(live, a).status_code == 200


def test_round_progress_shows_the_deadline_and_a_stopped_run(live) -> None:
    branch, (a, b) = live.make_branch(2, round_deadline_s=600)
    assert data(live, a)["deadline_at"] is None  # the deadline counts from the round's first upload
    assert live.upload(a, wire.encode(layers(1), 1.0)).status_code == 201
    current = live.thread.server.store.open_round(branch["id"])
    deadline = datetime.fromisoformat(data(live, b)["deadline_at"]).timestamp()
    assert deadline == pytest.approx(current.first_upload_at + 600, abs=0.01)

    live.admin("POST", f"/admin/v1/branches/{branch['id']}/run", {"run_status": "stop"}, expect=200)
    stopped = data(live, b)
    assert (stopped["run_status"], stopped["round_index"], stopped["uploaded"], stopped["missing"]) == \
        ("stop", None, [], [])
    refused = live.upload(b, wire.encode(layers(1), 1.0))  # a stopped run is not the leaf's fault
    assert refused.status_code == 409 and data(live, a)["refused"] == []


def test_refusals_are_durable_and_belong_to_the_open_round(tmp_path) -> None:
    store = Store(tmp_path / "data")
    tree = store.create_tree("t")
    branch = store.create_branch(tree["id"], "b")
    [leaf] = store.create_leaves(branch.id, 1)
    assert store.record_refusal(leaf, "wrong model") == (1, 0)
    store.close()
    reopened = Store(tmp_path / "data")
    view = round_progress(reopened, branch.id)
    assert [(r.leaf, r.reason) for r in view.refused] == [(leaf.name, "wrong model")]
    assert view.summary() == "round 1 of run 1: 0/1 uploaded; missing leaf_1; refused leaf_1 (wrong model)"
    reopened.set_run_status(branch.id, "stop")
    assert reopened.record_refusal(leaf, "too late") is None  # no open round: nothing to show
    assert round_progress(reopened, branch.id).summary() == "run 1 stopped after 0 aggregated rounds"
    reopened.close()


def test_status_names_the_open_rounds_uploaded_missing_and_refused_leaves(live, capsys) -> None:
    from branchkey_integrations.cli import main

    branch, (a, b) = live.make_branch(2)
    assert live.upload(a, wire.encode(layers(1), 1.0)).status_code == 201
    assert live.upload(b, wire.encode([np.zeros(4, np.float32)], 1.0)).status_code == 400
    data_dir = str(live.thread.server.store.data_dir)
    assert main(["status", "--data-dir", data_dir]) == 0
    out = capsys.readouterr().out
    assert "  round 1 of run 1: 1/2 uploaded (leaf_1); missing leaf_2\n" in out
    [refused] = [line for line in out.splitlines() if line.startswith("  refused ")]
    assert refused.startswith("  refused leaf_2 at ") and "layer" in refused

    assert main(["status", "--json", "--data-dir", data_dir]) == 0
    [listed] = [item for item in json.loads(capsys.readouterr().out)["branches"] if item["id"] == branch["id"]]
    assert (listed["progress"]["uploaded"], listed["progress"]["missing"]) == (["leaf_1"], ["leaf_2"])
    assert [r["leaf"] for r in listed["progress"]["refused"]] == ["leaf_2"]


def test_a_brief_round_view_counts_the_leaves_without_naming_them(live) -> None:
    from branchkey_integrations.core import Client

    branch, (a, b, c) = live.make_branch(3)
    brief_path = ROUND_PATH.format(branch_id=a["branch_id"]) + "?brief=1"

    def brief() -> dict:
        answer = requests.get(live.url + brief_path, headers=live.auth(a), timeout=10)
        assert answer.status_code == 200, answer.text
        return answer.json()["data"]

    assert brief()["uploaded_count"] == 0
    assert live.upload(a, wire.encode(layers(1), 1.0)).status_code == 201
    assert live.upload(b, wire.encode([np.zeros(4, np.float32)], 1.0)).status_code == 400  # a refusal: not listed
    now, full = brief(), data(live, a)
    assert now["uploaded_count"] == 1 and not {"uploaded", "missing", "refused"} & set(now)
    assert {k: v for k, v in full.items() if k not in ("uploaded", "missing", "refused")} == \
        {k: v for k, v in now.items() if k != "uploaded_count"}
    for leaf in (b, c):
        assert live.upload(leaf, wire.encode(layers(2), 1.0)).status_code == 201
    aggregate_id = live.wait_aggregate(branch["id"])
    after = live.wait_for(lambda: (d := brief())["round_index"] == 1 and d)
    assert (after["uploaded_count"], after["latest_aggregate"]["aggregation_id"]) == (0, aggregate_id)
    with Client(a, host=live.url, transport="none") as client:  # the client's brief look: a view without names
        view = client.get_round(brief=True)
    assert (view.uploaded, view.missing, view.latest_aggregate.aggregation_id) == ((), (), aggregate_id)
    wrong = requests.get(live.url + ROUND_PATH.format(branch_id=a["branch_id"]) + "?brief=yes",
                         headers=live.auth(a), timeout=10)
    assert wrong.status_code == 400 and "brief" in wrong.json()["error"]


def test_the_leaf_side_parses_the_servers_round_view(live) -> None:
    from branchkey_integrations.core.progress import parse_round_view

    branch, (a, b) = live.make_branch(2)
    for leaf in (a, b):
        assert live.upload(leaf, wire.encode(layers(1), 1.0)).status_code == 201
    aggregate_id = live.wait_aggregate(branch["id"])
    assert live.upload(b, wire.encode([np.zeros(4, np.float32)], 1.0)).status_code == 400
    view = live.wait_for(lambda: (v := parse_round_view(data(live, a))).round_index == 1 and v)
    assert (view.run_number, view.uploaded, view.missing, view.required) == (1, (), ("leaf_1", "leaf_2"), 2)
    assert [r.leaf for r in view.refused] == ["leaf_2"]
    assert (view.latest_aggregate.aggregation_id, view.latest_aggregate.round_index) == (aggregate_id, 0)


def test_a_store_that_cannot_record_a_refusal_still_answers_the_leaf_with_its_reason(live, monkeypatch, caplog) -> None:
    import sqlite3

    def full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    branch, (a, b) = live.make_branch(2)
    assert live.upload(a, wire.encode(layers(1), 1.0)).status_code == 201
    monkeypatch.setattr(live.thread.server.store, "record_refusal", full)  # a fault injected into the real store
    wrong = live.upload(b, wire.encode([np.zeros(4, np.float32)], 1.0))
    assert wrong.status_code == 400 and "layers do not match" in wrong.json()["error"]
    assert any("not recorded: database or disk is full" in r.getMessage() for r in caplog.records)
    assert data(live, a)["refused"] == []
