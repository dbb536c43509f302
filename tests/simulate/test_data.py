"""Partitions of the digits data: disjoint, complete, skewed as asked, and refused when impossible."""

from __future__ import annotations

import numpy as np
import pytest

from branchkey_integrations.core.errors import PartitionError
from branchkey_integrations.simulation.data import Split, load_digits_split, partition


@pytest.fixture(scope="module")
def train() -> Split:
    return load_digits_split(seed=0)[0]


def _rows(split: Split) -> set[bytes]:
    return {row.tobytes() + bytes([label]) for row, label in zip(split.x, split.y)}


@pytest.mark.parametrize("how", ["iid", "dirichlet"])
def test_parts_are_disjoint_and_cover_the_training_set(train, how):
    parts = partition(train, 5, how, alpha=0.5, seed=3)
    assert sum(len(p) for p in parts) == len(train)
    assert set().union(*(_rows(p) for p in parts)) == _rows(train)


def test_test_set_is_stratified_and_disjoint_from_training():
    train, test = load_digits_split(seed=1)
    assert len(train) + len(test) == 1797
    assert min(test.label_counts()) >= 35  # every class is in the common test set
    assert not _rows(train) & _rows(test)


def test_dirichlet_skews_labels_and_alpha_controls_how_much(train):
    def mean_classes_per_leaf(alpha: float) -> float:
        parts = partition(train, 5, "dirichlet", alpha=alpha, seed=0)
        return float(np.mean([sum(c >= 5 for c in p.label_counts()) for p in parts]))

    assert mean_classes_per_leaf(0.1) < mean_classes_per_leaf(0.5) < mean_classes_per_leaf(100.0) == 10


def test_minimum_per_leaf_holds_and_same_seed_same_partition(train):
    first = partition(train, 10, "dirichlet", alpha=0.1, min_samples=20, seed=7)
    assert min(len(p) for p in first) >= 20
    again = partition(train, 10, "dirichlet", alpha=0.1, min_samples=20, seed=7)
    assert all(np.array_equal(a.y, b.y) for a, b in zip(first, again))


def test_impossible_partitions_are_refused_with_the_fix(train):
    with pytest.raises(PartitionError, match="Use fewer leaves"):
        partition(train, 200, "iid", min_samples=10)
    with pytest.raises(PartitionError, match="Raise alpha"):
        partition(train, 50, "dirichlet", alpha=0.01, min_samples=28)
    with pytest.raises(PartitionError, match="Expected partition in"):
        partition(train, 2, "shards")
