"""Analytics rounds on the real server: exact combination, field operations, the round view, bad inputs (each a
400 naming the field, the round still open for the others, nothing stored), and learning rounds beside them."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import requests

from branchkey_integrations.core import wire
from branchkey_integrations.core.analytics import column_statistics
from branchkey_integrations.server.analytics import DEFAULT_MAX_FIELDS

KIND = "federated_analytics"


def fields_archive(**fields: object) -> bytes:
    return wire.prepare_fields(fields).getvalue()


def savez(**members: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **members)
    return buffer.getvalue()


def bundle(values: list[float]) -> dict[str, np.ndarray]:
    column = np.asarray(values, np.float64)
    kept = column[~np.isnan(column)]
    return {"age_n": np.array([kept.size], np.int64), "age_sum": np.array([kept.sum()]),
            "age_sumsq": np.array([np.square(kept).sum()]), "age_min": np.array([kept.min()]),
            "age_max": np.array([kept.max()]), "age_nan": np.array([column.size - kept.size], np.int64)}


def round_view(live, leaf) -> dict:
    answer = requests.get(f"{live.url}/api/v1/round/{leaf['branch_id']}", headers=live.auth(leaf), timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


def combined(live, leaf) -> tuple[dict, wire.Archive]:
    latest = live.wait_for(lambda: (round_view(live, leaf)["analytics"] or {}).get("latest_aggregate"))
    return latest, live.fetch(leaf, latest["aggregation_id"])


def test_three_leaves_bundles_and_configured_fields_combine_exactly(live) -> None:
    branch, leaves = live.make_branch(3)
    live.admin("PUT", f"/admin/v1/branches/{branch['id']}/field-ops",
               {"field_ops": {"labels": "sum", "image_size": "must_match", "lowest": "min"}}, expect=200)
    sites = [[10.0, 10.0, 10.0], [90.0, 90.0, np.nan], [50.0]]
    for index, (leaf, values) in enumerate(zip(leaves, sites)):
        answer = live.upload(leaf, fields_archive(**bundle(values), labels=np.array([index, 1, 2]),
                                                  image_size=np.array([8, 8]), lowest=np.array([5.0 - index])))
        assert answer.status_code == 201, answer.text
        assert answer.json()["data"] | {"file_id": None} == {"file_id": None, "run_number": 1, "round_index": 0,
                                                              "kind": KIND}
    latest, archive = combined(live, leaves[0])
    assert (latest["run_number"], latest["round_index"], latest["contributors"]) == (1, 0, 3)
    assert archive.kind == KIND and archive.weighting is None and archive.layers == []
    pooled = np.array([10.0, 10.0, 10.0, 90.0, 90.0, 50.0])
    assert archive.fields["age_n"].dtype == np.int64 and archive.fields["age_n"].tolist() == [6]
    assert archive.fields["age_nan"].tolist() == [1]
    assert archive.fields["age_sum"].tolist() == [pooled.sum()]
    assert archive.fields["age_sumsq"].tolist() == [np.square(pooled).sum()]
    assert (archive.fields["age_min"].tolist(), archive.fields["age_max"].tolist()) == ([10.0], [90.0])
    assert archive.fields["labels"].tolist() == [3, 3, 6] and archive.fields["image_size"].tolist() == [8, 8]
    assert archive.fields["lowest"].tolist() == [3.0]
    stats = column_statistics(archive.fields)["age"]
    assert stats["mean"] == pooled.mean() and stats["variance"] == pytest.approx(pooled.var(), rel=1e-12)
    assert stats["completeness"] == 6 / 7
    assert live.rounds(branch["id"])[0]["status"] == "open"  # the learning round is untouched
    # the 3.x client reads the aggregate with np.load, as it does a model aggregate
    answer = live.download(leaves[1], latest["aggregation_id"])
    blob = requests.get(answer.json()["data"]["download_url"], timeout=10).content
    loaded = np.load(io.BytesIO(blob), allow_pickle=False)
    assert str(loaded["__bk_payload_kind__"]) == KIND and "weighting" not in loaded.files


def test_a_branch_runs_a_learning_round_and_an_analytics_round_at_once(live) -> None:
    branch, leaves = live.make_branch(2)
    assert live.upload(leaves[0], wire.encode([np.ones(3, np.float32)], 1.0)).status_code == 201
    assert live.upload(leaves[0], fields_archive(**bundle([1.0, 2.0]))).status_code == 201
    view = round_view(live, leaves[0])
    assert (view["kind"], view["uploaded"], view["analytics"]["uploaded"]) == ("federated_learning", ["leaf_1"],
                                                                               ["leaf_1"])
    assert view["analytics"]["missing"] == ["leaf_2"] and view["analytics"]["latest_aggregate"] is None
    assert live.upload(leaves[1], fields_archive(**bundle([3.0]))).status_code == 201
    latest, archive = combined(live, leaves[1])
    assert archive.fields["age_sum"].tolist() == [6.0] and round_view(live, leaves[0])["uploaded"] == ["leaf_1"]
    assert live.upload(leaves[1], wire.encode([np.full(3, 3.0, np.float32)], 1.0)).status_code == 201
    model = live.fetch(leaves[0], live.wait_aggregate(branch["id"]))
    assert model.layers[0].tolist() == [2.0, 2.0, 2.0]
    # the next analytics round is round 1 of the same run, opened by its first upload
    answer = live.upload(leaves[0], fields_archive(**bundle([7.0])))
    assert (answer.json()["data"]["round_index"], round_view(live, leaves[0])["analytics"]["round_index"]) == (1, 1)


def test_a_leaf_may_replace_its_own_upload_and_the_round_counts_it_once(live) -> None:
    _, leaves = live.make_branch(2)
    assert live.upload(leaves[0], fields_archive(**bundle([1.0]))).status_code == 201
    assert live.upload(leaves[0], fields_archive(**bundle([100.0]))).status_code == 201  # sole uploader: any layout
    assert live.upload(leaves[1], fields_archive(**bundle([2.0]))).status_code == 201
    _, archive = combined(live, leaves[0])
    assert archive.fields["age_sum"].tolist() == [102.0] and archive.fields["age_n"].tolist() == [2]


@pytest.mark.parametrize(("first", "second", "message"), [
    ({"age": np.array([31.0, 40.0])}, None, "Field 'age' has no combining operation on branch"),
    ({"site": np.array(["A"])}, None, "Field 'site' has dtype <U1, which 'sum' cannot combine"),
    ({"loss_sum": np.array([np.nan])}, None, "Field 'loss_sum' holds 1 NaN or infinite value"),
    ({"count": np.array([2 ** 62], np.int64)}, {"count": np.array([2 ** 62], np.int64)}, "the sum overflows int64"),
    ({"size": np.array([8, 8])}, {"size": np.array([8, 9])},
     "Field 'size' (must_match) differs from the value leaf_1 sent"),
    ({"age_n": np.array([1])}, {"age_n": np.array([1]), "age_sum": np.array([1.0])},
     "its fields do not match this analytics round's (unexpected 'age_sum')"),
    ({"age_n": np.array([1])}, {"age_n": np.array([1.0])}, "field 'age_n': expected int64[1], received float64[1]"),
])
def test_a_bad_analytics_upload_is_refused_naming_the_field_and_the_round_stays_open(live, first, second,
                                                                                     message) -> None:
    branch, leaves = live.make_branch(3)
    live.admin("PUT", f"/admin/v1/branches/{branch['id']}/field-ops",
               {"field_ops": {"site": "sum", "count": "sum", "size": "must_match"}}, expect=200)
    refused_leaf = leaves[0]
    if second is not None:
        assert live.upload(leaves[0], fields_archive(**first)).status_code == 201
        refused_leaf, first = leaves[1], second
    answer = live.upload(refused_leaf, fields_archive(**first))
    assert answer.status_code == 400 and message in answer.json()["error"], answer.text
    view = round_view(live, leaves[2])["analytics"]
    assert refused_leaf["name"] not in (view or {}).get("uploaded", [])
    assert (view or {}).get("latest_aggregate") is None
    listed = live.admin("GET", f"/admin/v1/branches/{branch['id']}/analytics", expect=200)["analytics"]
    assert all(item["status"] == "open" for item in listed)


@pytest.mark.parametrize(("members", "message"), [
    ({"weighting": np.array([0.0]), "age_n": np.array([3])}, "must declare '__bk_payload_kind__'"),
    ({"__bk_payload_kind__": np.array(KIND), "weighting": np.array([1.0]), "layer_0": np.ones(2)},
     "Unexpected member 'layer_0.npy'"),
    ({"__bk_payload_kind__": np.array(KIND), "weighting": np.array([0.0])}, "holds no fields"),
])
def test_archives_of_the_wrong_shape_are_refused(live, members, message) -> None:
    _, leaves = live.make_branch(1)
    answer = live.upload(leaves[0], savez(**members))
    assert answer.status_code == 400 and message in answer.json()["error"], answer.text
    assert round_view(live, leaves[0])["analytics"] is None


def test_more_fields_than_the_server_takes_are_refused(start_server) -> None:
    live = start_server(max_fields=5)
    _, leaves = live.make_branch(1)
    answer = live.upload(leaves[0], fields_archive(**{f"c{i}_sum": float(i) for i in range(6)}))
    assert answer.status_code == 400 and "holds 6 fields; this server takes at most 5" in answer.json()["error"]
    assert DEFAULT_MAX_FIELDS == 10_000


def test_field_ops_are_checked_shown_in_the_branch_config_and_removable(live) -> None:
    branch, leaves = live.make_branch(1)
    bad = live.admin("PUT", f"/admin/v1/branches/{branch['id']}/field-ops", {"field_ops": {"x": "mean"}}, expect=400)
    assert "operation 'mean' is not one of sum, min, max, must_match" in bad["error"]
    bad = live.admin("PUT", f"/admin/v1/branches/{branch['id']}/field-ops", {"field_ops": {"layer_2": "sum"}},
                     expect=400)
    assert "'layer_<n>' names are the model's" in bad["error"]
    live.admin("PUT", f"/admin/v1/branches/{branch['id']}/field-ops", {"field_ops": {"x": "max", "y": "sum"}},
               expect=200)
    ops = live.admin("PUT", f"/admin/v1/branches/{branch['id']}/field-ops", {"field_ops": {"y": None}}, expect=200)
    assert ops["field_ops"] == {"x": "max"}
    config = requests.get(f"{live.url}/api/v1/config/branch/{branch['id']}", headers=live.auth(leaves[0]), timeout=10)
    assert config.json()["data"]["service"]["field_ops"] == {"x": "max"}
    assert live.admin("GET", f"/admin/v1/branches/{branch['id']}", expect=200)["field_ops"] == {"x": "max"}


def test_an_idempotent_retry_of_an_analytics_upload_is_answered_as_first_counted(live) -> None:
    _, leaves = live.make_branch(2)
    key = {"Idempotency-Key": "a" * 32}
    first = live.upload(leaves[0], fields_archive(**bundle([1.0])), headers=key)
    again = live.upload(leaves[0], fields_archive(**bundle([1.0])), headers=key)
    assert first.status_code == again.status_code == 201
    assert again.json()["data"] == first.json()["data"]
    assert round_view(live, leaves[0])["analytics"]["uploaded"] == ["leaf_1"]


def test_the_analytics_round_is_announced_with_its_kind_and_caught_up_on_reconnect(live) -> None:
    from aiohttp import ClientSession
    import asyncio

    _, leaves = live.make_branch(1, min_leaves=1)

    async def receive() -> dict:
        ticket = live.ticket(leaves[0])
        async with ClientSession() as session:
            url = live.url.replace("http", "ws") + f"/api/v1/ws?ticket={ticket['ticket_id']}&request_id={ticket['request_id']}"
            async with session.ws_connect(url) as socket:
                message = await asyncio.wait_for(socket.receive(), 30)
                return json.loads(message.data)

    assert live.upload(leaves[0], fields_archive(**bundle([4.0]))).status_code == 201
    latest = live.wait_for(lambda: round_view(live, leaves[0])["analytics"]["latest_aggregate"])
    message = asyncio.run(receive())  # connected after the round closed: the catch-up sends it
    assert message["message_type"] == "aggregation_status"
    assert message["body"] == {"aggregation_id": latest["aggregation_id"], "run_number": 1, "round_index": 0,
                               "kind": KIND}


def test_a_stopped_run_abandons_the_open_analytics_round_and_a_reset_drops_it(live) -> None:
    branch, leaves = live.make_branch(2)
    assert live.upload(leaves[0], fields_archive(**bundle([4.0]))).status_code == 201
    reset = live.admin("POST", f"/admin/v1/branches/{branch['id']}/analytics/open/reset", {}, expect=200)
    assert reset["dropped_uploads"] == 1 and round_view(live, leaves[0])["analytics"] is None
    assert live.upload(leaves[0], fields_archive(**bundle([4.0]))).json()["data"]["round_index"] == 1
    live.admin("POST", f"/admin/v1/branches/{branch['id']}/run", {"run_status": "stop"}, expect=200)
    statuses = [item["status"] for item in live.admin("GET", f"/admin/v1/branches/{branch['id']}/analytics")["analytics"]]
    assert statuses == ["abandoned", "abandoned"]
    refused = live.upload(leaves[1], fields_archive(**bundle([4.0])))
    assert refused.status_code == 409 and "run is stopped" in refused.json()["error"]


def test_retention_keeps_the_latest_analytics_aggregates_and_answers_410_for_older_ones(start_server) -> None:
    live = start_server(keep_rounds=1)
    _, leaves = live.make_branch(1)
    ids = []
    for index, value in enumerate((1.0, 2.0)):
        assert live.upload(leaves[0], fields_archive(**bundle([value]))).status_code == 201
        latest = live.wait_for(lambda: (round_view(live, leaves[0])["analytics"]["latest_aggregate"] or {}).get(
            "round_index") == index and round_view(live, leaves[0])["analytics"]["latest_aggregate"])
        ids.append(latest["aggregation_id"])
    gone = live.wait_for(lambda: (answer := live.download(leaves[0], ids[0])).status_code == 410 and answer.json())
    assert "removed by the server's retention" in gone["error"]
    assert live.fetch(leaves[0], ids[1]).fields["age_sum"].tolist() == [2.0]


def test_an_analytics_archive_refused_while_read_is_not_held_against_the_learning_round(live) -> None:
    _, leaves = live.make_branch(2)
    bad = savez(__bk_payload_kind__=np.array(KIND), weighting=np.array([0.0]), when=np.array(["2026"], "datetime64[Y]"))
    answer = live.upload(leaves[0], bad, data=json.dumps({"leaf_name": "leaf_1", "metadata": json.dumps({"kind": KIND})}))
    assert answer.status_code == 400 and "datetime64" in answer.json()["error"]
    assert round_view(live, leaves[1])["refused"] == []  # the learning round's leaves never read it as theirs
    odd = savez(__bk_payload_kind__=np.array(KIND), weighting=np.array([np.nan]), age_n=np.array([1]))
    assert live.upload(leaves[0], odd).status_code == 201  # 'weighting' is read by nothing in this kind
    field = savez(__bk_payload_kind__=np.array(KIND), weighting=np.array([3, 4, 5]), age_n=np.array([1]))
    answer = live.upload(leaves[1], field)
    assert answer.status_code == 400 and "'weighting' is reserved" in answer.json()["error"]


def test_an_analytics_upload_over_the_size_limits_is_refused_before_it_is_inflated(start_server) -> None:
    live = start_server(max_total_bytes=1 << 20)
    _, leaves = live.make_branch(2)
    answer = live.upload(leaves[0], fields_archive(histogram_sum=np.zeros(1 << 18)))  # 2 MiB of float64
    assert answer.status_code == 413 and "Nothing was inflated" in answer.json()["error"]
    assert round_view(live, leaves[1])["analytics"] is None
