"""A classifying Keras leaf that federates every epoch and calibrates its final layer when training ends:
``python -m tests.keras.calibration_leaf '<json config>'`` (``credentials``, ``host``, ``out``, ``seed``), on the
backend ``KERAS_BACKEND`` names. Writes ``OUT/head_before.npz`` (the final layer as the last aggregate left it),
``OUT/head.npz`` (after calibration) and ``OUT/done.json``."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np


def labelled(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three classes in 4-D, this leaf holding mostly two of them (class 2 only on leaf 1): label skew."""
    rng = np.random.default_rng(seed)
    y = np.array([seed % 2, 2 * (seed % 2)] * 12)
    x = rng.normal(size=(y.size, 4)) + 3 * np.eye(4)[y]
    return x.astype("float32"), y


def main(config: dict) -> None:
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        sys.modules["tensorflow"] = None  # as in tests.keras.leaf: no TensorFlow start-up on the other backends
    logging.basicConfig(level=logging.INFO)
    import keras

    from branchkey_integrations.keras import BranchKeyKerasCallback
    from branchkey_integrations.keras_head import head_arrays

    class Before(keras.callbacks.Callback):  # after the BranchKey callback: the head the last aggregate left
        def on_epoch_end(self, epoch, logs=None):
            weight, bias = head_arrays(self.model.get_layer("logits"))
            np.savez(out / "head_before.npz", weight=weight, bias=bias)

    out = Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(0)  # the same initial model on every leaf
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="relu", name="stem"),
                              keras.layers.Dense(3, name="logits")], name="classifier")
    model.compile(optimizer=keras.optimizers.Adam(0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
    x, y = labelled(config["seed"])
    callback = BranchKeyKerasCallback(config["credentials"], config["host"], num_samples=len(x), transport="websocket",
                                      timeout=60, log_every_s=5, calibrate_head=True, calibration_data=(x, y))
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=2, callbacks=[callback, Before()])
    weight, bias = head_arrays(model.get_layer("logits"))
    np.savez(out / "head.npz", weight=weight, bias=bias)
    (out / "done.json").write_text(json.dumps({"backend": keras.backend.backend(), "round": callback.round,
                                               "analytics_rounds": callback.federation.analytics_rounds}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
