"""An analytics round's result as ``branchkey-local status`` (text and ``--json``) and the dashboard's JSON show it,
against a real in-process server fed real ``federated_analytics`` uploads over HTTP: per column the statistics
derived from the combined bundle (checked against NumPy on the pooled values), how many leaves contributed, the
other fields with their operations, the branch's field operations, and a note where the combined file is gone."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
import requests

from branchkey_integrations.core import wire
from branchkey_integrations.server.analytics_report import PREVIEW_VALUES, analytics_result
from branchkey_integrations.server.openapi import openapi_document

from ..conftest import cli, wait_until

SITES = [[10.0, 10.0, 10.0], [90.0, 90.0, np.nan], [50.0]]
POOLED = np.array([10.0, 10.0, 10.0, 90.0, 90.0, 50.0])


def bundle(values: list[float], column: str = "age") -> dict[str, np.ndarray]:
    """What the official client's save_analytics sends for one raw column (NaNs omitted and counted)."""
    raw = np.asarray(values, np.float64)
    kept = raw[~np.isnan(raw)]
    return {f"{column}_n": np.array([kept.size], np.int64), f"{column}_sum": np.array([kept.sum()]),
            f"{column}_sumsq": np.array([np.square(kept).sum()]), f"{column}_min": np.array([kept.min()]),
            f"{column}_max": np.array([kept.max()]), f"{column}_nan": np.array([raw.size - kept.size], np.int64)}


def send(server, leaf: dict[str, str], fields: dict[str, object]) -> None:
    answer = requests.post(server.url + "/api/v1/file/upload",
                           files={"file": ("a.npz", wire.prepare_fields(fields).getvalue())},
                           headers={"Authorization": f"Bearer {leaf['id']}:{leaf['session_token']}"}, timeout=30)
    assert answer.status_code == 201, answer.text


def set_ops(server, branch_id: str, ops: dict[str, str]) -> None:
    answer = server.admin("PUT", f"/admin/v1/branches/{branch_id}/field-ops", json={"field_ops": ops})
    assert answer.status_code == 200, answer.text


DOCUMENT = openapi_document()


def result_route(server, branch_id: str) -> dict:
    """The dashboard's JSON, checked against its OpenAPI schema."""
    answer = server.admin("GET", f"/admin/v1/branches/{branch_id}/analytics/result")
    assert answer.status_code == 200, answer.text
    schema = DOCUMENT["paths"]["/admin/v1/branches/{branch_id}/analytics/result"]["get"]["responses"]["200"]
    jsonschema.validate(answer.json(), {"allOf": [schema["content"]["application/json"]["schema"]],
                                        "components": DOCUMENT["components"]})
    return answer.json()["data"]


def combined_round(server, leaves: list[dict[str, str]]) -> dict:
    """Three leaves' bundles of 'age' and three configured fields, combined; the dashboard route's answer."""
    branch_id = leaves[0]["branch_id"]
    set_ops(server, branch_id, {"labels": "sum", "image_size": "must_match", "site": "must_match"})
    for index, (leaf, values) in enumerate(zip(leaves, SITES)):
        send(server, leaf, {**bundle(values), "labels": np.arange(40) + index, "image_size": np.array([8, 8]),
                            "site": np.array([np.nan, 1.5])})
    return wait_until(lambda: (result_route(server, branch_id) or {}).get("result") and result_route(server, branch_id),
                      30, "the analytics round to be combined")


def test_the_result_shows_each_column_s_statistics_and_the_other_fields(inprocess_server) -> None:
    server, leaves = inprocess_server(3)
    data = combined_round(server, leaves)
    result = data["result"]
    assert (result["run_number"], result["round_index"], result["contributors"], result["note"]) == (1, 0, 3, None)
    assert data["field_ops"] == result["field_ops"] == {"image_size": "must_match", "labels": "sum",
                                                        "site": "must_match"}
    age = result["columns"]["age"]
    assert (age["count"], age["nan"], age["leaves"]) == (6, 1, 3)
    assert age["mean"] == POOLED.mean() and age["std"] == pytest.approx(POOLED.std(), rel=1e-12)
    assert age["variance"] == pytest.approx(POOLED.var(), rel=1e-12)
    assert (age["min"], age["max"], age["range"], age["completeness"]) == (10, 90, 80, 6 / 7)
    fields = {item["name"]: item for item in result["fields"]}
    assert set(fields) == {"labels", "image_size", "site"}  # the bundle's six entries are the column, not fields
    labels = fields["labels"]
    assert (labels["op"], labels["shape"], labels["truncated"]) == ("sum", [40], True)
    assert labels["values"] == [3 * i + 3 for i in range(PREVIEW_VALUES)]
    assert fields["image_size"]["values"] == [8, 8] and fields["image_size"]["truncated"] is False
    assert fields["site"]["values"] == ["nan", 1.5]  # JSON holds no NaN: the page gets text
    # the same through the store directly (what status reads)
    assert analytics_result(server.server.store, leaves[0]["branch_id"]) == result


