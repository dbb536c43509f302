"""The official clients from PyPI, unchanged, against branchkey-local: the compatibility promise.

2.7.1 gets its notifications over a real RabbitMQ; 3.0.1 over WebSocket. Each leaf is its own
process, in the official client's own virtual environment.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ..server.test_strategies import numpy_step

HERE = Path(__file__).resolve().parent
LEAF_SCRIPT = HERE.parent / "official_leaf.py"


def make_rounds(leaves: int, rounds: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    shapes = [(3, 4), (4,), (2, 2, 2)] + [(1,)] * 9  # 12 layers: layer_10 and layer_11 test numeric order
    per_leaf = [[[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(rounds)]
                for _ in range(leaves)]
    weightings = [[float(rng.integers(10, 500)) for _ in range(rounds)] for _ in range(leaves)]
    return per_leaf, weightings


def weighted_mean(layer_sets, weights):
    """The FedAvg the platform promises, computed independently: float64 average, uploads' dtype."""
    out = []
    for index in range(len(layer_sets[0])):
        stacked = np.stack([np.asarray(s[index], np.float64) for s in layer_sets])
        out.append(np.average(stacked, axis=0, weights=np.asarray(weights, np.float64)).astype(np.float32))
    return out


def run_official_leaves(python, server, credentials, per_leaf, weightings, tmp_path, timeout=60, extra=None):
    processes = []
    for index, creds in enumerate(credentials):
        workdir = tmp_path / f"leaf{index}"
        workdir.mkdir()
        spec = {"credentials": str(creds), "host": server.url, "output_dir": str(workdir),
                "rounds": [[a.tolist() for a in r] for r in per_leaf[index]], "weightings": weightings[index],
                "timeout": timeout, "result": str(workdir / "result.json"), **(extra or {})}
        (workdir / "spec.json").write_text(json.dumps(spec))
        processes.append((subprocess.Popen([str(python), str(LEAF_SCRIPT), str(workdir / "spec.json")], cwd=workdir,
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), workdir))
    return collect_results(processes, server, timeout)


def collect_results(processes, server, timeout):
    """Each official leaf process's result, once it exited cleanly (else its output and the server's log)."""
    results = []
    for process, workdir in processes:
        output, _ = process.communicate(timeout=timeout * 3)
        assert process.returncode == 0, f"official leaf failed:\n{output}\n--- server log ---\n{server.log()}"
        results.append(json.loads((workdir / "result.json").read_text()))
    return results


#: a branch's strategy as ``init`` sets it: FedAvg, and a server optimizer whose aggregates differ from the mean
STRATEGIES = {"fedavg": (), "fedadam": ("--strategy", "fedadam", "--strategy-param", "eta=0.05")}


def expected_aggregates(per_leaf, weightings, strategy):
    """Each round's aggregate: the weighted mean, or (fedadam) a step from the previous aggregate toward it."""
    means = [weighted_mean([leaf[r] for leaf in per_leaf], [w[r] for w in weightings]) for r in range(len(per_leaf[0]))]
    if strategy == "fedavg":
        return means
    params = {"eta": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}
    results, moments = [means[0]], [(0.0, 0.0)] * len(means[0])
    for mean in means[1:]:
        steps = [numpy_step(strategy, params, x, average, m, v)
                 for x, average, (m, v) in zip(results[-1], mean, moments)]
        moments = [(m, v) for _, m, v in steps]
        results.append([x.astype(np.float32) for x, _, _ in steps])
    return results


def check_rounds(results, per_leaf, weightings, strategy="fedavg"):
    rounds = len(per_leaf[0])
    for r, expected in enumerate(expected_aggregates(per_leaf, weightings, strategy)):
        aggregation_ids = {res["rounds"][r]["aggregation_id"] for res in results}
        assert len(aggregation_ids) == 1, f"leaves saw different aggregates in round {r}: {aggregation_ids}"
        for res in results:
            got = res["rounds"][r]
            assert got["keys"] == [f"layer_{i}" for i in range(len(expected))]  # layers only, no weighting
            assert got["dtypes"] == ["float32"] * len(expected)
            for want, have in zip(expected, got["aggregate"]):
                np.testing.assert_allclose(np.asarray(have, np.float32), want, rtol=1e-6, atol=1e-7)
            assert got["metrics_ok"] is True


@pytest.mark.official
@pytest.mark.amqp
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_official_2_7_1_clients_complete_rounds_over_rabbitmq(official_python, rabbitmq, server_factory, tmp_path,
                                                              strategy):
    python = official_python("2.7.1")
    server, credentials = server_factory(3, *STRATEGIES[strategy], amqp=True)
    per_leaf, weightings = make_rounds(leaves=3, rounds=3 if strategy != "fedavg" else 2)
    results = run_official_leaves(python, server, credentials, per_leaf, weightings, tmp_path)
    assert {r["version"] for r in results} == {"2.7.1"}
    assert {(r["run_status"], r["run_number"]) for r in results} == {("start", 1)}
    check_rounds(results, per_leaf, weightings, strategy)
    branch = json.loads(credentials[0].read_text())["branch_id"]
    metrics = server.admin("GET", f"/admin/v1/branches/{branch}/metrics").json()["data"]["metrics"]
    assert len(metrics) == 3 * len(per_leaf[0]) and {m["mode"] for m in metrics} == {"test"}


