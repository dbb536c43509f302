"""Classifier calibration against a real branchkey-local (the in-process app): the combined statistics equal
NumPy's on the pooled features, exactly; every leaf refits the identical final layer; a class that no leaf sent
keeps its row and is said; a class under min_class_count stays on its leaf; and the options' checks."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from branchkey_integrations import Federation
from branchkey_integrations.core.errors import AnalyticsError
from branchkey_integrations.core.head_calibration import CalibrationPlan, calibrate
from branchkey_integrations.core.head_refit import refit_head
from branchkey_integrations.core.head_statistics import COUNTS, OUTER, SUMS, HeadStatistics, head_statistics

from .test_federation import in_thread

CLASSES, WIDTH = 4, 3  # class 3 is on no leaf


def leaf_data(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features that are multiples of 1/4 (every sum exact in float64, in any order) and labels 0-2."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, 20 + 5 * seed)
    features = (rng.integers(0, 16, (labels.size, WIDTH)) / 4.0 + 4 * labels[:, None]).astype(np.float32)
    return features, labels


def federations(inprocess_server, leaves: int) -> list[Federation]:
    server, credentials = inprocess_server(leaves)
    made = [Federation(c, host=server.url, transport="websocket", timeout=30) for c in credentials]
    for federation in made:
        federation.connect()
    return made


def run_all(fn, made, *args_per_leaf):
    boxes = [in_thread(fn, federation, *args) for federation, args in zip(made, zip(*args_per_leaf))]
    for box in boxes:
        box["thread"].join(60)
    assert all("result" in box for box in boxes), [box.get("error") for box in boxes]
    return [box["result"] for box in boxes]


def test_the_combined_statistics_equal_numpys_on_the_pooled_features_exactly(inprocess_server):
    made = federations(inprocess_server, 3)
    data = [leaf_data(seed) for seed in range(3)]
    try:
        results = run_all(lambda f, x, y: f.analytics_round(fields=head_statistics(x, y, CLASSES)[0]), made,
                          [x for x, _ in data], [y for _, y in data])
    finally:
        for federation in made:
            federation.close()
    x = np.concatenate([x for x, _ in data]).astype(np.float64)
    y = np.concatenate([y for _, y in data])
    stats = HeadStatistics.from_fields(results[0].fields)
    assert stats.counts.dtype == np.int64 and stats.sums.dtype == np.float64
    np.testing.assert_array_equal(stats.counts, np.bincount(y, minlength=CLASSES))
    np.testing.assert_array_equal(stats.sums, np.stack([x[y == c].sum(axis=0) for c in range(CLASSES)]))
    np.testing.assert_array_equal(stats.outer, x.T @ x)
    assert {name: results[0].fields[name].shape for name in (COUNTS, SUMS, OUTER)} == {
        COUNTS: (CLASSES,), SUMS: (CLASSES, WIDTH), OUTER: (WIDTH * (WIDTH + 1) // 2,)}
    means = np.stack([x[y == c].mean(axis=0) for c in range(3)])
    within = sum((x[y == c] - means[c]).T @ (x[y == c] - means[c]) for c in range(3)) / (y.size - 3)
    np.testing.assert_allclose(stats.means(), means, rtol=1e-12)
    np.testing.assert_allclose(stats.within_covariance(), within, rtol=1e-9, atol=1e-12)


def test_every_leaf_refits_the_identical_layer_and_an_absent_class_keeps_its_row(inprocess_server, caplog):
    made = federations(inprocess_server, 3)
    data = [leaf_data(seed) for seed in range(3)]
    weight = np.arange(CLASSES * WIDTH, dtype=np.float32).reshape(CLASSES, WIDTH)
    bias = np.full(CLASSES, 0.5, np.float32)
    said: list[list[str]] = [[], [], []]
    plan = CalibrationPlan.of(True, min_class_count=1)
    try:
        with caplog.at_level(logging.WARNING, logger="branchkey_integrations.core.head_refit"):
            refits = run_all(lambda f, x, y, say: calibrate(f, x, y, weight, bias, plan, say.append), made,
                             [x for x, _ in data], [y for _, y in data], said)
    finally:
        for federation in made:
            federation.close()
    assert len({refit.digest() for refit in refits}) == 1  # bit-identical on every leaf
    assert refits[0].refit == [0, 1, 2] and refits[0].untouched == [3]
    np.testing.assert_array_equal(refits[0].weight[3], weight[3])  # the absent class's row, untouched
    assert refits[0].bias[3] == 0.5 and not np.array_equal(refits[0].weight[:3], weight[:3])
    assert all("classes [3] were sent by no leaf and keep their rows" in lines[-1] for lines in said)
    assert "classes [3] were sent by no leaf" in caplog.text
    x = np.concatenate([x for x, _ in data]).astype(np.float64)
    y = np.concatenate([y for _, y in data])
    logits = x @ refits[0].weight[:3].T + refits[0].bias[:3]
    assert (logits.argmax(axis=1) == y).mean() > 0.9  # the refit separates the classes it saw


def test_a_class_under_min_class_count_stays_on_its_leaf_and_is_said(caplog):
    x, y = leaf_data(0)
    y[:2] = 3  # two samples of class 3 here: under min_class_count=3
    with caplog.at_level(logging.INFO, logger="branchkey_integrations.core.head_statistics"):
        fields, withheld = head_statistics(x, y, CLASSES, min_class_count=3)
    assert withheld == [3] and fields[COUNTS][3] == 0 and not fields[SUMS][3].any()
    kept = x[y != 3].astype(np.float64)
    np.testing.assert_array_equal(HeadStatistics.from_fields(fields).outer, kept.T @ kept)
    assert "classes [3] have fewer than min_class_count=3" in caplog.text


@pytest.mark.parametrize("value, message", [
    ("every:0", "Expected calibrate_head to be False, True, 'end' or 'every:K'"),
    ("sometimes", "Received: calibrate_head='sometimes'"),
    (1, "Received: calibrate_head=1"),
])
def test_calibration_options_are_checked_naming_the_value(value, message):
    with pytest.raises(ValueError, match=message):
        CalibrationPlan.of(value)
    with pytest.raises(ValueError, match="Expected min_class_count to be an int >= 1. Received: min_class_count=0"):
        CalibrationPlan.of(True, min_class_count=0)


def test_statistics_of_another_layer_or_no_class_are_refused():
    fields, _ = head_statistics(np.ones((2, 3)), np.array([0, 1]), 2)
    with pytest.raises(AnalyticsError, match=r"weight \(2, 4\) and bias \(2,\); the statistics are of 2 classes of 3"):
        refit_head(HeadStatistics.from_fields(fields), np.zeros((2, 4)), np.zeros(2))
    with pytest.raises(AnalyticsError, match="labels from 0 to 1"):
        head_statistics(np.ones((2, 3)), np.array([0, 2]), 2)
    with pytest.raises(AnalyticsError, match="has no head_class_n"):
        HeadStatistics.from_fields({SUMS: fields[SUMS], OUTER: fields[OUTER]})
