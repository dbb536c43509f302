"""Our leaves' federated analytics against a real branchkey-local (the in-process app: real HTTP and WebSocket):
save_analytics and save_fields rounds of three leaves with every combined entry exact, the refusals a leaf
meets, Federation.analytics_round with its progress, and analytics rounds beside model rounds."""

from __future__ import annotations

import logging
import threading
import warnings
from dataclasses import replace

import numpy as np
import pytest

from branchkey_integrations import AnalyticsResult, Client, Federation, RequestRejectedError
from branchkey_integrations.core.analytics import BUNDLE_OPS, reduce_column
from branchkey_integrations.core.protocol import KIND_FEDERATED_ANALYTICS

from ..conftest import wait_until
from ..core.test_federation import in_thread, layers_for, weighted_mean


def site_columns(seed: int) -> dict[str, np.ndarray]:
    """One site's raw columns: integer ages (sums exact in any order), a few NaNs, a boolean, uint8 pixels."""
    rng = np.random.default_rng(seed)
    ages = rng.integers(18, 90, 40 + 10 * seed).astype(np.float64)
    ages[rng.choice(ages.size, seed + 1, replace=False)] = np.nan
    return {"age": ages, "smoker": rng.random(30) < 0.3, "pixel": rng.integers(0, 256, 25).astype(np.uint8)}


