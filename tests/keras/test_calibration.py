"""Calibration in the Keras callback: two classifying leaves in processes of their own against a real
branchkey-local end with the bit-identical calibrated final layer; calibration_data is required at construction,
and a final layer that calibration cannot refit is refused before any training, naming what to pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from branchkey_integrations.keras import BranchKeyKerasCallback
from branchkey_integrations.keras_head import dense_head

from ..conftest import CREDS, REPO


def classifier(activation: str | None = None) -> keras.Model:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="relu", name="stem"),
                              keras.layers.Dense(3, activation=activation, name="logits")], name="classifier")
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_two_leaves_end_with_the_identical_calibrated_layer(server_factory, tmp_path):
    server, credentials = server_factory(2)
    env = {**os.environ, "KERAS_BACKEND": "torch", "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    leaves = []
    for index, creds in enumerate(credentials):
        config = {"credentials": str(creds), "host": server.url, "out": str(tmp_path / f"leaf{index}"), "seed": index}
        with open(tmp_path / f"leaf{index}.log", "w") as log:
            leaves.append(subprocess.Popen([sys.executable, "-m", "tests.keras.calibration_leaf", json.dumps(config)],
                                           cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    for index, process in enumerate(leaves):
        assert process.wait(180) == 0, (tmp_path / f"leaf{index}.log").read_text()[-4000:]
    done = [json.loads((tmp_path / f"leaf{i}" / "done.json").read_text()) for i in range(2)]
    assert done == [{"backend": "torch", "round": 2, "analytics_rounds": 1}] * 2
    before, after = ([dict(np.load(tmp_path / f"leaf{i}" / name)) for i in range(2)]
                     for name in ("head_before.npz", "head.npz"))
    for key in ("weight", "bias"):
        assert before[0][key].tobytes() == before[1][key].tobytes()  # both start from the last aggregate
        assert after[0][key].tobytes() == after[1][key].tobytes()  # and end with the same calibrated bytes
        assert np.abs(after[0][key] - before[0][key]).max() > 1e-3  # which calibration changed
    log = (tmp_path / "leaf0.log").read_text()
    assert "calibration: final layer refit from 2 leaves' class statistics (classes [0, 1, 2])" in log


def test_calibrate_head_needs_calibration_data_at_construction():
    with pytest.raises(ValueError, match=r"calibrate_head needs calibration_data=\(x, y\).*Received: "
                                         r"calibration_data=NoneType"):
        BranchKeyKerasCallback(CREDS, "http://127.0.0.1:9", num_samples=4, calibrate_head=True)
    with pytest.raises(ValueError, match="Received: calibrate_head='every:x'"):
        BranchKeyKerasCallback(CREDS, "http://127.0.0.1:9", num_samples=4, calibrate_head="every:x")


def test_a_head_layer_that_calibration_cannot_refit_is_refused_at_construction():
    model = classifier()
    x, y = np.ones((4, 4), np.float32), np.array([0, 1, 2, 0])

    def build(head):
        return BranchKeyKerasCallback(CREDS, "http://127.0.0.1:9", num_samples=4, calibrate_head=True,
                                      calibration_data=(x, y), head=head)

    with pytest.raises(ValueError, match=r"the Dense layer 'stem' has activation 'relu'.*Pass head=<the Dense layer "
                                         r"that makes the logits> \(the layer, or its name\), or calibrate_head=False"):
        build(model.get_layer("stem"))
    with pytest.raises(ValueError, match=r"head=<BatchNormalization 'norm'> is a BatchNormalization, not a "
                                         r"keras.layers.Dense: .* Pass head=<the Dense layer that makes the logits>"):
        build(keras.layers.BatchNormalization(name="norm"))
    with pytest.raises(ValueError, match=r"Expected head to be the Dense layer that makes the logits, its name, or "
                                         r"None .* Received: head=3"):
        build(3)
    with pytest.raises(ValueError, match="Expected head to be the final linear layer, its name, or None"):
        build("")
    assert build(model.get_layer("logits")).head is model.get_layer("logits")  # a linear Dense is taken
    assert dense_head(model, model.get_layer("logits")) is model.get_layer("logits")
    with pytest.raises(ValueError, match=r"head=<Dense 'logits'> is not a layer of model 'classifier' \(the model "
                                         r"fit trains\)"):
        dense_head(model, classifier().get_layer("logits"))


def test_a_final_layer_that_is_not_a_linear_dense_is_refused_before_training():
    x, y = np.ones((4, 4), np.float32), np.array([0, 1, 2, 0])
    model = classifier("relu")
    callback = BranchKeyKerasCallback(CREDS, "http://127.0.0.1:9", num_samples=4, calibrate_head=True,
                                      calibration_data=(x, y))
    weights = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match=r"the Dense layer 'logits' has activation 'relu'.*Pass head=<the Dense layer "
                                         r"that makes the logits> \(the layer, or its name\) \(this model's Dense "
                                         r"layers: \['stem', 'logits'\]\)"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    assert all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights()))  # nothing trained
    with pytest.raises(ValueError, match="head='nope' names no layer of model 'classifier'"):
        dense_head(classifier(), "nope")
    assert dense_head(classifier("softmax")).name == "logits"
