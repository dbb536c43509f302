"""What the route fuzzer (test_fuzz.py) found answered 500, kept as plain regression tests: each is now a
400 that names the problem."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests

from branchkey_integrations.core import wire


def post(live, path: str, raw: bytes, headers: dict[str, str]) -> requests.Response:
    return requests.post(live.url + path, data=raw, headers=headers, timeout=10)


@pytest.mark.parametrize(("target", "raw", "named"), [
    ("trees", b'{"name": "\\ud800"}', "surrogate"),  # valid JSON, no UTF-8: SQLite could not store it
    ("branches", b'{"name": "x\\udfff"}', "surrogate"),
    ("trees", b'{"name": "t", "owner_id": [null]}', "owner_id"),  # SQLite cannot bind a list
    ("branches", b'{"name": "b", "min_leaves": 99999999999999999999999}', "min_leaves"),  # overflows SQLite
    ("trees", b'{"a":' * 5000, "not JSON"),  # nesting deeper than the parser's recursion limit
])
def test_admin_bodies_that_answered_500_are_refused_with_400(live, target, raw, named) -> None:
    branch, (leaf, _) = live.make_branch(2)
    path = "/admin/v1/trees" if target == "trees" else f"/admin/v1/trees/{branch['tree_id']}/branches"
    answer = post(live, path, raw, {"Authorization": f"Bearer {live.admin_token}"})
    assert answer.status_code == 400 and named in answer.json()["error"], answer.text


def test_leaf_texts_with_a_lone_surrogate_are_refused_with_400(live) -> None:
    branch, (leaf, _) = live.make_branch(2)
    metrics = {"mode": "test", "leaf_id": leaf["id"], "branch_id": leaf["branch_id"], "tree_id": leaf["tree_id"]}
    raw = json.dumps({**metrics, "data": "{}", "aggregation_id": "\ud800"}).encode()
    answer = post(live, "/api/v1/performance/analysis", raw, live.auth(leaf))
    assert answer.status_code == 400 and "surrogate" in answer.json()["error"]
    upload = live.upload(leaf, wire.encode([np.ones(3, np.float32)], 1.0), data=json.dumps({"metadata": "\udc80"}))
    assert upload.status_code == 400 and "Part 'data'" in upload.json()["error"]
    assert live.upload(leaf, wire.encode([np.ones(3, np.float32)], 1.0)).status_code == 201


def test_numbers_past_sqlite_or_pythons_digit_limit_are_refused_with_400(live) -> None:
    branch, (leaf, _) = live.make_branch(2)
    admin = {"Authorization": f"Bearer {live.admin_token}"}
    summary = requests.get(f"{live.url}/admin/v1/branches/{branch['id']}/metrics/summary?run={2**63}", headers=admin,
                           timeout=10)
    assert summary.status_code == 400 and "run" in summary.json()["error"]  # was 500: SQLite overflow
    blob = requests.get(f"{live.url}/api/v1/file/blob/x?expires={'9' * 5000}&signature=s", timeout=10)
    assert blob.status_code == 403  # was 500: int() of more than 4300 digits
    upload = live.upload(leaf, wire.encode([np.ones(3, np.float32)], 1.0), headers={"x-bk-file-size": "9" * 5000})
    assert upload.status_code == 400 and "x-bk-file-size" in upload.json()["error"]


@pytest.mark.parametrize("header", [
    b'Content-Disposition: form-data; name="file"\x01; filename="w.npz"',  # a control character in a value
    b'Content-Di\x7fsposition: form-data; name="file"',  # ... in a name
    b'Content-Disposition: form-data; name="file"\r\n folded: 1',  # an obsolete folded line
])
def test_a_multipart_part_header_no_header_may_hold_is_refused_with_400(live, header: bytes) -> None:
    """These answered 500: aiohttp's part-header parser raises its own InvalidHeader, which is no ValueError."""
    branch, (leaf, _) = live.make_branch(2)
    body = b"--b0undary\r\n" + header + b"\r\n\r\nPK\x03\x04\r\n--b0undary--\r\n"
    answer = post(live, "/api/v1/file/upload", body,
                  {**live.auth(leaf), "Content-Type": "multipart/form-data; boundary=b0undary"})
    assert answer.status_code == 400 and "Malformed multipart body" in answer.json()["error"], answer.text
    progress = requests.get(f"{live.url}/api/v1/round/{branch['id']}", headers=live.auth(leaf), timeout=10).json()
    assert progress["data"]["uploaded"] == [] and "Malformed" in progress["data"]["refused"][0]["reason"]
    assert live.upload(leaf, wire.encode([np.ones(3, np.float32)], 1.0)).status_code == 201


def test_a_body_that_cannot_be_decoded_is_refused_with_400(live) -> None:
    """A Content-Encoding whose bytes do not decode answered 500 on every route that reads a JSON body."""
    branch, (leaf, _) = live.make_branch(2)
    for path, headers in (("/api/v1/performance/analysis", live.auth(leaf)),
                          ("/admin/v1/trees", {"Authorization": f"Bearer {live.admin_token}"}),
                          ("/admin/v1/dashboard/login", {})):
        answer = post(live, path, b"not gzip at all", {**headers, "Content-Encoding": "gzip"})
        assert answer.status_code == 400 and "content-encoding" in answer.json()["error"], (path, answer.text)