def test_status_prints_the_table_beside_the_learning_rounds_and_json_has_it(inprocess_server) -> None:
    server, leaves = inprocess_server(3)
    combined_round(server, leaves)
    data_dir = str(server.server.store.data_dir)
    text = cli("status", "--data-dir", data_dir).stdout
    lines = [line.strip() for line in text.splitlines()]
    header = [line.split() for line in lines].index(
        ["column", "count", "mean", "std", "min", "max", "range", "completeness", "leaves"])
    assert lines[header + 1].split() == ["age", "6", "43.3333", "35.9011", "10", "90", "80", "0.8571", "3"]
    assert f"{POOLED.mean():.4f}" == "43.3333" and f"{POOLED.std():.4f}" == "35.9011"
    assert lines.index("run 1 round 1: open, 0 upload(s), aggregate -") < header  # the learning rounds, then this
    assert "latest analytics result: run 1 analytics round 1, 3 leaves" in text
    assert "field operations: image_size=must_match, labels=sum, site=must_match" in lines
    assert any(line.startswith("field labels (sum, <i8[40]): [3, 6, 9,") and line.endswith(", ...]") for line in lines)
    document = json.loads(cli("status", "--json", "--data-dir", data_dir).stdout)
    analytics = document["branches"][0]["analytics"]
    assert analytics["result"]["columns"]["age"]["mean"] == POOLED.mean()
    assert analytics["result"]["columns"]["age"]["leaves"] == 3
    assert analytics["field_ops"]["labels"] == "sum"
    assert analytics["progress"]["latest_aggregate"]["aggregation_id"] == analytics["result"]["aggregation_id"]


def test_without_a_result_the_field_operations_show_and_a_removed_file_is_said(inprocess_server) -> None:
    server, leaves = inprocess_server(2)
    branch_id = leaves[0]["branch_id"]
    set_ops(server, branch_id, {"labels": "sum"})
    assert result_route(server, branch_id) == {"branch_id": branch_id, "field_ops": {"labels": "sum"}, "result": None}
    data_dir = str(server.server.store.data_dir)
    text = cli("status", "--data-dir", data_dir).stdout
    assert "field operations: labels=sum" in text and "column  count" not in text
    assert json.loads(cli("status", "--json", "--data-dir", data_dir).stdout)["branches"][0]["analytics"] == {
        "field_ops": {"labels": "sum"}, "progress": None, "result": None}
    for leaf, values in zip(leaves, SITES):
        send(server, leaf, {**bundle(values), "labels": np.array([1])})
    result = wait_until(lambda: result_route(server, branch_id)["result"], 30, "the analytics round")
    store = server.server.store
    store.file_path(store.analytics_file(result["aggregation_id"])).unlink()
    gone = result_route(server, branch_id)["result"]
    assert gone["columns"] == {} and gone["fields"] == [] and "is missing from the data directory" in gone["note"]
    assert gone["contributors"] == 2 and gone["aggregation_id"] == result["aggregation_id"]
    with store._tx() as conn:  # as retention marks a file it removed
        conn.execute("UPDATE analytics_files SET removed_at = '2026-01-01T00:00:00+00:00' WHERE id = ?",
                     (result["aggregation_id"],))
    note = result_route(server, branch_id)["result"]["note"]
    assert note.startswith("the combined file of this round was removed by retention at 2026-01-01") and \
        "--keep-rounds" in note
    assert "(the combined file of this round was removed by retention" in cli("status", "--data-dir", data_dir).stdout


def test_an_unknown_branch_is_a_404(inprocess_server) -> None:
    server, _ = inprocess_server(1)
    answer = server.admin("GET", "/admin/v1/branches/00000000-0000-0000-0000-000000000000/analytics/result")
    assert answer.status_code == 404 and "error" in answer.json()
    assert requests.get(server.url + "/admin/v1/branches/x/analytics/result", timeout=10).status_code == 401


def test_a_column_without_values_has_no_mean_and_a_complex_sum_shows_as_text(inprocess_server) -> None:
    server, leaves = inprocess_server(1)
    set_ops(server, leaves[0]["branch_id"], {"phase": "sum"})
    empty = {"empty_n": np.array([0]), "empty_sum": np.array([0.0]), "empty_sumsq": np.array([0.0]),
             "empty_min": np.array([0.0]), "empty_max": np.array([0.0]), "empty_nan": np.array([4])}
    send(server, leaves[0], {**empty, "phase": np.array([1 + 2j])})
    result = wait_until(lambda: result_route(server, leaves[0]["branch_id"])["result"], 30, "the analytics round")
    column = result["columns"]["empty"]
    assert (column["count"], column["nan"], column["completeness"], column["leaves"]) == (0, 4, 0, 1)
    assert column["mean"] is column["variance"] is column["std"] is None  # no NaN in JSON
    assert result["fields"] == [{"name": "phase", "op": "sum", "dtype": "<c16", "shape": [1], "values": ["(1+2j)"],
                                 "truncated": False}]
    text = cli("status", "--data-dir", str(server.server.store.data_dir)).stdout
    assert [line.split() for line in text.splitlines() if line.strip().startswith("empty ")] == [
        ["empty", "0", "-", "-", "0", "0", "0", "0", "1"]]
