"""SCAFFOLD against a real branchkey-local: the server's step and the leaves' control updates equal an independent
NumPy implementation of the paper (option II) over 3 rounds of partial participation (3 leaves, min_leaves 2, one
of them a client that sends no controls, as the official one), and control members stay out of other branches."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from branchkey_integrations.core import wire
from branchkey_integrations.core.protocol import CONTROLLED_ALGORITHMS
from branchkey_integrations.core.scaffold import ScaffoldLeaf
from branchkey_integrations.server.strategies import STRATEGIES

from .conftest import Handle
from .test_strategies import numpy_mean

TARGETS = [np.array([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]]), np.array([[-1.0, 2.0, 4.0], [0.0, 1.0, 1.0]]),
           np.array([[0.0, 0.0, -3.0], [2.0, -2.0, 0.0]])]  # leaf i's local loss: 0.5 ||w - t_i||^2
WEIGHTINGS = [10.0, 20.0, 30.0]
RATES = [0.1, 0.2, 0.1]  # the K = 3 local steps' learning rates
PARTICIPANTS = [(0, 1), (1, 2), (2, 0)]  # leaf 2 sends no controls (an official client in a SCAFFOLD branch)
OFFICIAL = 2


def local_training(x: np.ndarray, target: np.ndarray, correction: np.ndarray | None) -> np.ndarray:
    """K corrected SGD steps from ``x`` (float64), uploaded as float32."""
    w = x.astype(np.float64)
    for lr in RATES:
        w = w - lr * ((w - target) + (correction if correction is not None else 0.0))
    return w.astype(np.float32)


def reference(eta_g: float, x0: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, list[np.ndarray]]]:
    """The paper's algorithm in plain NumPy, with the wire's float32 at the points where arrays travel: per round
    the aggregate's x and c (float32) and every leaf's c_i (float64)."""
    x, c, c_i = x0, np.zeros(x0.shape), [np.zeros(x0.shape) for _ in TARGETS]
    out = []
    for members in PARTICIPANTS:
        ys, deltas = [], []
        for i in members:
            c_leaf = c.astype(np.float32).astype(np.float64)  # c reaches the leaf in the aggregate, as float32
            y = local_training(x, TARGETS[i], None if i == OFFICIAL else c_leaf - c_i[i])
            ys.append(y)
            if i != OFFICIAL:
                c_new = c_i[i] - c_leaf + (x.astype(np.float64) - y.astype(np.float64)) / sum(RATES)
                deltas.append((c_new - c_i[i]).astype(np.float32))
                c_i[i] = c_new
        mean = numpy_mean(ys, [WEIGHTINGS[i] for i in members])
        x_prev = x
        x = mean if not out or eta_g == 1 else (
            x_prev.astype(np.float64) + eta_g * (mean.astype(np.float64) - x_prev.astype(np.float64))).astype(np.float32)
        c = c + sum(d.astype(np.float64) for d in deltas) / len(TARGETS)  # (|S| / N) mean(delta c_i)
        out.append((x, c.astype(np.float32), [a.copy() for a in c_i]))
    return out


@pytest.mark.parametrize("eta_g", [1.0, 0.5])
def test_server_and_leaf_updates_equal_numpy_over_three_partial_rounds(live: Handle, caplog, eta_g: float) -> None:
    caplog.set_level(logging.INFO, logger="branchkey_integrations.server")
    branch, leaves = live.make_branch(3, strategy="scaffold", strategy_params={"eta_g": eta_g}, min_leaves=2)
    x0 = np.array([[0.5, 0.5, 0.5], [-0.5, -0.5, -0.5]], np.float32)
    expected = reference(eta_g, x0)
    states = [ScaffoldLeaf() for _ in TARGETS]
    seen: list[tuple[np.ndarray, list[np.ndarray] | None]] = [(x0, None)] * len(TARGETS)  # each leaf's last aggregate
    for index, members in enumerate(PARTICIPANTS):
        for i in members:
            x, controls = seen[i]
            if i == OFFICIAL:
                y = local_training(x.astype(np.float64), TARGETS[i], None)
                body = wire.encode([y], WEIGHTINGS[i])
            else:
                leaf = states[i]
                leaf.commit(None, controls, [x]) if controls is not None else leaf.start([x])
                correction = leaf.correction()
                w = x.astype(np.float64)
                for lr in RATES:  # what a callback does: the corrected step, then the step's rate
                    w = w - lr * ((w - TARGETS[i]) + (correction[0] if correction is not None else 0.0))
                    leaf.step([lr])
                y = w.astype(np.float32)
                pending = leaf.prepare([y])
                leaf.commit(pending, controls, [x])  # c_i moves on; the next round's start is set when it begins
                body = wire.prepare([y], WEIGHTINGS[i], controls=pending.delta).getvalue()
            assert live.upload(leaves[i], body).status_code == 201
        aggregate = live.fetch(leaves[0], live.wait_aggregate(branch["id"], index=index))
        x_ref, c_ref, c_i_ref = expected[index]
        np.testing.assert_array_equal(aggregate.layers[0], x_ref)
        np.testing.assert_array_equal(aggregate.controls[0], c_ref)
        for i in range(len(TARGETS)):
            if i != OFFICIAL and states[i].c_i is not None:
                np.testing.assert_allclose(states[i].c_i[0], c_i_ref[i], rtol=0, atol=1e-12)
        seen = [(aggregate.layers[0], list(aggregate.controls))] * len(TARGETS)
    rounds = live.rounds(branch["id"])
    assert [r["strategy"] for r in rounds[:3]] == ["scaffold"] * 3
    assert "1 of 2 uploads carry no control update" in (rounds[1]["strategy_note"] or "")
    assert any("carry no control_<n> members: counted with delta c = 0" in r.getMessage() for r in caplog.records)


def test_controls_are_refused_outside_scaffold_branches_and_never_in_their_aggregates(live: Handle) -> None:
    branch, (a, b) = live.make_branch(2)
    layer = np.ones((2, 3), np.float32)
    refused = live.upload(a, wire.prepare([layer], 1.0, controls=[layer]).getvalue())
    assert refused.status_code == 400 and "control_<n> members are SCAFFOLD's" in refused.text and "'fedavg'" in refused.text
    for leaf in (a, b):
        assert live.upload(leaf, wire.encode([layer], 1.0)).status_code == 201
    aggregate = live.fetch(a, live.wait_aggregate(branch["id"]))
    assert aggregate.controls == [] and len(aggregate.layers) == 1


def test_a_scaffold_upload_whose_controls_do_not_match_its_layers_is_refused(live: Handle) -> None:
    _, (a, _) = live.make_branch(2, strategy="scaffold")
    layers = [np.ones((2, 3), np.float32), np.ones(3, np.float32)]
    for controls, named in (([np.ones((3, 2), np.float32), np.ones(3, np.float32)], "control_0"),
                            ([np.ones((2, 3), np.float32)], "expected 2 layers, received 1")):
        answer = live.upload(a, wire.prepare(layers, 1.0, controls=controls).getvalue())
        assert answer.status_code == 400 and named in answer.text, answer.text


def test_the_protocol_and_the_catalogue_agree_on_which_algorithms_carry_controls() -> None:
    assert sorted(name for name, cls in STRATEGIES.items() if cls.carries_controls) == sorted(CONTROLLED_ALGORITHMS)


def test_c_is_kept_in_the_store_across_a_restart(start_server, tmp_path) -> None:
    first = start_server(tmp_path / "data")
    branch, leaves = first.make_branch(2, strategy="scaffold")
    rng = np.random.default_rng(3)
    deltas = [[rng.normal(size=4).astype(np.float32) for _ in leaves] for _ in range(2)]
    layer = np.zeros(4, np.float32)
    for leaf, delta in zip(leaves, deltas[0]):
        assert first.upload(leaf, wire.prepare([layer], 1.0, controls=[delta]).getvalue()).status_code == 201
    first.wait_aggregate(branch["id"])
    first.thread.stop()  # the store and its state files are all that survive
    first.thread.stop = lambda: None  # type: ignore[method-assign] - the fixture would stop it again
    second = start_server(tmp_path / "data")
    for leaf, delta in zip(leaves, deltas[1]):
        assert second.upload(leaf, wire.prepare([layer], 1.0, controls=[delta]).getvalue()).status_code == 201
    aggregate = second.fetch(leaves[0], second.wait_aggregate(branch["id"], index=1))
    c = (np.zeros(4) + deltas[0][0].astype(np.float64) + deltas[0][1]) / 2  # c + sum(delta c_i) / N, as the server
    c = c + (np.zeros(4) + deltas[1][0].astype(np.float64) + deltas[1][1]) / 2
    np.testing.assert_array_equal(aggregate.controls[0], c.astype(np.float32))
