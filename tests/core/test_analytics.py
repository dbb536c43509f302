"""Federated analytics on the leaf, without a server: the bundle of a column against NumPy, save_fields and
save_analytics (3.0.1's names and rules, typed errors), AnalyticsResult's statistics exact to float64, the round
view's analytics part, and an analytics aggregate kept apart from a model's round in the waiter."""

from __future__ import annotations

import io
import math
import warnings
import zipfile

import numpy as np
import pytest

from branchkey_integrations.core import wire
from branchkey_integrations.core.analytics import BUNDLE_OPS, BUNDLE_SUFFIXES, reduce_column, reduce_columns
from branchkey_integrations.core.analytics_result import AnalyticsResult
from branchkey_integrations.core.client_payloads import PayloadCalls, analytics_entries
from branchkey_integrations.core.errors import (AggregateMismatchError, AnalyticsError, AnalyticsRoundMissedError,
                                                ArchiveError, ProtocolError)
from branchkey_integrations.core.outcome import checked_model
from branchkey_integrations.core.progress import WaitProgress, parse_round_view
from branchkey_integrations.core.protocol import KIND_FEDERATED_ANALYTICS, KIND_KEY
from branchkey_integrations.core.waiter import RoundWaiter


def combine(*bundles: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the platform does with bundles: each entry by its suffix's operation (sums in int64/float64)."""
    ops = {"sum": lambda arrays: np.sum(arrays, axis=0), "min": lambda arrays: np.min(arrays, axis=0),
           "max": lambda arrays: np.max(arrays, axis=0)}
    return {name: ops[BUNDLE_OPS[name.rpartition("_")[2]]]([b[name] for b in bundles]) for name in bundles[0]}


# ----------------------------------------------------------------------------------------- the bundle
@pytest.mark.parametrize("values", [
    np.random.default_rng(0).normal(40, 12, 1000),
    np.random.default_rng(1).integers(-5000, 5000, 777).astype(np.int32),
    np.random.default_rng(2).integers(0, 255, 300).astype(np.uint8),
    np.random.default_rng(3).random(50) > 0.3,
    [1, 2.5, 3],
], ids=["float64", "int32", "uint8", "bool", "list"])
def test_the_bundle_is_numpys_count_sum_sum_of_squares_min_and_max_in_fixed_dtypes(values):
    bundle = reduce_column("x", values)
    column = np.asarray(values).astype(np.float64)
    assert list(bundle) == [f"x_{suffix}" for suffix in BUNDLE_SUFFIXES]
    assert {name: (a.dtype, a.shape) for name, a in bundle.items()} == {
        "x_n": (np.int64, (1,)), "x_sum": (np.float64, (1,)), "x_sumsq": (np.float64, (1,)),
        "x_min": (np.float64, (1,)), "x_max": (np.float64, (1,)), "x_nan": (np.int64, (1,))}
    assert bundle["x_n"][0] == column.size and bundle["x_nan"][0] == 0
    assert bundle["x_sum"][0] == column.sum() and bundle["x_sumsq"][0] == np.square(column).sum()
    assert bundle["x_min"][0] == column.min() and bundle["x_max"][0] == column.max()


def test_nans_are_omitted_counted_and_warned_about_or_refused():
    values = np.array([1.0, np.nan, 3.0, np.nan, 5.0])
    with pytest.warns(UserWarning, match=r"Column 'x': 2 of 5 values are NaN and were omitted; its count is 3"):
        bundle = reduce_column("x", values, "omit")
    assert (bundle["x_n"][0], bundle["x_nan"][0], bundle["x_sum"][0], bundle["x_sumsq"][0]) == (3, 2, 9.0, 35.0)
    with pytest.raises(AnalyticsError, match=r"Column 'x' holds 2 NaN value\(s\) and nan_policy='raise'"):
        reduce_column("x", values, "raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a column without NaN warns of nothing, under either policy
        assert reduce_column("x", [1.0, 2.0], "raise")["x_nan"][0] == 0


@pytest.mark.parametrize("values, policy, message", [
    ([1.0, np.inf], "omit", "holds an infinite value"),
    ([-np.inf, 2.0], "raise", "holds an infinite value"),
    ([], "omit", "is empty"),
    ([np.nan, np.nan], "omit", "holds no value but NaN"),
    ([[1.0, 2.0]], "omit", r"has shape \(1, 2\); a column is 1-D"),
    (5.0, "omit", r"has shape \(\); a column is 1-D"),
    (["a", "b"], "omit", "which is not numeric"),
    ([1 + 2j], "omit", "which is not numeric"),
    ([object()], "omit", "which is not numeric"),
])
def test_columns_that_cannot_be_summarised_are_refused_naming_the_column(values, policy, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(AnalyticsError, match=message) as info:
            reduce_column("age", values, policy)
    assert "'age'" in str(info.value)


def test_a_bad_nan_policy_and_bad_column_sets_are_refused():
    with pytest.raises(ValueError, match=r"Expected nan_policy in \('omit', 'raise'\). Received: nan_policy='drop'"):
        reduce_column("x", [1.0], "drop")
    with pytest.raises(AnalyticsError, match="No columns"):
        reduce_columns({})
    with pytest.raises(AnalyticsError, match="dict of name -> raw values"):
        reduce_columns([[1, 2]])  # type: ignore[arg-type]
    for name, problem in (("weighting", "reserved"), (KIND_KEY, "reserved"), ("layer_3", "layer_<n>"), (7, "string")):
        with pytest.raises(AnalyticsError, match=problem):
            reduce_columns({name: [1.0]})  # type: ignore[dict-item]
    with pytest.raises(AnalyticsError, match="Field 'age_n' has the name of an entry of a column's bundle"):
        analytics_entries({"age": [1.0]}, {"age_n": 3})
    with pytest.raises(AnalyticsError, match="Nothing to send"):
        analytics_entries(None, None)


# ------------------------------------------------------------------------- save_fields / save_analytics
def test_save_analytics_writes_only_the_bundle_as_an_analytics_archive(tmp_path):
    ages = np.array([31.0, 47.0, np.nan, 52.0])
    with pytest.warns(UserWarning):
        path = PayloadCalls().save_analytics({"age": ages, "smoker": np.array([True, False, True, True])},
                                             file_path=tmp_path / "site")
    assert path == str(tmp_path / "site.npz")
    archive = wire.decode(path)
    assert archive.kind == KIND_FEDERATED_ANALYTICS and archive.weighting is None and archive.layers == []
    assert list(archive.fields) == [f"{c}_{s}" for c in ("age", "smoker") for s in BUNDLE_SUFFIXES]
    assert archive.fields["age_n"][0] == 3 and archive.fields["age_nan"][0] == 1 and archive.fields["age_sum"][0] == 130
    with np.load(path, allow_pickle=False) as raw:  # what the official client's np.load reads
        assert not any(np.array_equal(raw[name], ages) for name in raw.files)
        assert str(raw[KIND_KEY]) == KIND_FEDERATED_ANALYTICS
    with zipfile.ZipFile(path) as zf:
        assert {info.compress_type for info in zf.infolist()} == {zipfile.ZIP_DEFLATED}  # as savez_compressed


def test_save_fields_keeps_names_and_values_and_makes_scalars_one_element(tmp_path):
    histogram = np.arange(10, dtype=np.int64)
    path = PayloadCalls().save_fields({"histogram": histogram, "image_size": [28, 28], "n_cases": 312,
                                       "site": "north"}, file_path=str(tmp_path / "fields.npz"))
    fields = wire.decode(path).fields
    np.testing.assert_array_equal(fields["histogram"], histogram)
    assert fields["image_size"].tolist() == [28, 28] and fields["n_cases"].shape == (1,)
    assert fields["site"].dtype.kind == "U" and fields["site"][0] == "north"
    with open(path, "rb") as f:
        assert PayloadCalls().validate_weight_shape(f) and f.tell() == 0


@pytest.mark.parametrize("entries, kwargs, error, message", [
    ({"a": 1}, {"kind": "federated_metrics"}, AnalyticsError, "Expected kind in"),
    ({"a": 1}, {"kind": "federated_learning"}, AnalyticsError, "needs a weighting, and a model's layers"),
    ({"a": 1}, {"kind": "federated_learning", "weighting": 3.0}, AnalyticsError, "save_weights"),
    ([("a", 1)], {}, AnalyticsError, "dict of name -> value"),
    ({}, {}, ArchiveError, "No fields"),
    ({"layer_3": [1.0]}, {}, ArchiveError, "'layer_<n>' names are the model's"),
    ({"weighting": [1.0]}, {}, ArchiveError, "reserved"),
    ({"a": object()}, {}, ArchiveError, "Field 'a' has dtype object"),
])
def test_save_fields_refuses_what_3_0_1_refuses_with_typed_errors(tmp_path, entries, kwargs, error, message):
    with pytest.raises(error, match=message):
        PayloadCalls().save_fields(entries, file_path=tmp_path / "f", **kwargs)
    assert not (tmp_path / "f.npz").exists()


# ----------------------------------------------------------------------------------- AnalyticsResult
def test_two_sites_with_no_variance_pool_to_mean_50_and_variance_1600_exactly():
    pooled = combine(reduce_column("age", [10, 10, 10]), reduce_column("age", [90, 90, 90]))
    stats = AnalyticsResult.of(pooled, contributors=2).statistics["age"]
    assert (stats.count, stats.mean, stats.variance, stats.std) == (6, 50.0, 1600.0, 40.0)
    assert (stats.min, stats.max, stats.range, stats.completeness) == (10.0, 90.0, 80.0, 1.0)


def test_statistics_of_combined_bundles_are_numpys_on_the_pooled_data():
    rng = np.random.default_rng(7)
    sites = [rng.normal(mu, sd, n) for mu, sd, n in ((3.0, 1.0, 400), (-2.0, 4.0, 900), (10.0, 0.5, 50))]
    sites[1][[3, 30, 300]] = np.nan
    with pytest.warns(UserWarning):
        result = AnalyticsResult.of(combine(*(reduce_column("v", site) for site in sites)))
    pooled = np.concatenate(sites)
    present = pooled[~np.isnan(pooled)]
    stats = result.statistics["v"]
    assert (stats.count, stats.nan) == (present.size, 3) and stats.completeness == present.size / pooled.size
    assert (stats.min, stats.max) == (present.min(), present.max())
    for got, want in ((stats.mean, present.mean()), (stats.variance, present.var()), (stats.std, present.std())):
        assert math.isclose(got, want, rel_tol=1e-12), (got, want)


def test_a_result_reads_an_analytics_archive_refuses_a_model_and_prints_a_table(tmp_path):
    fields = {**combine(reduce_column("age", [10, 10, 10]), reduce_column("age", [90, 90, 90])),
              "labels": np.array([3, 1, 2])}
    archive = wire.decode(wire.prepare_fields(fields).getvalue())
    result = AnalyticsResult.from_archive(archive, aggregation_id="agg-1", run_number=1, round_index=0,
                                          contributor_names=("leaf-a", "leaf-b"))
    assert result.columns == ["age"] and result.other_fields == ["labels"] and result.contributors == 2
    assert result.as_dict()["age"]["variance"] == 1600.0
    text = str(result)
    assert text.splitlines()[0] == "Federated analytics of run 1 analytics round 1, 2 leaves (aggregate agg-1)"
    assert text.splitlines()[1].split() == ["column", "count", "mean", "variance", "std", "min", "max", "range",
                                            "completeness"]
    assert text.splitlines()[2].split() == ["age", "6", "50", "1600", "40", "10", "90", "80", "1"]
    assert "labels = [3 1 2]" in text
    with pytest.raises(ValueError, match="read-only"):
        result.fields["labels"][0] = 7
    model = wire.decode(wire.encode([np.ones(3, np.float32)]))
    with pytest.raises(AnalyticsError, match="is a 'federated_learning' archive .1 layers., not a 'federated_analytics'"):
        AnalyticsResult.from_archive(model, aggregation_id="m-1")
    with pytest.raises(AggregateMismatchError, match="never loaded into a model"):
        checked_model(archive, [wire.LayerSpec.of(np.ones(3, np.float32))])


# ------------------------------------------------------------------- round view, progress, waiter
def test_the_round_view_carries_the_analytics_rounds_with_their_contributors():
    view = parse_round_view({
        "run_status": "start", "run_number": 1, "round_index": 4, "kind": "federated_learning",
        "latest_aggregate": {"aggregation_id": "m3", "run_number": 1, "round_index": 3},
        "analytics": {"run_number": 1, "round_index": None, "required": 3, "uploaded": [], "missing": ["a", "b", "c"],
                      "refused": [{"leaf": "c", "reason": "field 'x' differs"}],
                      "latest_aggregate": {"aggregation_id": "a0", "run_number": 1, "round_index": 0,
                                           "contributors": ["a", "b", "c"]}}})
    assert view.latest_aggregate.aggregation_id == "m3" and view.analytics is not None
    assert view.analytics.run_status == "start" and view.analytics.round_index is None
    assert view.analytics.latest_aggregate.contributors == 3
    assert view.analytics.latest_aggregate.contributor_names == ("a", "b", "c")
    assert view.analytics.refused[0].reason == "field 'x' differs" and view.analytics.analytics is None
    counted = parse_round_view({"run_status": "start", "run_number": 1, "analytics": {
        "latest_aggregate": {"aggregation_id": "a0", "run_number": 1, "round_index": 0, "contributors": 2}}})
    assert counted.analytics.latest_aggregate.contributors == 2
    assert parse_round_view({"run_status": "start", "run_number": 1}).analytics is None
    with pytest.raises(ProtocolError, match="analytics="):
        parse_round_view({"run_status": "start", "run_number": 1, "analytics": [1]})


def test_an_analytics_waits_progress_says_so():
    progress = WaitProgress(round=2, waiting_for="aggregate", waited_s=3, run_number=1, round_index=0,
                            required=3, uploaded=("a",), known=True, kind=KIND_FEDERATED_ANALYTICS)
    assert progress.message == "Analytics round 1 of run 1 (this leaf's round 2): waiting for the aggregate for 3 s; 1 of 3 uploads"
    assert not progress.same_progress(WaitProgress(**{**progress.__dict__, "kind": "federated_learning"}))


def test_a_models_wait_never_takes_an_analytics_aggregate_nor_the_other_way_round():
    waiter = RoundWaiter("b")
    waiter.set_run("start", 1)
    mark, analytics_mark = waiter.received_of("federated_learning"), waiter.received_of(KIND_FEDERATED_ANALYTICS)
    assert waiter.add_aggregation("a0", 1, 0, kind=KIND_FEDERATED_ANALYTICS)
    assert not waiter.add_aggregation("a0", 1, 0, kind=KIND_FEDERATED_ANALYTICS)  # found twice: counted once
    assert waiter.queue.empty() and waiter.received == 0 and waiter.latest_aggregation_id is None
    assert waiter.wait_for_aggregate_after(mark, deadline=0, stopped=None, target=(1, 0)) is None
    assert waiter.wait_for_aggregate_after(mark, deadline=0, stopped=None) is None
    waiter.add_aggregation("m0", 1, 0)
    assert waiter.wait_for_analytics(analytics_mark, deadline=0, stopped=None, target=(1, 0)) == "a0"
    assert waiter.wait_for_aggregate_after(mark, deadline=0, stopped=None, target=(1, 0)) == "m0"
    assert waiter.round_of("a0") == (1, 0) and waiter.received_of(KIND_FEDERATED_ANALYTICS) == 1


def test_an_analytics_wait_takes_only_its_own_round_and_says_when_a_later_one_came_instead():
    waiter = RoundWaiter("b")
    waiter.set_run("start", 1)
    waiter.add_aggregation("a0", 1, 0, kind=KIND_FEDERATED_ANALYTICS)
    mark = waiter.received_of(KIND_FEDERATED_ANALYTICS)
    assert waiter.wait_for_analytics(0, deadline=0, stopped=None, target=(1, 1)) is None  # an earlier one: ignored
    waiter.add_aggregation("a2", 1, 2, kind=KIND_FEDERATED_ANALYTICS)
    with pytest.raises(AnalyticsRoundMissedError, match="run 1 round index 1 .* was not received.*a2, run 1 round "
                                                        "index 2"):
        waiter.wait_for_analytics(mark, deadline=0, stopped=None, target=(1, 1))
    assert waiter.wait_for_analytics(mark, deadline=0, stopped=None) == "a2"  # untagged upload: the first after it


def test_an_in_memory_payload_is_the_archive_save_fields_writes(tmp_path):
    entries = analytics_entries({"age": [1.0, 2.0]}, {"labels": [1, 2]})
    written = PayloadCalls().save_fields(entries, file_path=tmp_path / "x")
    in_memory = wire.decode(io.BytesIO(wire.prepare_fields(entries, compression="none").getvalue()))
    assert {k: v.tolist() for k, v in wire.decode(written).fields.items()} == \
        {k: v.tolist() for k, v in in_memory.fields.items()}