def combined(bundles: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """What the server must answer: each entry by its suffix's operation, in its own dtype."""
    ops = {"sum": np.sum, "min": np.min, "max": np.max}
    return {name: ops[BUNDLE_OPS[name.rpartition("_")[2]]](np.stack([b[name] for b in bundles]), axis=0)
            for name in bundles[0]}


def connect(credentials, server, made, **kwargs) -> Client:
    client = Client(credentials, host=server.url, transport="websocket", **kwargs)
    made.append(client)
    assert client.notifications.wait_connected(15)
    return client


@pytest.fixture
def clients():
    made: list = []
    yield made
    for client in made:
        client.close()


def set_field_ops(server, branch_id: str, ops: dict) -> None:
    response = server.admin("PUT", f"/admin/v1/branches/{branch_id}/field-ops", json={"field_ops": ops})
    assert response.status_code == 200, response.text


def test_three_leaves_complete_a_save_analytics_round_with_every_entry_exact(inprocess_server, clients, tmp_path):
    server, credentials = inprocess_server(3)
    leaves = [connect(c, server, clients) for c in credentials]
    columns = [site_columns(seed) for seed in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the NaNs omitted: said, and tested in tests/core
        paths = [leaf.save_analytics(cols, file_path=tmp_path / f"leaf{i}") for i, (leaf, cols) in
                 enumerate(zip(leaves, columns))]
        bundles = [{k: v for name, values in cols.items() for k, v in reduce_column(name, values).items()}
                   for cols in columns]
    for leaf, path in zip(leaves, paths):
        leaf.file_upload(path)
        assert leaf.last_upload.kind == KIND_FEDERATED_ANALYTICS and leaf.last_upload.round == (1, 0)
    ids = [leaf.wait_for_analytics(timeout=30) for leaf in leaves]
    assert len(set(ids)) == 1
    results = [leaf.download_analytics(i, run_number=1, round_index=0) for leaf, i in zip(leaves, ids)]
    expected = combined(bundles)
    for result in results:
        assert list(result.fields) == list(expected)
        for name, want in expected.items():
            got = result.fields[name]
            assert got.dtype == want.dtype and np.array_equal(got, want), (name, got, want)
    pooled = np.concatenate([cols["age"] for cols in columns])
    present = pooled[~np.isnan(pooled)]
    age = results[0].statistics["age"]
    assert (age.count, age.nan, age.min, age.max) == (present.size, np.isnan(pooled).sum(), present.min(), present.max())
    assert age.mean == present.sum() / present.size and age.completeness == present.size / pooled.size
    assert age.variance == pytest.approx(present.var(), rel=1e-12)
    smoker = np.concatenate([cols["smoker"] for cols in columns])
    assert results[0].statistics["smoker"].mean == smoker.sum() / smoker.size
    assert leaves[0].get_latest_aggregation_id() is None  # nothing reached the models' queue


def test_three_leaves_complete_a_save_fields_round_by_sum_and_must_match(inprocess_server, clients, tmp_path):
    server, credentials = inprocess_server(3)
    set_field_ops(server, credentials[0]["branch_id"], {"labels": "sum", "image_size": "must_match",
                                                        "dose": "sum", "lowest": "min"})
    leaves = [connect(c, server, clients) for c in credentials]
    histograms = [np.random.default_rng(seed).integers(0, 2**40, 10) for seed in range(3)]  # int64 sums, no float
    doses = [0.5, 0.25, 2.0**-30]
    for leaf, histogram, dose, index in zip(leaves, histograms, doses, range(3)):
        path = leaf.save_fields({"labels": histogram, "image_size": [8, 8], "dose": dose, "lowest": [index, -index]},
                                file_path=tmp_path / f"fields{index}")
        leaf.file_upload(path)
    results = [leaf.download_analytics(leaf.wait_for_analytics(timeout=30)) for leaf in leaves]
    for result in results:
        assert result.fields["labels"].dtype == np.int64
        assert np.array_equal(result.fields["labels"], np.sum(histograms, axis=0))
        assert result.fields["image_size"].tolist() == [8, 8] and result.fields["dose"].tolist() == [sum(doses)]
        assert result.fields["lowest"].tolist() == [0, -2] and result.statistics == {}
    assert "labels = [" in str(results[0])


def test_a_leaf_meets_clear_refusals_and_the_round_stays_open_for_the_others(inprocess_server, clients):
    server, credentials = inprocess_server(2)
    set_field_ops(server, credentials[0]["branch_id"], {"image_size": "must_match"})
    first, second = (connect(c, server, clients) for c in credentials)
    first.upload_fields({"image_size": [8, 8]})
    with pytest.raises(RequestRejectedError, match="image_size"):
        second.upload_fields({"image_size": [16, 16]})  # must_match: differs from the first leaf's
    with pytest.raises(RequestRejectedError, match="histogram") as info:
        second.upload_fields({"image_size": [8, 8], "histogram": [1, 2]})  # no operation configured
    assert "field-op" in str(info.value)
    receipt = second.upload_fields({"image_size": [8, 8]})
    assert receipt.round == (1, 0)
    result = second.download_analytics(second.wait_for_analytics(timeout=30))
    assert result.fields["image_size"].tolist() == [8, 8]


def test_federation_analytics_rounds_report_progress_and_count_apart(inprocess_server, clients):
    server, credentials = inprocess_server(3)
    set_field_ops(server, credentials[0]["branch_id"], {"sites": "sum"})
    reports: list = []
    federations = [Federation(c, host=server.url, transport="websocket", timeout=30, log_every_s=0.2)
                   for c in credentials]
    federations[0].add_progress_listener(reports.append)
    for federation in federations:
        federation.connect()
        clients.append(federation)
    columns = [{"v": np.arange(10.0) * (seed + 1)} for seed in range(3)]
    for index in range(2):
        boxes = [in_thread(f.analytics_round, columns=cols, fields={"sites": 1}) for f, cols in
                 zip(federations, columns)]
        for box in boxes:
            box["thread"].join(30)
        results: list[AnalyticsResult] = [box["result"] for box in boxes]
        assert {(r.run_number, r.round_index, r.contributors, r.aggregation_id) for r in results} == \
            {(1, index, 3, results[0].aggregation_id)}
        assert results[0].fields["sites"].tolist() == [3]
        pooled = np.concatenate([cols["v"] for cols in columns])
        assert results[0].statistics["v"].mean == pooled.mean() and results[0].statistics["v"].count == 30
    assert [f.analytics_rounds for f in federations] == [2, 2, 2] and federations[0].round == 0
    assert reports and {r.kind for r in reports} == {KIND_FEDERATED_ANALYTICS}
    assert reports[-1].final and reports[0].message.startswith("Analytics round 1 of run 1: ")


def test_model_rounds_and_analytics_rounds_at_the_same_time_lose_nothing(inprocess_server, clients, caplog):
    server, credentials = inprocess_server(3)
    federations = [Federation(c, host=server.url, transport="websocket", timeout=60) for c in credentials]
    for federation in federations:
        federation.connect()
        clients.append(federation)
    barrier = threading.Barrier(6)

    def learning(federation, seed):
        barrier.wait(10)
        results = []
        for r in range(3):
            result = federation.run_round(layers_for(seed + 10 * r), float(seed + 1))
            results.append(replace(result, layers=[layer.copy() for layer in result.layers]))  # the buffer is reused
        return results

    def analytics(federation, seed):
        barrier.wait(10)
        return [federation.analytics_round(columns={"x": np.arange(5.0) + seed + r}) for r in range(3)]

    with caplog.at_level(logging.WARNING):
        boxes = [in_thread(fn, f, seed) for seed, f in enumerate(federations) for fn in (learning, analytics)]
        for box in boxes:
            box["thread"].join(60)
    assert all("result" in box for box in boxes), [box.get("error") for box in boxes]
    models = [box["result"] for box in boxes[0::2]]
    stats = [box["result"] for box in boxes[1::2]]
    for r in range(3):
        uploads = [layers_for(seed + 10 * r) for seed in range(3)]
        assert len({leaf[r].aggregation_id for leaf in models}) == 1 and models[0][r].round_index == r
        for got, want in zip(models[0][r].layers, weighted_mean(uploads, [1.0, 2.0, 3.0])):
            np.testing.assert_allclose(got, want, rtol=1e-6)
        assert len({leaf[r].aggregation_id for leaf in stats}) == 1 and stats[0][r].round_index == r
        pooled = np.concatenate([np.arange(5.0) + seed + r for seed in range(3)])
        assert stats[0][r].statistics["x"].mean == pooled.mean() and stats[0][r].statistics["x"].count == 15
    assert not {m[r].aggregation_id for m in models for r in range(3)} & {s[r].aggregation_id for s in stats for r in range(3)}
    assert "AggregateMismatchError" not in caplog.text


def test_an_analytics_wait_times_out_is_interrupted_and_ends_on_a_stopped_run(inprocess_server, clients):
    from branchkey_integrations import AggregationTimeoutError, RoundInterrupted, RunStopped

    server, credentials = inprocess_server(2)  # the second leaf never sends: the round cannot complete
    federation = Federation(credentials[0], host=server.url, transport="websocket", timeout=0.5)
    federation.connect()
    clients.append(federation)
    with pytest.raises(AggregationTimeoutError, match="Analytics round 1 of branch .*: still waiting for the "
                                                      "analytics aggregate after timeout=0.5 s"):
        federation.analytics_round(columns={"x": [1.0, 2.0]})
    waiting, first = federation.client.waiter, federation.client.last_upload
    box = in_thread(federation.analytics_round, columns={"x": [1.0, 2.0]}, timeout=30)
    wait_until(lambda: federation.client.last_upload is not first, 10, "the second upload")  # now it waits
    federation.interrupt("test")
    box["thread"].join(10)
    assert isinstance(box.get("error"), RoundInterrupted) and waiting.interrupted == "test"
    federation.clear_interrupt()
    second = federation.client.last_upload
    box = in_thread(federation.analytics_round, columns={"x": [1.0, 2.0]}, timeout=30)
    wait_until(lambda: federation.client.last_upload is not second, 10, "the third upload")
    server.set_run(credentials[0]["branch_id"], "stop")
    box["thread"].join(10)
    assert isinstance(box.get("error"), RunStopped), box
    assert federation.analytics_rounds == 0


def test_file_upload_sends_an_analytics_file_written_as_the_official_client_writes_it(inprocess_server, clients,
                                                                                      tmp_path):
    from branchkey_integrations.core.protocol import KIND_KEY

    server, credentials = inprocess_server(1)
    (leaf,) = [connect(c, server, clients) for c in credentials]
    bundle = reduce_column("age", [30, 40, 50])
    path = tmp_path / "official.npz"  # np.savez_compressed, a weighting given (3.0.1 writes it, nothing reads it)
    np.savez_compressed(path, **bundle, weighting=np.array([5.0]), **{KIND_KEY: np.array(KIND_FEDERATED_ANALYTICS)})
    leaf.file_upload(path)
    assert leaf.last_upload.kind == KIND_FEDERATED_ANALYTICS and leaf.last_upload.round == (1, 0)
    result = leaf.download_analytics(leaf.wait_for_analytics(timeout=30))
    assert {name: result.fields[name].tolist() for name in bundle} == {name: v.tolist() for name, v in bundle.items()}
    assert result.statistics["age"].mean == 40.0
