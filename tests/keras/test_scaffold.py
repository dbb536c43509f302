"""SCAFFOLD in BranchKeyKerasCallback, on each backend in a process of its own, against a real branchkey-local: 2
rounds in a SCAFFOLD branch beside a leaf that sends no controls (as the official client), the control step
exactly ``-lr (c - c_i)``, the control updates and c as the paper says, and a callback restored from
``state_dict`` (through plain numbers, as a file keeps them) that corrects with the restored c_i."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ..conftest import REPO
from .scaffold_leaf import LR


@pytest.mark.parametrize("backend", ["tensorflow", "torch", "jax"])
def test_two_scaffold_rounds_and_a_restored_leaf(inprocess_server, tmp_path, backend):
    server, (leaf, partner) = inprocess_server(2)
    answer = server.admin("PUT", f"/admin/v1/branches/{leaf['branch_id']}/strategy", json={"strategy": "scaffold"})
    assert answer.status_code == 200, answer.text
    out = tmp_path / "result.json"
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    config = {"host": server.url, "leaf": leaf, "partner": partner, "out": str(out)}
    run = subprocess.run([sys.executable, "-m", "tests.keras.scaffold_leaf", json.dumps(config)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    result = json.loads(out.read_text())
    assert result["backend"] == backend and result["rounds"] == [2, 3]
    ours = [[np.array(c) for c in controls] for controls in result["sent"] if controls]
    assert len(ours) == 3 and len(result["sent"]) == 6  # the partner's three uploads carry none
    delta_1, delta_2 = ours[0], ours[1]
    # epoch 1: c - c_i = delta_1 / 2 - delta_1 (N = 2, the partner's delta is 0): the step moves w by lr delta_1 / 2
    for step, d1 in zip(result["step_epoch_1"], delta_1):
        assert np.abs(d1).max() > 1e-3
        np.testing.assert_allclose(step, LR * d1 / 2, rtol=1e-4, atol=1e-6)
    state = result["after_round_2"]
    for c, c_i, d1, d2 in zip(state["c"], state["c_i"], delta_1, delta_2):
        np.testing.assert_allclose(c_i, d1 + d2, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(c, (d1 + d2) / 2, rtol=1e-6, atol=1e-7)
    for step, expected in zip(result["step_epoch_2"], result["expected_epoch_2"]):  # the restored c_i is used
        assert np.abs(expected).max() > 1e-4
        np.testing.assert_allclose(step, expected, rtol=1e-4, atol=1e-6)


def test_the_gradient_correction_is_refused_on_keras_and_a_bad_value_everywhere():
    from branchkey_integrations.keras import BranchKeyKerasCallback

    from .test_callback import CREDS, HOST

    with pytest.raises(ValueError, match="Expected scaffold_correction='decoupled' on Keras"):
        BranchKeyKerasCallback(CREDS, HOST, num_samples=8, scaffold_correction="gradient")
    with pytest.raises(ValueError, match=r"Expected scaffold_correction in \('decoupled', 'gradient'\)"):
        BranchKeyKerasCallback(CREDS, HOST, num_samples=8, scaffold_correction="paper")
    assert BranchKeyKerasCallback(CREDS, HOST, num_samples=8).scaffold_correction == "decoupled"
