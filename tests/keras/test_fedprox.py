"""FedProx in BranchKeyKerasCallback (``proximal_mu``): real Keras training on each backend, in a process of its
own (``KERAS_BACKEND`` is read at import), against a real branchkey-local."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ..conftest import REPO

MU = 5.0  # lr 0.1 * mu 5: each batch pulls half the way back to w_g


@pytest.mark.parametrize("backend", ["tensorflow", "torch", "jax"])
def test_a_large_proximal_mu_keeps_the_local_epoch_close_to_the_global_model(inprocess_server, tmp_path, backend):
    server, _ = inprocess_server(1)
    branches = [server.create_branch(1)[0] for _ in range(2)]  # one-leaf branches: each round needs one upload
    out = tmp_path / "result.json"
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    config = {"host": server.url, "branches": branches, "mu": MU, "out": str(out)}
    run = subprocess.run([sys.executable, "-m", "tests.keras.fedprox_leaf", json.dumps(config)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    result = json.loads(out.read_text())
    assert result["backend"] == backend
    plain, prox = result["drift"]["0.0"], result["drift"][str(MU)]
    assert plain > 0.05  # local training really moved the model
    assert prox < 0.5 * plain, result["drift"]
    assert result["is_aggregate"] and not result["is_start"]  # w_g moved to the loaded aggregate
    assert result["freed"] and "proximal_mu=5" in result["repr"]
