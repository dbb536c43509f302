"""A round that waits for more uploads folds its first one early (``RunningSum.fold_first``, called by the round
logic while the others arrive): the mean written is the same bytes as when both are folded at the second."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from branchkey_integrations.core import wire
from branchkey_integrations.server.aggregation import RunningSum

from .test_running_sum import numpy_mean, stored


def _uploads(seed: int) -> list[tuple[list[np.ndarray], float]]:
    rng = np.random.default_rng(seed)
    return [([rng.normal(size=(40, 30)).astype(np.float32), rng.integers(-50, 50, 7)], weighting)
            for weighting in (10.0, 11.0)]


def test_the_first_upload_folded_early_gives_the_same_mean_bit_for_bit(tmp_path: Path) -> None:
    uploads = _uploads(5)
    refs = stored(tmp_path, uploads)
    early, late = RunningSum(), RunningSum()
    early.sync(refs[:1])
    early.fold_first()
    early.fold_first()  # once: a second call folds nothing again
    early.sync(refs)
    late.sync(refs)
    early.write(tmp_path / "early.npz")
    late.write(tmp_path / "late.npz")
    assert (tmp_path / "early.npz").read_bytes() == (tmp_path / "late.npz").read_bytes()
    for got, want in zip(wire.decode(tmp_path / "early.npz").layers, numpy_mean(uploads)):
        np.testing.assert_array_equal(got, want)


def test_a_replaced_first_upload_is_folded_again_from_the_files(tmp_path: Path) -> None:
    first, second = _uploads(6), _uploads(7)
    running = RunningSum()
    running.sync(stored(tmp_path, first)[:1])
    running.fold_first()
    replaced = stored(tmp_path, second)  # the same leaves, new files: the held sum is started again
    running.sync(replaced)
    running.write(tmp_path / "mean.npz")
    for got, want in zip(wire.decode(tmp_path / "mean.npz").layers, numpy_mean(second)):
        np.testing.assert_array_equal(got, want)
