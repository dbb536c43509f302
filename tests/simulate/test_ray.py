"""The ray backend: on a local Ray started for the run (the same accuracies as the process backend), on a
two-node cluster made with Ray's own harness (``ray.cluster_utils.Cluster``: leaves on both nodes), a leaf
that fails, SIGTERM, and the error when Ray is missing. Ray installs wherever the tests run (the ``[ray]``
extra, part of ``[all]``); only the missing-Ray test runs without it."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from branchkey_integrations import cli
from branchkey_integrations.simulate import LeafFailedError, run
from branchkey_integrations.simulation.data import load_digits_split
from branchkey_integrations.simulation.frameworks import TrainPlan
from branchkey_integrations.simulation.ray_backend import INSTALL_HINT, RayBackend, import_ray
from branchkey_integrations.simulation.turns import LeafTask

from ..conftest import IN_CI, wait_until
from .test_run import children_of, simulate_cli

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds processes through /proc")]

try:
    import ray
except ImportError:  # a failure in CI: .ci/setup installs [all], which has [ray]
    ray = None
needs_ray = pytest.mark.skipif(ray is None and not IN_CI, reason="pip install 'branchkey-integrations[ray]'")


def descendants_of(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, _ in children_of(frontier.pop())]
        found += children
        frontier += children
    return found


def children_of_all(pids: list[int]) -> list[tuple[int, str]]:
    found = []
    for pid in pids:
        try:
            found.append((pid, Path(f"/proc/{pid}/cmdline").read_text(errors="replace")))
        except OSError:
            continue  # gone meanwhile
    return found


@needs_ray
def test_ray_backend_on_a_local_ray_gives_the_process_backends_accuracies(tmp_path):
    options = dict(leaves=2, rounds=2, epochs_per_round=1, seed=1, baselines=False)
    on_ray = run(backend="ray", max_concurrent_leaves=1, output=tmp_path, **options)  # one leaf at a time
    on_processes = run(**options)
    assert [r.global_accuracy for r in on_ray.rounds] == pytest.approx(
        [r.global_accuracy for r in on_processes.rounds], abs=0.005)
    assert on_ray.final.global_accuracy > 0.8 and on_ray.config["backend"] == "ray"
    assert [len(leaf.nodes) for leaf in on_ray.leaves] == [1, 1] and on_ray.leaves[0].nodes[0] != os.uname().nodename
    assert not ray.is_initialized()  # the Ray it started is stopped
    assert children_of(os.getpid()) == []


@needs_ray
def test_two_node_cluster_runs_leaves_on_both_nodes_and_names_them():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        # one CPU per node and one per leaf: the round's two turns can only run side by side on two nodes
        report = run(backend="ray", ray_address=cluster.address, leaves=2, rounds=1, epochs_per_round=1,
                     max_concurrent_leaves=2, leaf_cpus=1, baselines=False)
        nodes = {node for leaf in report.leaves for node in leaf.nodes}
        assert len(nodes) == 2 and all(len(leaf.nodes) == 1 for leaf in report.leaves)
        assert report.final.global_accuracy > 0.5
        alive = {n["NodeID"][:8] for n in ray.nodes() if n["Alive"]} if ray.is_initialized() else None
        assert alive is None  # the simulation disconnected from the cluster and left it running
        ray.init(address=cluster.address)
        assert nodes <= {n["NodeID"][:8] for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()
        cluster.shutdown()


@needs_ray
def test_a_failing_leaf_task_is_reported_with_its_error_and_log():
    backend = RayBackend(max_concurrent_leaves=1)
    train, test = load_digits_split()
    try:
        backend.start({"leaf_1": train}, test)
        plan = TrainPlan(rounds=1, epochs_per_round=1, seed=0)
        creds = {"id": "leaf-1", "name": "leaf_1", "session_token": "t", "owner_id": "o", "tree_id": "t",
                 "branch_id": "b"}
        backend.submit(LeafTask(role="turn", name="leaf_1", framework="lightning", round=1, plan=plan,
                                credentials=creds, host="http://127.0.0.1:9"), "leaf_1")  # nothing listens
        with pytest.raises(LeafFailedError, match="(?s)leaf_1 failed \\(turn, round 1\\).*Traceback"):
            wait_until(lambda: backend.poll(), 120, "the failed task's answer")
    finally:
        backend.close()
    assert not ray.is_initialized()


@needs_ray
def test_sigterm_stops_the_server_every_ray_task_and_the_local_ray(tmp_path):
    process = simulate_cli("--backend", "ray", "--leaves", "2", "--rounds", "50", "--epochs-per-round", "1",
                           "--no-baselines", "--output", str(tmp_path))
    def running_a_leaf() -> bool:  # a Ray worker names itself after the task it runs
        return any("ray::_task_in_worker" in cmd for pid, cmd in children_of_all(descendants_of(process.pid)))

    wait_until(running_a_leaf, 120, "a Ray worker running a leaf")
    started = descendants_of(process.pid)
    assert len(started) >= 4  # the server, Ray's GCS and raylet, a worker
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=90)
    assert process.returncode == 143, out
    assert "stopped" in out.splitlines()[-1]

    def alive() -> list[int]:
        return [pid for pid in started if Path(f"/proc/{pid}").exists()
                and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]

    # the server, the GCS, the raylet and the workers are gone when the CLI exits; Ray's per-node agents
    # (dashboard and runtime-env agents) end themselves as soon as they see their raylet gone
    wait_until(lambda: alive() == [], 30, "every process the simulation started to end: "
               + str([Path(f"/proc/{pid}/cmdline").read_text()[:60] for pid in alive()]))


def test_without_ray_the_backend_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: import fails, find_spec says None
    with pytest.raises(ImportError, match="pip install 'branchkey-integrations\\[ray\\]'"):
        import_ray()
    assert cli.main(["simulate", "--backend", "ray", "--output", "unused"]) == 1
    assert INSTALL_HINT in capsys.readouterr().err
    assert children_of(os.getpid()) == []
