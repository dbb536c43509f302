"""A smoke run of ``benchmarks/dashboard.py`` at a tiny size: the store it fills is what the dashboard
reads (rounds, weightings, weighted means), and the report has its fields. Never a timing."""

from __future__ import annotations

import pytest

from benchmarks.dashboard import fill_store, main
from branchkey_integrations.server.history import metric_summary, round_history
from branchkey_integrations.server.store import Store


def test_the_filled_store_reads_as_a_real_run(tmp_path):
    branch = fill_store(tmp_path / "data", leaves=4, rounds=3)
    store = Store(tmp_path / "data")
    try:
        history = round_history(store, branch)
        assert [r["round_index"] for r in history["rounds"]] == [0, 1, 2]
        assert all(r["leaves"] == 4 and r["total_weighting"] > 0 for r in history["rounds"])
        series = {(s["mode"], s["metric"]): s for s in metric_summary(store, branch)["series"]}
        assert set(series) == {("test", "accuracy"), ("test", "loss"), ("train", "accuracy"), ("train", "loss")}
        assert all(len(values) == 3 for values in series[("test", "accuracy")]["per_leaf"].values())
        assert store.open_round(branch).round_index == 3
    finally:
        store.close()


@pytest.mark.slow
def test_a_tiny_benchmark_run_reports_every_figure(tmp_path):
    report = main(["--leaves", "3", "--rounds", "2", "--repeat", "1", "--json", str(tmp_path / "out.json")])
    for name in ("cold_painted_s", "cold_complete_s", "warm_painted_s", "warm_complete_s"):
        assert report[name]["median"] > 0, name
    assert set(report["routes"]) == {"/admin/v1/overview", "/admin/v1/branches/{id}/live",
                                     "/admin/v1/branches/{id}/history", "/admin/v1/branches/{id}/metrics/summary"}
    assert (tmp_path / "out.json").exists()
