"""SCAFFOLD on the leaf, framework-free: ScaffoldLeaf's control update against the paper's formula in NumPy over 3
rounds (one of them missed, one a timeout), its state through a restart, and control_<n> members in the archive
format (read apart from the layers, numbered without gaps, checked against the layers)."""

from __future__ import annotations

import numpy as np
import pytest

from branchkey_integrations.core import wire
from branchkey_integrations.core.errors import ArchiveError
from branchkey_integrations.core.scaffold import ScaffoldLeaf, runs_scaffold


def test_the_control_update_is_the_papers_option_two_over_three_rounds() -> None:
    rng = np.random.default_rng(0)
    shapes = [(3, 2), (2,)]
    x = [rng.normal(size=s).astype(np.float32) for s in shapes]
    leaf = ScaffoldLeaf()
    leaf.start(x)
    c_i = [np.zeros(s) for s in shapes]
    c = [np.zeros(s) for s in shapes]
    sums = np.zeros(len(shapes))  # every step since x: a timed-out round's too
    for number in range(3):
        rates = [[0.1, 0.1], [0.05, 0.05], [0.2, 0.0]]  # the second layer is not stepped at the third step
        for step in rates:
            leaf.step(step)
        y = [(a + rng.normal(size=a.shape)).astype(np.float32) for a in x]
        pending = leaf.prepare(y)
        sums = sums + np.sum(rates, axis=0)
        expected = [c_i[j] - c[j] + (x[j].astype(np.float64) - y[j]) / sums[j] for j in range(len(shapes))]
        for j in range(len(shapes)):
            np.testing.assert_allclose(pending.c_i[j], expected[j], rtol=1e-13)  # the sums add up step by step
            assert pending.delta[j].dtype == np.float32
            np.testing.assert_allclose(pending.delta[j], (expected[j] - c_i[j]).astype(np.float32), rtol=1e-6)
        if number == 1:  # a timed-out round: nothing moves, training goes on from the same x
            continue
        c = [rng.normal(size=s) for s in shapes]
        x = [rng.normal(size=s).astype(np.float32) for s in shapes]
        leaf.commit(pending, [a.astype(np.float32) for a in c], x)
        c = [a.astype(np.float32).astype(np.float64) for a in c]  # c reaches the leaf as float32
        c_i, sums = expected, np.zeros(len(shapes))
        for got, want_c, want_c_i in zip(leaf.correction(), c, c_i):
            np.testing.assert_allclose(got, want_c - want_c_i, rtol=1e-13)


def test_untrained_and_unstepped_layers_keep_their_control_and_a_catch_up_keeps_c_i() -> None:
    leaf = ScaffoldLeaf()
    leaf.start([np.ones(2, np.float32), np.ones(2, np.float32), np.arange(2)], trained=[True, False, True])
    leaf.step([0.5, 0.5, 0.5])
    pending = leaf.prepare([np.zeros(2, np.float32), np.zeros(2, np.float32), np.zeros(2, np.int64)])
    assert pending.delta[0].tolist() == [2.0, 2.0] and not pending.delta[1].any() and not pending.delta[2].any()
    assert pending.delta[2].dtype == np.int64  # an integer layer: a zero of its dtype
    leaf.commit(pending, None, [np.zeros(2, np.float32)] * 2 + [np.arange(2)])
    c_i = [a.copy() for a in leaf.c_i]
    leaf.commit(None, [np.ones(2, np.float32)] * 3, [np.zeros(2, np.float32)] * 2 + [np.arange(2)])  # caught up
    assert all(np.array_equal(a, b) for a, b in zip(leaf.c_i, c_i)) and leaf.c[0].tolist() == [1.0, 1.0]
    correction = leaf.correction()
    assert correction[0].tolist() == [-1.0, -1.0] and correction[1] is None and correction[2] is None


def test_state_survives_a_restart_and_refuses_another_models_shapes() -> None:
    leaf = ScaffoldLeaf()
    leaf.start([np.ones(3, np.float32)])
    leaf.step([1.0])
    leaf.commit(leaf.prepare([np.zeros(3, np.float32)]), [np.full(3, 0.5, np.float32)], [np.zeros(3, np.float32)])
    restored = ScaffoldLeaf()
    restored.load_state_dict({k: [a.tolist() for a in v] for k, v in leaf.state_dict().items()})  # plain numbers
    restored.start([np.zeros(3, np.float32)])
    np.testing.assert_array_equal(restored.correction()[0], leaf.correction()[0])
    with pytest.raises(ValueError, match="belongs to another model"):
        restored.start([np.zeros(4, np.float32)])


def test_the_branch_config_decides() -> None:
    assert runs_scaffold({"service": {"algorithm": "scaffold", "config": {"eta_g": 1.0}}})
    assert not runs_scaffold({"service": {"algorithm": "fedavgm"}}) and not runs_scaffold({"service": "x"})


def test_control_members_are_read_apart_from_the_layers_and_checked() -> None:
    layers = [np.ones((2, 2), np.float32), np.zeros(3, np.float32)]
    controls = [np.full((2, 2), 0.5, np.float32), np.full(3, -1.0, np.float32)]
    archive = wire.decode(wire.prepare(layers, 2.0, controls=controls).getvalue())
    assert [a.tolist() for a in archive.layers] == [a.tolist() for a in layers]
    assert [a.tolist() for a in archive.controls] == [a.tolist() for a in controls]
    wire.validate_upload(archive)
    plain = wire.decode(wire.encode(layers))  # a FedAvg aggregate: nothing new, nothing refused
    assert plain.controls == [] and len(plain.layers) == 2
    bad = wire.decode(wire.prepare(layers, 2.0, controls=controls[::-1]).getvalue())
    with pytest.raises(ArchiveError, match="control_0: expected float32\\[2, 2\\], received float32\\[3\\]"):
        wire.validate_upload(bad)
    gap = wire.prepare(layers, 2.0, controls=controls).getvalue().replace(b"control_0", b"control_7")
    with pytest.raises(ArchiveError, match="Controls must be numbered 0..1 without gaps"):
        wire.decode(gap)
    nan = wire.prepare(layers, 2.0, controls=[controls[0], np.array([np.nan, 0, 0], np.float32)]).getvalue()
    with pytest.raises(ArchiveError, match="control_1 holds 1 non-finite"):
        wire.validate_upload(wire.decode(nan))
