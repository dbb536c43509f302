"""Keras FedProx on one backend, in a process of its own: ``python -m tests.keras.fedprox_leaf '<json config>'``.

Config: ``host``, ``branches`` (two one-leaf credential dicts), ``mu`` and ``out``. Trains the same seeded model
on the same data for one epoch with ``proximal_mu=0`` and with ``mu`` (one branch each) and writes ``OUT`` (JSON):
the backend, each run's distance from its starting point at upload, and whether w_g after the round is the
loaded aggregate (and no longer the start).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np


def main(config: dict) -> None:
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        sys.modules["tensorflow"] = None  # as in tests.keras.leaf: no TensorFlow start-up on the other backends
    import keras

    from branchkey_integrations.keras import BranchKeyKerasCallback

    from .models import Recorder, data, tiny_model

    x, y = data(128, 0)
    drifts, anchors = {}, {}
    for mu, credentials in zip((0.0, config["mu"]), config["branches"]):
        model = tiny_model(seed=0)
        start = [np.array(keras.ops.convert_to_numpy(v)) for v in model.trainable_weights]
        callback = BranchKeyKerasCallback(credentials, config["host"], num_samples=len(x), transport="websocket",
                                          timeout=60, proximal_mu=mu)
        upload = Recorder("upload")

        class Spy(keras.callbacks.Callback):  # after the BranchKeyKerasCallback: the aggregate is in place
            def on_epoch_end(self, epoch, logs=None):
                if callback._global is not None:
                    anchor = [keras.ops.convert_to_numpy(g) for g in callback._global]
                    now = [keras.ops.convert_to_numpy(v) for v in self.model.trainable_weights]
                    anchors["is_aggregate"] = all(np.array_equal(a, b) for a, b in zip(anchor, now))
                    anchors["is_start"] = all(np.array_equal(a, b) for a, b in zip(anchor, start))

        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[upload, callback, Spy()])
        sent = [upload.records[0][v.path] for v in model.trainable_weights]
        drifts[str(mu)] = float(np.sqrt(sum(np.sum((a.astype(np.float64) - b) ** 2) for a, b in zip(sent, start))))
        anchors["freed"] = callback._global is None
        anchors["repr"] = repr(callback)
    with open(config["out"], "w") as out:
        json.dump({"backend": keras.backend.backend(), "drift": drifts, **anchors}, out)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
