"""Calibration options of the Keras callback: calibration_data is required at construction, and a final layer
that calibration cannot refit is refused when fit begins, before any training, naming what to pass."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from branchkey_integrations.keras import BranchKeyKerasCallback
from branchkey_integrations.keras_head import dense_head

from ..conftest import CREDS


def classifier(activation: str | None = None) -> keras.Model:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="relu", name="stem"),
                              keras.layers.Dense(3, activation=activation, name="logits")], name="classifier")
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_calibrate_head_needs_calibration_data_at_construction():
    with pytest.raises(ValueError, match=r"calibrate_head needs calibration_data=\(x, y\).*Received: "
                                         r"calibration_data=NoneType"):
        BranchKeyKerasCallback(CREDS, "http://127.0.0.1:9", num_samples=4, calibrate_head=True)
    with pytest.raises(ValueError, match="Received: calibrate_head='every:x'"):
        BranchKeyKerasCallback(CREDS, "http://127.0.0.1:9", num_samples=4, calibrate_head="every:x")


def test_a_final_layer_that_is_not_a_linear_dense_is_refused_before_training():
    x, y = np.ones((4, 4), np.float32), np.array([0, 1, 2, 0])
    model = classifier("relu")
    callback = BranchKeyKerasCallback(CREDS, "http://127.0.0.1:9", num_samples=4, calibrate_head=True,
                                      calibration_data=(x, y))
    weights = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match=r"the Dense layer 'logits' has activation 'relu'.*Pass head='<name of the "
                                         r"Dense layer that makes the logits>' \(this model's Dense layers: "
                                         r"\['stem', 'logits'\]\)"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    assert all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights()))  # nothing trained
    with pytest.raises(ValueError, match="head='nope' names no layer of model 'classifier'"):
        dense_head(classifier(), "nope")
    assert dense_head(classifier("softmax")).name == "logits"
