"""Smoke runs of every benchmark at tiny sizes: they work and report what the README promises (no timings asserted)."""

from __future__ import annotations

import math

import pytest

from benchmarks import aggregation, members, memory, roundtrip, run, tail


def test_round_trip_paths_agree_and_report_every_field():
    assert roundtrip.check_correctness(2_000)
    result = roundtrip.measure_size(2_000, repeat=1)
    assert set(result["seconds"]) == {"ours", "ours_fresh", "official", "floor"}
    assert all(seconds > 0 for seconds in result["seconds"].values())
    assert {"params", "model_mb", "speedup_vs_official", "fresh_speedup_vs_official", "ours_over_floor"} <= set(result)


def test_memory_is_measured_in_a_fresh_process_for_both_paths():
    result = memory.measure(2_000)
    for method in ("ours", "official"):
        assert {"tracemalloc_peak_mb", "peak_rss_growth_mb", "peak_over_model"} <= set(result[method])
        assert result[method]["tracemalloc_peak_mb"] > 0


def test_aggregation_reports_time_and_memory_per_k():
    result = aggregation.measure(2_000, (2, 3))
    assert set(result["runs"]) == {"2", "3"}
    assert all(math.isfinite(r["seconds"]) and "peak_rss_growth_mb" in r for r in result["runs"].values())


def test_tail_reports_the_last_fold_and_write_in_wall_and_cpu_seconds():
    result = tail.measure(2_000, repeat=2)
    assert len(result["runs"]["cpu_s"]) == 2 and result["cpu_s"] > 0 and result["wall_s"] > 0
    assert {"fsync_s", "cpu_s_per_100mb", "wall_s_per_100mb", "model_mb"} <= set(result)


@pytest.mark.slow
def test_members_reports_the_answer_the_aggregate_and_the_servers_cpu():
    result = members.measure(20, "none")
    assert result["status"] == 201 and result["aggregate_s"] >= result["answer_s"] > 0 and result["server_cpu_s"] >= 0
    refused = members.measure(20, "deflate", ("--max-members", "10"))
    assert refused["status"] == 413 and "--max-members" in refused["error"]


@pytest.mark.slow
def test_cli_writes_json_and_a_table(tmp_path, capsys):
    pytest.importorskip("lightning")
    report = run.main(["--sizes", "2000", "--repeat", "1", "--leaves", "2", "--quick", "--json", str(tmp_path / "r.json")])
    assert (tmp_path / "r.json").exists()
    assert {"roundtrip", "memory", "aggregation", "lightning"} <= set(report)
    assert "overhead_per_round_s" in report["lightning"]
    assert "round trip" in capsys.readouterr().out
