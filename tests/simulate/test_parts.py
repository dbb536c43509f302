"""The simulation's small parts: settings, leaf events, round tracking, the report and its files."""

from __future__ import annotations

import io
import json

import pytest

from branchkey_integrations.simulate import SimulationConfig
from branchkey_integrations.simulation.leaf import EventReader, EventWriter
from branchkey_integrations.simulation.progress import RoundProgress, RoundTracker, Stage, TerminalProgress
from branchkey_integrations.simulation.report import LeafSummary, Report, RoundRow, plot_rounds, strategy_label


@pytest.mark.parametrize("field, value, message", [
    ("framework", "jax", "Expected framework in"), ("leaves", 0, "leaves to be an int >= 1"),
    ("rounds", 2.5, "rounds to be an int"), ("partition", "shards", "Expected partition in"),
    ("alpha", 0, "alpha to be a number > 0"), ("amqp_url", "localhost:5672", "amqp://"),
    ("strategy", "", "strategy to be a name"), ("strategy_params", [("eta", 0.1)], "strategy_params to be a mapping"),
    ("strategy_params", {"eta": float("nan")}, "finite numbers. Received: 'eta'=nan"),
    ("proximal_mu", -0.5, "proximal_mu to be a number >= 0"), ("proximal_mu", True, "proximal_mu"),
])
def test_bad_settings_fail_when_set(field, value, message):
    with pytest.raises(ValueError, match=message):
        SimulationConfig(**{field: value})


def test_event_reader_returns_only_complete_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    writer = EventWriter(path)
    writer.write(kind="federated", round=1, accuracy=0.5)
    reader = EventReader(path)
    with open(path, "a") as handle:
        handle.write('{"kind": "lo')  # a line the leaf is still writing
    assert reader.read() == [{"kind": "federated", "round": 1, "accuracy": 0.5}]
    with open(path, "a") as handle:
        handle.write('cal", "round": 1, "accuracy": 0.25}\n')
    assert reader.read() == [{"kind": "local", "round": 1, "accuracy": 0.25}] and reader.read() == []
    writer.close()


def test_round_tracker_reports_changes_only_and_skips_the_round_after_the_last():
    tracker = RoundTracker(rounds=2, leaf_names={"id-a": "leaf_1", "id-b": "leaf_2"})
    open_round = [{"round_index": 1, "status": "open", "first_upload_at": 100.0, "closed_at": None}]
    uploads = [{"leaf_id": "id-b", "round_index": 1}]
    first, = tracker.update(open_round, uploads, now=101.5)
    assert first == RoundProgress(1, 2, ("leaf_2",), 2, 1.5) and not first.complete
    assert tracker.update(open_round, uploads, now=101.6) == []  # nothing new
    closed = [{"round_index": 1, "status": "aggregated", "first_upload_at": 100.0,
               "closed_at": "1970-01-01T00:01:42.000+00:00"},
              {"round_index": 2, "status": "aggregated", "first_upload_at": 103.0,
               "closed_at": "1970-01-01T00:01:44.000+00:00"},
              {"round_index": 3, "status": "open", "first_upload_at": None, "closed_at": None}]
    tracker.accuracy[1] = 0.9
    done = tracker.update(closed, uploads + [{"leaf_id": "id-a", "round_index": 1}], now=200.0)
    assert [(p.round, p.uploaded, p.wait_s, p.global_accuracy) for p in done] == [
        (1, ("leaf_1", "leaf_2"), 2.0, 0.9), (2, (), 1.0, None)]
    assert tracker.wait_s == {1: 2.0, 2: 1.0}


def test_progress_printer_prints_finished_rounds_when_not_a_terminal():
    out = io.StringIO()
    printer = TerminalProgress(out)
    printer(Stage("starting"))
    printer(RoundProgress(1, 3, ("leaf_1",), 2, 0.4))  # still open: shown only on a terminal
    printer(RoundProgress(1, 3, ("leaf_1", "leaf_2"), 2, 0.5, 0.875))
    assert out.getvalue().splitlines() == [
        "starting", "round  1/3  uploaded 2/2 [leaf_1, leaf_2]  wait   0.5 s  global accuracy 87.5%"]


def test_report_table_json_and_plot(tmp_path):
    report = Report(config={"framework": "lightning", "leaves": 2, "partition": "dirichlet", "alpha": 0.5},
                    rounds=[RoundRow(1, 0.5, 0.4, 0.9, 0.25), RoundRow(2, 0.8, 0.5, 0.95, 0.1)],
                    leaves=[LeafSummary("leaf_1", 10, [1] * 10, 0.5)], elapsed_s=3.0)
    assert report.table().splitlines()[2] == "    2      80.0%       50.0%        95.0%    0.10"
    files = report.save(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert Report.from_dict(saved) == report and saved["rounds"][1]["global_accuracy"] == 0.8
    assert open(files["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_report_without_baselines_shows_dashes_and_plots_the_federated_line_only(tmp_path):
    report = Report(config={"framework": "keras", "leaves": 2, "partition": "iid", "baselines": False},
                    rounds=[RoundRow(1, 0.75, None, None, 0.5)], leaves=[LeafSummary("leaf_1", 10, [1] * 10, None)])
    assert report.table().splitlines()[1] == "    1      75.0%           -            -    0.50"
    files = report.save(tmp_path)
    assert Report.from_dict(json.loads((tmp_path / "report.json").read_text())) == report
    assert [line.get_label() for line in plot_rounds(report).get_lines()] == ["federated (fedavg)"]
    assert open(files["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_strategy_params_are_a_read_only_copy_and_the_label_names_everything():
    params = {"eta": 0.1}
    config = SimulationConfig(strategy="fedadam", strategy_params=params, proximal_mu=0.01)
    params["eta"] = 5.0
    with pytest.raises(TypeError):
        config.strategy_params["eta"] = 1.0  # type: ignore[index]
    assert config.as_dict()["strategy_params"] == {"eta": 0.1} and json.dumps(config.as_dict())
    assert strategy_label(config.as_dict()) == "fedadam (eta=0.1) + FedProx mu=0.01"