@pytest.mark.official
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_official_3_0_1_clients_complete_rounds_over_websocket(official_python, server_factory, tmp_path, strategy):
    python = official_python("3.0.1")
    server, credentials = server_factory(2, *STRATEGIES[strategy])
    per_leaf, weightings = make_rounds(leaves=2, rounds=3 if strategy != "fedavg" else 2, seed=1)
    results = run_official_leaves(python, server, credentials, per_leaf, weightings, tmp_path)
    assert {r["version"] for r in results} == {"3.0.1"}
    check_rounds(results, per_leaf, weightings, strategy)


@pytest.mark.official
@pytest.mark.amqp
def test_official_2_7_1_client_follows_run_control_over_rabbitmq(official_python, rabbitmq, server_factory, tmp_path):
    python = official_python("2.7.1")
    server, credentials = server_factory(2, amqp=True)
    branch = json.loads(credentials[0].read_text())["branch_id"]
    leaf = subprocess.Popen([str(python), str(HERE.parent / "official_run_control.py"), str(credentials[0]),
                             server.url, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=tmp_path)

    def step():
        while True:
            line = leaf.stdout.readline()
            assert line, f"official client ended early (rc={leaf.poll()}):\n{server.log()}"
            if line.startswith("@@ "):
                return line[3:].strip()

    try:
        assert step() == "ready"
        server.set_run(branch, "pause")
        leaf.stdin.write("go\n")
        leaf.stdin.flush()
        assert json.loads(step()) == {"status": "pause", "blocked": True}
        server.set_run(branch, "stop")
        server.set_run(branch, "start")
        leaf.stdin.write("go\n")
        leaf.stdin.flush()
        after = json.loads(step())
        assert after["status"] == "start" and after["run_number"] == 2 and after["file_id"]
    finally:
        leaf.kill()


ANALYTICS_LEAF = HERE.parent / "official_analytics_leaf.py"


def run_official_analytics(python, server, credentials, specs, tmp_path, timeout=60):
    """Each official 3.0.1 leaf sends its spec (columns or fields) in one analytics round; their results."""
    processes = []
    for index, (creds, spec) in enumerate(zip(credentials, specs)):
        workdir = tmp_path / f"analytics{index}"
        workdir.mkdir()
        full = {"credentials": str(creds), "host": server.url, "output_dir": str(workdir), "timeout": timeout,
                "result": str(workdir / "result.json"), **spec}
        (workdir / "spec.json").write_text(json.dumps(full))
        processes.append((subprocess.Popen([str(python), str(ANALYTICS_LEAF), str(workdir / "spec.json")], cwd=workdir,
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), workdir))
    return collect_results(processes, server, timeout)


@pytest.mark.official
def test_official_3_0_1_save_analytics_round_combines_every_entry_exactly(official_python, server_factory, tmp_path):
    python = official_python("3.0.1")
    server, credentials = server_factory(3)
    sites = [{"age": [31.0, 45.5, float("nan"), 62.0], "volume": [1.5, 2.25]},
             {"age": [18.0, 90.0], "volume": [0.5, 7.0, 3.0]},
             {"age": [40.0], "volume": [2.0]}]
    results = run_official_analytics(python, server, credentials, [{"columns": site} for site in sites], tmp_path)
    assert len({r["aggregation_id"] for r in results}) == 1
    for column in ("age", "volume"):
        raw = np.concatenate([np.asarray(site[column]) for site in sites])
        kept = raw[~np.isnan(raw)]
        expected = {"n": (kept.size, "int64"), "nan": (raw.size - kept.size, "int64"),
                    "sum": (float(sum(float(np.sum(np.asarray(s[column])[~np.isnan(s[column])])) for s in sites)), "float64"),
                    "sumsq": (float(sum(float(np.sum(np.square(np.asarray(s[column])[~np.isnan(s[column])]))) for s in sites)),
                              "float64"),
                    "min": (float(kept.min()), "float64"), "max": (float(kept.max()), "float64")}
        for result in results:
            for suffix, (value, dtype) in expected.items():
                entry = result["entries"][f"{column}_{suffix}"]
                assert (entry["values"], entry["dtype"]) == ([value], dtype), (column, suffix, entry)
    for result in results:
        assert set(result["entries"]) == {f"{c}_{s}" for c in ("age", "volume")
                                          for s in ("n", "sum", "sumsq", "min", "max", "nan")} | {"__bk_payload_kind__"}
        assert result["entries"]["__bk_payload_kind__"]["values"] == ["federated_analytics"]


@pytest.mark.official
def test_official_3_0_1_save_fields_round_and_branch_config(official_python, server_factory, tmp_path):
    python = official_python("3.0.1")
    server, credentials = server_factory(3)
    branch = json.loads(credentials[0].read_text())["branch_id"]
    ops = {"labels": "sum", "spacing": "must_match", "earliest": "min", "latest": "max", "n_cases": "sum"}
    answer = server.admin("PUT", f"/admin/v1/branches/{branch}/field-ops", json={"field_ops": ops})
    assert answer.status_code == 200, answer.text
    sites = [{"labels": [3, 0, 5], "spacing": [1.0, 0.8, 0.8], "earliest": [2001], "latest": [2019], "n_cases": 40},
             {"labels": [1, 1, 1], "spacing": [1.0, 0.8, 0.8], "earliest": [1998], "latest": [2024], "n_cases": 12},
             {"labels": [0, 9, 2], "spacing": [1.0, 0.8, 0.8], "earliest": [2010], "latest": [2011], "n_cases": 7}]
    results = run_official_analytics(python, server, credentials, [{"fields": site} for site in sites], tmp_path)
    for result in results:
        service = result["config"]["service"]
        assert service["algorithm"] == "fedavg" and service["field_ops"] == dict(sorted(ops.items()))
        entries = result["entries"]
        assert entries["labels"] == {"dtype": "int64", "values": [4, 10, 8]}
        assert entries["spacing"] == {"dtype": "float64", "values": [1.0, 0.8, 0.8]}
        assert entries["earliest"]["values"] == [1998] and entries["latest"]["values"] == [2024]
        assert entries["n_cases"] == {"dtype": "int64", "values": [59]}
        assert "weighting" not in entries


@pytest.mark.official
def test_official_3_0_1_clients_in_a_scaffold_branch_send_no_controls_and_count_with_a_zero_update(
        official_python, server_factory, tmp_path):
    """Unchanged official leaves in a SCAFFOLD branch: their uploads count (with delta c = 0), the models are the
    weighted mean (eta_g 1), and the aggregate also holds the server's c, control_<n>, zero here."""
    python = official_python("3.0.1")
    server, credentials = server_factory(2, "--strategy", "scaffold")
    per_leaf, weightings = make_rounds(leaves=2, rounds=2, seed=2)
    results = run_official_leaves(python, server, credentials, per_leaf, weightings, tmp_path)
    for r, expected in enumerate(expected_aggregates(per_leaf, weightings, "fedavg")):
        for res in results:
            got = res["rounds"][r]
            layers = {k: v for k, v in zip(got["keys"], got["aggregate"]) if k.startswith("layer_")}
            controls = {k: v for k, v in zip(got["keys"], got["aggregate"]) if k.startswith("control_")}
            assert sorted(layers) == sorted(f"layer_{i}" for i in range(len(expected)))
            assert sorted(controls) == sorted(f"control_{i}" for i in range(len(expected)))
            for index, want in enumerate(expected):
                np.testing.assert_allclose(np.asarray(layers[f"layer_{index}"], np.float32), want, rtol=1e-6, atol=1e-7)
                assert not np.asarray(controls[f"control_{index}"]).any()
    assert "carry no control_<n> members: counted with delta c = 0" in server.log()


@pytest.mark.official
def test_official_3_0_1_clients_send_calibration_statistics_that_need_no_configuration(official_python,
                                                                                       server_factory, tmp_path):
    """Calibration's fields in a plain fedavg branch: the official client's save_fields sends them as they are, the
    platform sums them by their suffixes (no --field-op), and the refit from that aggregate is the refit from our
    own combination, byte for byte."""
    from branchkey_integrations.core.head_refit import refit_head
    from branchkey_integrations.core.head_statistics import HeadStatistics, head_statistics

    python = official_python("3.0.1")
    server, credentials = server_factory(2)
    rng = np.random.default_rng(5)
    sent = [head_statistics(rng.integers(0, 8, (12, 3)) / 2.0, rng.integers(0, 2, 12) + index, 4)[0]
            for index in range(2)]
    specs = [{"fields": {name: value.tolist() for name, value in fields.items()}} for fields in sent]
    results = run_official_analytics(python, server, credentials, specs, tmp_path)
    for result in results:
        assert result["config"]["service"]["algorithm"] == "fedavg" and not result["config"]["service"].get("field_ops")
        entries = result["entries"]
        combined = {name: np.asarray(entries[name]["values"], entries[name]["dtype"]).reshape(sent[0][name].shape)
                    for name in sent[0]}
        for name, value in combined.items():
            np.testing.assert_array_equal(value, sent[0][name] + sent[1][name])
        ours = HeadStatistics.from_fields({name: sent[0][name] + sent[1][name] for name in sent[0]})
        weight, bias = np.zeros((4, 3)), np.zeros(4)
        theirs = refit_head(HeadStatistics.from_fields(combined), weight, bias)
        assert theirs.digest() == refit_head(ours, weight, bias).digest() and theirs.untouched == [3]
