"""Strategies in the round's life: changed between rounds (admin API and CLI), refused mid-round and with bad
parameters, a trimmed mean that falls back to FedAvg and says so, and server-optimizer state that survives
kill -9 bit for bit."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from branchkey_integrations.core import wire
from branchkey_integrations.server.strategies import check_strategy

from ..conftest import cli
from .conftest import Handle
from .test_running_sum import aggregate_of, send
from .test_strategies import numpy_mean, numpy_run, numpy_step, play_rounds, random_rounds


def layers(value: float) -> list[np.ndarray]:
    return [np.full(3, value, np.float32)]


def round_view(live: Handle, leaf: dict[str, str], branch_id: str) -> dict:
    answer = live.session.get(f"{live.url}/api/v1/round/{branch_id}", headers=live.auth(leaf), timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


def test_admin_api_changes_the_strategy_between_rounds_only(live: Handle) -> None:
    branch, (a, b) = live.make_branch(2)
    path = f"/admin/v1/branches/{branch['id']}/strategy"
    changed = live.admin("PUT", path, {"strategy": "trimmed-mean", "strategy_params": {"beta": 0.25}}, expect=200)
    assert (changed["algorithm"], changed["strategy_params"]) == ("trimmed-mean", {"beta": 0.25})
    config = live.session.get(f"{live.url}/api/v1/config/branch/{branch['id']}", headers=live.auth(a), timeout=10)
    assert config.json()["data"]["service"] == {
        "algorithm": "trimmed-mean", "config": {"min_leaves": None, "round_deadline_s": None, "beta": 0.25},
        "field_ops": {}}

    assert live.upload(a, wire.encode(layers(1), 1.0)).status_code == 201
    refused = live.admin("PUT", path, {"strategy": "median"}, expect=409)
    assert "leaf_1" in refused["error"] and "between rounds" in refused["error"]
    assert live.admin("GET", f"/admin/v1/branches/{branch['id']}", expect=200)["algorithm"] == "trimmed-mean"

    assert live.upload(b, wire.encode(layers(3), 1.0)).status_code == 201
    live.wait_aggregate(branch["id"])
    assert live.admin("PUT", path, {"strategy": "median"}, expect=200)["strategy_params"] == {}
    view = round_view(live, a, branch["id"])
    assert (view["strategy"], view["strategy_params"]) == ("median", {})


def test_bad_parameters_are_refused_by_the_admin_api_naming_the_value(live: Handle) -> None:
    branch, _ = live.make_branch(1)
    path = f"/admin/v1/branches/{branch['id']}/strategy"
    for body, named in (({"strategy": "fedadam", "strategy_params": {"eta": -0.5}}, "eta=-0.5"),
                        ({"strategy": "trimmed-mean", "strategy_params": {"beta": 0.5}}, "beta=0.5"),
                        ({"strategy": "fedadam", "strategy_params": {"lr": 1}}, "'lr'"),
                        ({"strategy": "fedadam", "strategy_params": [1]}, "strategy_params"),
                        ({"strategy": "krum"}, "strategy='krum'")):
        assert named in live.admin("PUT", path, body, expect=400)["error"]
    tree = live.admin("POST", "/admin/v1/trees", {"name": "t"}, expect=201)
    refused = live.admin("POST", f"/admin/v1/trees/{tree['id']}/branches",
                         {"name": "b", "strategy": "fedyogi", "strategy_params": {"beta_2": 1.0}}, expect=400)
    assert "beta_2=1.0" in refused["error"] and "[0, 1)" in refused["error"]
    assert live.admin("GET", f"/admin/v1/branches/{branch['id']}", expect=200)["algorithm"] == "fedavg"


def test_trimmed_mean_with_too_few_uploads_aggregates_with_fedavg_and_says_so(live: Handle, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="branchkey_integrations.server")
    branch, leaves = live.make_branch(3, strategy="trimmed-mean", strategy_params={"beta": 0.2})
    for leaf, (value, weighting) in zip(leaves, ((0.0, 1.0), (1.0, 1.0), (5.0, 2.0))):
        assert live.upload(leaf, wire.encode(layers(value), weighting)).status_code == 201
    aggregate = live.fetch(leaves[0], live.wait_aggregate(branch["id"]))
    np.testing.assert_array_equal(aggregate.layers[0], np.full(3, 11 / 4, np.float32))  # the weighted mean
    latest = round_view(live, leaves[0], branch["id"])["latest_aggregate"]
    assert latest["strategy"] == "fedavg"
    assert "trims floor(0.2 x 3) = 0" in latest["strategy_note"] and "at least 5 uploads" in latest["strategy_note"]
    assert live.rounds(branch["id"])[0]["strategy_note"] == latest["strategy_note"]
    [row] = live.admin("GET", f"/admin/v1/branches/{branch['id']}/history", expect=200)["rounds"]  # the dashboard's
    assert (row["strategy"], row["strategy_note"]) == ("fedavg", latest["strategy_note"])
    assert any(latest["strategy_note"] in record.getMessage() for record in caplog.records)


def test_cli_sets_the_strategy_at_init_and_changes_it_between_rounds(tmp_path: Path) -> None:
    data = tmp_path / "data"
    init = cli("init", "--data-dir", str(data), "--leaves", "2", "--credentials-dir", str(tmp_path / "c"),
               "--strategy", "fedavgm", "--strategy-param", "momentum=0.5")
    assert "strategy fedavgm (eta=1, momentum=0.5)\n" in init.stdout
    bad = cli("init", "--data-dir", str(tmp_path / "other"), "--leaves", "1", "--credentials-dir",
              str(tmp_path / "c2"), "--strategy", "fedadam", "--strategy-param", "eta=-1", check=False)
    assert bad.returncode == 1 and "eta=-1.0" in bad.stderr and not (tmp_path / "other").exists()
    few = cli("init", "--data-dir", str(tmp_path / "few"), "--leaves", "3", "--credentials-dir", str(tmp_path / "c3"),
              "--strategy", "trimmed-mean")
    assert "warning: rounds of 3 uploads will fall back to fedavg" in few.stderr and "at least 10" in few.stderr
    changed = cli("branch", "strategy", "fedadam", "--strategy-param", "eta=0.05", "--data-dir", str(data))
    assert 'strategy fedadam {"eta": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 0.001}' in changed.stdout
    status = json.loads(cli("status", "--json", "--data-dir", str(data)).stdout)["branches"][0]
    assert (status["strategy"], status["strategy_params"]["eta"]) == ("fedadam", 0.05)
    refused = cli("branch", "strategy", "median", "--strategy-param", "beta=0.1", "--data-dir", str(data), check=False)
    assert refused.returncode == 1 and "no parameter 'beta'" in refused.stderr


def test_cli_change_is_refused_mid_round(tmp_path: Path) -> None:
    from branchkey_integrations.server.store import Store

    data = tmp_path / "data"
    cli("init", "--data-dir", str(data), "--leaves", "2", "--credentials-dir", str(tmp_path / "c"))
    store = Store(data)
    try:
        [leaf, _] = store.list_leaves()
        temp = store.new_temp_path()
        temp.write_bytes(wire.encode(layers(1), 1.0))
        store.commit_upload(temp, leaf=leaf, run_number=1, round_index=0, weighting=1.0,
                            specs=[wire.LayerSpec.of(layers(1)[0])], size=temp.stat().st_size, sha256="0", metadata=None)
    finally:
        store.close()
    refused = cli("branch", "strategy", "median", "--data-dir", str(data), check=False)
    assert refused.returncode == 1 and "leaf_1" in refused.stderr and "between rounds" in refused.stderr


def test_fedadam_state_survives_kill_9_bit_for_bit(server_factory) -> None:
    """Two servers get the same uploads; one is killed -9 twice (mid-round, and right after a round's last
    upload), restarted each time: its aggregates equal the uninterrupted one's and NumPy's, bit for bit."""
    options = ("--strategy", "fedadam", "--strategy-param", "eta=0.05")
    steady, steady_credentials = server_factory(3, *options, name="steady")
    crashing, credentials = server_factory(3, *options, name="crashing")
    rounds = random_rounds(11, 5, 3)
    expected = numpy_run("fedadam", {"eta": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}, rounds)
    for server, paths in ((steady, steady_credentials), (crashing, credentials)):
        branch_id = json.loads(paths[0].read_text())["branch_id"]
        for index, uploads in enumerate(rounds):
            for number, (path, (arrays, weighting)) in enumerate(zip(paths, uploads)):
                send(server, path, arrays, weighting)
                if server is crashing and (index, number) in ((2, 1), (3, 2)):
                    server.kill()  # (2, 1): mid-round; (3, 2): as round 3 aggregates (or just before)
                    server.start()
            got = aggregate_of(server, branch_id, index)
            for layer, reference in zip(got, expected[index]):
                np.testing.assert_array_equal(layer, reference)
        state = list((server.data_dir / "state").iterdir())
        assert len(state) == 2, state  # m and v of the latest round only: superseded state is deleted
        disk = json.loads(cli("status", "--json", "--data-dir", str(server.data_dir)).stdout)["disk"]
        assert disk["optimizer_state"] == sum(path.stat().st_size for path in state) > 0


def test_a_store_made_before_strategies_opens_with_its_branches_on_fedavg(tmp_path: Path) -> None:
    import sqlite3

    from branchkey_integrations.server.store import DB_NAME, Store

    store = Store(tmp_path)
    branch = store.create_branch(store.create_tree("t")["id"], "old")
    store.close()
    with sqlite3.connect(tmp_path / DB_NAME) as conn:  # the schema as it was before strategies
        conn.execute("DROP TABLE optimizer_state")
        for table, column in (("branches", "strategy_params"), ("rounds", "strategy"), ("rounds", "strategy_note")):
            conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    store = Store(tmp_path)
    try:
        old = store.require_branch(branch.id)
        assert (old.algorithm, old.params) == ("fedavg", {})
        assert store.open_round(branch.id).strategy is None
        updated, stale = store.set_strategy(branch.id, "fedyogi", {"eta": 0.1})
        assert (updated.algorithm, updated.params["eta"], stale) == ("fedyogi", 0.1, [])
    finally:
        store.close()


def test_a_strategy_change_starts_the_optimizer_state_afresh(live: Handle) -> None:
    state_dir = live.thread.server.store.state_dir
    branch, leaves = live.make_branch(2, strategy="fedadam")
    rounds = random_rounds(3, 4, 2)
    play_rounds(live, branch, leaves, rounds[:2])
    assert len(list(state_dir.iterdir())) == 2  # m and v after round 1
    live.admin("PUT", f"/admin/v1/branches/{branch['id']}/strategy", {"strategy": "fedavgm"}, expect=200)
    assert list(state_dir.iterdir()) == []
    got = play_rounds(live, branch, leaves, rounds[2:], start=2)
    previous = live.fetch(leaves[0], live.rounds(branch["id"])[1]["aggregate_id"]).layers
    x, _, _ = numpy_step("fedavgm", check_strategy("fedavgm"), previous[0],
                         numpy_mean([u[0][0] for u in rounds[2]], [u[1] for u in rounds[2]]), 0.0, 0.0)
    np.testing.assert_array_equal(got[0].layers[0], x.astype(np.float32))  # from round 1's aggregate, zero momentum
    assert len(list(state_dir.iterdir())) == 1  # fedavgm keeps m only


def test_lost_optimizer_state_or_previous_aggregate_is_said_in_the_round_not_retried_forever(live: Handle) -> None:
    store = live.thread.server.store
    branch, leaves = live.make_branch(2, strategy="fedadam")
    rounds = random_rounds(4, 4, 2)
    play_rounds(live, branch, leaves, rounds[:2])
    lost = sorted(path.name for path in store.state_dir.iterdir())
    for path in store.state_dir.iterdir():  # m and v after round 1, removed by hand
        path.unlink()
    [got] = play_rounds(live, branch, leaves, rounds[2:3], start=2)
    row = live.rounds(branch["id"])[2]
    assert row["strategy"] == "fedadam" and "state after round 2 of run 1 is missing" in row["strategy_note"]
    assert all(name in row["strategy_note"] for name in lost) and "start again from zero" in row["strategy_note"]
    previous = live.fetch(leaves[0], live.rounds(branch["id"])[1]["aggregate_id"]).layers
    x, _, _ = numpy_step("fedadam", check_strategy("fedadam"), previous[0],
                         numpy_mean([u[0][0] for u in rounds[2]], [u[1] for u in rounds[2]]), 0.0, 0.0)
    np.testing.assert_array_equal(got.layers[0], x.astype(np.float32))  # from round 1's aggregate, zero moments

    aggregate = store.get_file(row["aggregate_id"])
    store.file_path(aggregate).unlink()  # the aggregate round 3 steps from
    [got] = play_rounds(live, branch, leaves, rounds[3:], start=3)
    row = live.rounds(branch["id"])[3]
    assert row["strategy"] == "fedavg" and "aggregate of round 3 of run 1" in row["strategy_note"]
    np.testing.assert_array_equal(got.layers[0], numpy_mean([u[0][0] for u in rounds[3]], [u[1] for u in rounds[3]])
                                  .astype(np.float32))
