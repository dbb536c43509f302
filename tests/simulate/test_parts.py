"""The simulation's small parts: settings, leaf events, round tracking, the report and its files."""

from __future__ import annotations

import io
import json

import pytest

from branchkey_integrations.simulate import SimulationConfig
from branchkey_integrations.simulation.frameworks import TrainPlan
from branchkey_integrations.simulation.leaf import Inbox
from branchkey_integrations.simulation.turns import LeafTask
from branchkey_integrations.simulation.progress import RoundProgress, RoundTracker, Stage, TerminalProgress
from branchkey_integrations.simulation.report import LeafSummary, Report, RoundRow, plot_rounds, strategy_label


@pytest.mark.parametrize("field, value, message", [
    ("framework", "jax", "Expected framework in"), ("leaves", 0, "leaves to be an int >= 1"),
    ("rounds", 2.5, "rounds to be an int"), ("partition", "shards", "Expected partition in"),
    ("alpha", 0, "alpha to be a number > 0"), ("amqp_url", "localhost:5672", "amqp://"),
    ("strategy", "", "strategy to be a name"), ("strategy_params", [("eta", 0.1)], "strategy_params to be a mapping"),
    ("strategy_params", {"eta": float("nan")}, "finite numbers. Received: 'eta'=nan"),
    ("proximal_mu", -0.5, "proximal_mu to be a number >= 0"), ("proximal_mu", True, "proximal_mu"),
    ("backend", "dask", "Expected backend in"),
    ("leaves_per_round", 4, "leaves_per_round from 1 to leaves=3"), ("max_concurrent_leaves", 0, ">= 1"),
    ("leaf_gpus", -1, "leaf_gpus to be a number >= 0"), ("quantize", "int4", "Expected quantize in"),
])
def test_bad_settings_fail_when_set(field, value, message):
    with pytest.raises(ValueError, match=message):
        SimulationConfig(**{field: value})


def test_inbox_hands_answers_back_in_task_order_and_only_whole_ones(tmp_path):
    inbox = Inbox(tmp_path / "leaf_1.inbox")
    plan = TrainPlan(rounds=2, epochs_per_round=1, seed=0)
    for number in (1, 2):
        inbox.put(LeafTask(role="turn", name="leaf_1", framework="lightning", round=number, plan=plan))
    assert LeafTask.from_dict(json.loads((tmp_path / "leaf_1.inbox" / "000002.json").read_text())).round == 2
    (tmp_path / "leaf_1.inbox" / "000002.answer.json").write_text('{"round": 2}')
    assert inbox.answers() == [] and inbox.pending == 2  # the second answer waits for the first
    (tmp_path / "leaf_1.inbox" / "000001.answer.json").write_text('{"round": 1}')
    assert inbox.answers() == [{"round": 1}, {"round": 2}] and inbox.pending == 0 and inbox.answers() == []


def test_sampling_draws_leaves_per_round_by_the_seed():
    config = SimulationConfig(leaves=10, rounds=20, leaves_per_round=3, seed=4)
    schedule = config.sample()
    assert schedule == SimulationConfig(leaves=10, rounds=20, leaves_per_round=3, seed=4).sample()
    assert schedule != SimulationConfig(leaves=10, rounds=20, leaves_per_round=3, seed=5).sample()
    assert all(len(set(chosen)) == 3 and all(0 <= i < 10 for i in chosen) for chosen in schedule)
    assert len({i for chosen in schedule for i in chosen}) == 10  # over 20 rounds every leaf gets a turn
    assert SimulationConfig(leaves=3, rounds=2).sample() == [[0, 1, 2], [0, 1, 2]]


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
    printer(RoundProgress(2, 3, tuple(f"leaf_{i}" for i in range(1, 101)), 100, 9.5, 0.7))
    assert out.getvalue().splitlines()[-1].startswith(
        "round  2/3  uploaded 100/100 [leaf_1, leaf_2, leaf_3, leaf_4, leaf_5, ... 95 more]  wait   9.5 s")


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


def test_the_label_names_quantized_uploads_and_their_error_feedback():
    assert strategy_label({"strategy": "fedavg", "quantize": "int8"}) == "fedavg + int8 uploads (error feedback)"
    assert strategy_label({"strategy": "fedavg", "quantize": "int8", "error_feedback": False}) == "fedavg + int8 uploads"


def test_strategy_params_are_a_read_only_copy_and_the_label_names_everything():
    params = {"eta": 0.1}
    config = SimulationConfig(strategy="fedadam", strategy_params=params, proximal_mu=0.01)
    params["eta"] = 5.0
    with pytest.raises(TypeError):
        config.strategy_params["eta"] = 1.0  # type: ignore[index]
    assert config.as_dict()["strategy_params"] == {"eta": 0.1} and json.dumps(config.as_dict())
    assert strategy_label(config.as_dict()) == "fedadam (eta=0.1) + FedProx mu=0.01"
