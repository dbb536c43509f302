"""Keras SCAFFOLD on one backend, in a process of its own: ``python -m tests.keras.scaffold_leaf '<json config>'``.

Config: ``host``, ``leaf`` and ``partner`` (credential dicts of a two-leaf SCAFFOLD branch), ``out``. The leaf
trains 2 epochs (2 rounds) with plain SGD beside a partner that uploads layers only (as the official client),
then a new callback restored from the first one's ``state_dict`` trains a third round. Writes ``OUT`` (JSON): the
backend, the control updates each upload carried, the leaf's c_i and c after round 2, and the weight change the
SCAFFOLD step made at the second batch of epoch 1 and of epoch 2 (the restored callback), with what it should be.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

LR = 0.1


def main(config: dict) -> None:
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        sys.modules["tensorflow"] = None  # as in tests.keras.leaf: no TensorFlow start-up on the other backends
    import keras

    from branchkey_integrations import Client
    from branchkey_integrations.keras import BranchKeyKerasCallback

    from .models import data, tiny_model

    sent: list[list[list[float]]] = []
    original = Client.upload_arrays

    def spy(self, weighting, parameters, **kwargs):
        sent.append([np.asarray(c, np.float64).tolist() for c in kwargs.get("controls", ())])
        return original(self, weighting, parameters, **kwargs)

    Client.upload_arrays = spy  # type: ignore[method-assign]

    class Partner(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            with Client(config["partner"], host=config["host"], transport="none") as client:
                client.upload_weights(16.0, [np.full(v.shape, 0.25, np.float32) for v in self.model.trainable_weights])

    def weights(model) -> list[np.ndarray]:
        return [np.array(keras.ops.convert_to_numpy(v), np.float64) for v in model.trainable_weights]

    class Around(keras.callbacks.Callback):  # one before and one after the BranchKeyKerasCallback
        def __init__(self) -> None:
            super().__init__()
            self.seen: dict[int, list[np.ndarray]] = {}
            self.epoch = 0

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_begin(self, batch, logs=None):
            if batch == 1:
                self.seen[self.epoch] = weights(self.model)

    x, y = data(16, 0)
    model = tiny_model(seed=0)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse", jit_compile=False)
    callback = BranchKeyKerasCallback(config["leaf"], config["host"], num_samples=len(x), transport="websocket",
                                      timeout=60)
    before, after = Around(), Around()
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
              callbacks=[Partner(), before, callback, after])
    state = callback._scaffold
    step_1 = [(b - a).tolist() for a, b in zip(before.seen[1], after.seen[1])]
    after_round_2 = {"c": [a.tolist() for a in state.c], "c_i": [a.tolist() for a in state.c_i]}

    saved = json.loads(json.dumps({"scaffold": after_round_2}))  # what a file round trip keeps: plain numbers
    resumed = BranchKeyKerasCallback(config["leaf"], config["host"], num_samples=len(x), transport="websocket",
                                     timeout=60)
    resumed.load_state_dict({"round": 2, **saved})
    before, after = Around(), Around()
    model.fit(x, y, batch_size=8, epochs=3, initial_epoch=2, shuffle=False, verbose=0,
              callbacks=[Partner(), before, resumed, after])
    step_2 = [(b - a).tolist() for a, b in zip(before.seen[2], after.seen[2])]
    expected_2 = [(-LR * (np.array(c) - np.array(c_i))).tolist()
                  for c, c_i in zip(after_round_2["c"], after_round_2["c_i"])]
    with open(config["out"], "w") as out:
        json.dump({"backend": keras.backend.backend(), "sent": sent, "after_round_2": after_round_2,
                   "step_epoch_1": step_1, "step_epoch_2": step_2, "expected_epoch_2": expected_2,
                   "rounds": [callback.round, resumed.round]}, out)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
