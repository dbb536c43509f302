"""BranchKeyKerasCallback in real Keras training, leaves in processes of their own, against a real branchkey-local.

One backend per process (``KERAS_BACKEND`` is read when keras is imported), and MirroredStrategy's logical
devices must exist before TensorFlow initializes: both need fresh processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from ..conftest import REPO

# no keras import here: this process only starts leaves and checks what they wrote
PARAMS = ["tiny/stem/kernel", "tiny/stem/bias", "tiny/head/kernel", "tiny/head/bias"]


def weighted_mean(uploads: list[dict[str, np.ndarray]], weights: list[float], names: list[str]) -> dict:
    total = float(sum(weights))
    return {n: (sum(w * u[n].astype(np.float64) for u, w in zip(uploads, weights)) / total).astype(np.float32)
            for n in names}


def start_leaf(tmp_path: Path, label: str, backend: str, **config) -> tuple[Path, Path, subprocess.Popen]:
    out = tmp_path / label
    log_path = tmp_path / f"{label}.log"
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "tests.keras.leaf", json.dumps({**config, "out": str(out)})],
                                   cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return out, log_path, process


def finish(leaves, timeout: float = 150) -> list[dict]:
    results = []
    for out, log_path, process in leaves:
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            raise AssertionError(f"leaf {out.name} still running after {timeout} s:\n{log_path.read_text()[-3000:]}")
        assert code == 0, log_path.read_text()[-3000:]
        results.append(json.loads((out / "done.json").read_text()))
    return results


def load_round(out: Path, label: str, number: int) -> dict[str, np.ndarray]:
    return dict(np.load(out / f"{label}_{number}.npz"))


def run_three_leaves(backend: str, server_factory, tmp_path, mirrored_first: bool = False) -> list[Path]:
    """Three leaves, 3 rounds: every leaf ends every round holding the weighted average of the uploads."""
    server, credentials = server_factory(3)
    samples, rounds = [16, 24, 40], 3
    leaves = [start_leaf(tmp_path, f"leaf{i}", backend, credentials=str(creds), host=server.url, samples=count,
                         seed=i, epochs=rounds, mirrored=mirrored_first and i == 0)
              for i, (creds, count) in enumerate(zip(credentials, samples))]
    results = finish(leaves)
    assert [r["backend"] for r in results] == [backend] * 3
    for result in results:
        assert result["round"] == rounds and result["uploads"] == rounds  # one upload per round and leaf
        assert result["history"]["branchkey_round"] == [1.0, 2.0, 3.0]
        assert all(w >= 0 for w in result["history"]["branchkey_wait_s"])
    outs = [out for out, _, _ in leaves]
    for number in range(1, rounds + 1):
        sent = [load_round(out, "upload", number) for out in outs]
        loaded = [load_round(out, "loaded", number) for out in outs]
        expected = weighted_mean(sent, samples, PARAMS)
        for name in PARAMS:
            np.testing.assert_allclose(loaded[0][name], expected[name], rtol=1e-6, atol=1e-7)
            for other in loaded[1:]:
                np.testing.assert_array_equal(other[name], loaded[0][name])  # bit-identical on every leaf
        assert not np.array_equal(sent[0][PARAMS[0]], sent[1][PARAMS[0]])  # local training differed
    return outs


def test_three_tensorflow_leaves_one_on_mirrored_strategy_hold_the_weighted_average(server_factory, tmp_path):
    """Leaf 0 trains under MirroredStrategy on 2 logical CPUs (sharing the TF start-up cost of this test):
    its one client uploads once per round, and both replicas hold the aggregate after every round."""
    mirrored = run_three_leaves("tensorflow", server_factory, tmp_path, mirrored_first=True)[0]
    for number in (1, 2, 3):
        loaded = load_round(mirrored, "loaded", number)
        assert {f"{PARAMS[0]}@0", f"{PARAMS[0]}@1"} <= set(loaded)  # really two replicas
        for name in PARAMS:
            np.testing.assert_array_equal(loaded[f"{name}@0"], loaded[name])
            np.testing.assert_array_equal(loaded[f"{name}@1"], loaded[name])


def test_three_torch_leaves_hold_the_weighted_average(server_factory, tmp_path):
    run_three_leaves("torch", server_factory, tmp_path)


def test_three_jax_leaves_hold_the_weighted_average(server_factory, tmp_path):
    run_three_leaves("jax", server_factory, tmp_path)  # the third Keras backend, CPU build
