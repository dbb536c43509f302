"""What a leaf's metrics may cost the server: a size limit per report, a number of reports per leaf and
round, and an admin listing that comes in pages (issue 22, defect 7: 50 posts of 4 MB grew the store by
214 MB and the listing answered all of it at once)."""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Iterator

import numpy as np
import pytest
import requests

from branchkey_integrations.core import wire
from branchkey_integrations.core.errors import QuotaExceededError, RecordNotFoundError
from branchkey_integrations.server.state import MAX_METRICS_BYTES, MAX_METRICS_PER_ROUND
from branchkey_integrations.server.store import DB_NAME, Store

LAYERS = [np.ones(3, np.float32)]


def report(leaf: dict[str, str], data: Any, aggregation_id: str | None = None, mode: str = "test") -> dict[str, Any]:
    return {"mode": mode, "aggregation_id": aggregation_id, "leaf_id": leaf["id"], "branch_id": leaf["branch_id"],
            "tree_id": leaf["tree_id"], "data": data}


def post(live, leaf: dict[str, str], body: bytes | Iterator[bytes]) -> requests.Response:
    # the official clients send a str body without a Content-Type; an iterator goes chunked (no Content-Length)
    return requests.post(live.url + "/api/v1/performance/analysis", data=body, headers=live.auth(leaf), timeout=10)


def stored(live, branch_id: str) -> list[dict[str, Any]]:
    return live.thread.server.store.list_metrics(branch_id, limit=10_000)[0]


def test_a_report_over_the_size_limit_is_refused_with_413_and_not_stored(live) -> None:
    branch, (leaf, _) = live.make_branch(2)
    text = json.dumps({f"metric_{i}": 0.5 for i in range(MAX_METRICS_BYTES // 10)})  # numbers, but too many
    body = json.dumps(report(leaf, text)).encode()
    assert len(body) > MAX_METRICS_BYTES
    refused = post(live, leaf, body)
    assert refused.status_code == 413 and f"({MAX_METRICS_BYTES} bytes)" in refused.json()["error"], refused.text
    chunked = post(live, leaf, iter([body[:1000], body[1000:]]))  # no Content-Length: refused as its bytes arrive
    assert chunked.status_code == 413 and f"({MAX_METRICS_BYTES} bytes)" in chunked.json()["error"], chunked.text
    assert stored(live, branch["id"]) == []
    fits = json.dumps(report(leaf, json.dumps({f"class_{i:03d}_accuracy": 0.123456789 for i in range(100)})))
    assert len(fits) < MAX_METRICS_BYTES and post(live, leaf, fits.encode()).status_code == 201


def test_a_leaf_sends_a_bounded_number_of_reports_per_round(live) -> None:
    branch, (a, b) = live.make_branch(2)
    for i in range(MAX_METRICS_PER_ROUND):  # without an aggregation id: they count in the open round
        assert post(live, a, json.dumps(report(a, {"step": i}, mode="non-federated")).encode()).status_code == 201
    refused = post(live, a, json.dumps(report(a, {"step": -1}, mode="non-federated")).encode())
    assert refused.status_code == 429, refused.text
    assert f"({MAX_METRICS_PER_ROUND})" in refused.json()["error"] and a["id"] in refused.json()["error"]
    assert post(live, b, json.dumps(report(b, {"step": 0})).encode()).status_code == 201  # another leaf's own count
    for leaf in (a, b):
        assert live.upload(leaf, wire.encode(LAYERS, 1.0)).status_code == 201
    aggregate = live.wait_aggregate(branch["id"])
    # a report on the aggregate counts in the aggregate's round, which the leaf has used up; the next round is new
    assert post(live, a, json.dumps(report(a, {"accuracy": 0.5}, aggregate)).encode()).status_code == 429
    assert post(live, a, json.dumps(report(a, {"loss": 0.5}, mode="train")).encode()).status_code == 201
    rows = stored(live, branch["id"])
    assert len(rows) == MAX_METRICS_PER_ROUND + 2
    assert {(row["leaf_id"], row["run_number"], row["round_index"]) for row in rows} == {
        (a["id"], 1, 0), (b["id"], 1, 0), (a["id"], 1, 1)}


def test_the_admin_metrics_listing_comes_in_pages(live) -> None:
    branch, (a, b) = live.make_branch(2)
    for i in range(5):
        leaf = (a, b)[i % 2]
        assert post(live, leaf, json.dumps(report(leaf, {"step": i}, mode="non-federated")).encode()).status_code == 201
    path = f"/admin/v1/branches/{branch['id']}/metrics"
    pages, query = [], "?limit=2"
    while query is not None:
        page = live.admin("GET", path + query, expect=200)
        pages.append(page["metrics"])
        query = None if page["next"] is None else f"?limit=2&after={page['next']}"
    assert [len(page) for page in pages] == [2, 2, 1]
    assert [json.loads(row["data"])["step"] for page in pages for row in page] == [0, 1, 2, 3, 4]  # oldest first
    everything = live.admin("GET", path, expect=200)  # the default page holds them all
    assert everything["next"] is None and [row["id"] for row in everything["metrics"]] == \
        [row["id"] for page in pages for row in page]
    for bad in ("?limit=0", "?limit=100000", "?after=-1", "?after=x"):
        answer = live.admin("GET", path + bad, expect=400)
        assert bad[1:].split("=")[0] in answer["error"], answer


def test_a_store_made_before_the_limits_opens_with_its_metrics(tmp_path) -> None:
    """Rows of a store without the metrics' round columns stay listed; new reports are counted per round."""
    store = Store(tmp_path)
    tree = store.create_tree("t")
    branch = store.create_branch(tree["id"], "b")
    [leaf] = store.create_leaves(branch.id, 1)
    store.close()
    with sqlite3.connect(tmp_path / DB_NAME) as conn:  # the metrics table as earlier versions made it
        conn.execute("DROP INDEX metrics_leaf_round")
        conn.execute("ALTER TABLE metrics DROP COLUMN round_index")
        conn.execute("ALTER TABLE metrics DROP COLUMN run_number")
        conn.execute("INSERT INTO metrics VALUES ('old', 'test', NULL, ?, ?, ?, '{\"accuracy\": 0.5}', '2024-01-01')",
                     (leaf.id, branch.id, tree["id"]))
    store = Store(tmp_path)
    try:
        store.add_metric(mode="train", aggregation_id=None, leaf=leaf, data='{"loss": 1}', max_per_round=1)
        with pytest.raises(QuotaExceededError, match=r"round 1 of run 1"):
            store.add_metric(mode="train", aggregation_id=None, leaf=leaf, data='{"loss": 1}', max_per_round=1)
        rows, cursor = store.list_metrics(branch.id)
        assert cursor is None
        assert [(row["mode"], row["run_number"], row["round_index"]) for row in rows] == [
            ("test", None, None), ("train", 1, 0)]
    finally:
        store.close()


def test_the_store_counts_a_report_only_in_a_round_it_can_name(tmp_path) -> None:
    store = Store(tmp_path)
    try:
        tree = store.create_tree("t")
        [leaf] = store.create_leaves(store.create_branch(tree["id"], "b").id, 1)
        with pytest.raises(RecordNotFoundError, match="no-such-aggregate"):
            store.add_metric(mode="test", aggregation_id="no-such-aggregate", leaf=leaf, data="{}", max_per_round=1)
        assert store.list_metrics(leaf.branch_id) == ([], None)
    finally:
        store.close()
