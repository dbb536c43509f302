"""One Keras leaf in a process of its own: ``python -m tests.keras.leaf '<json config>'``.

The caller picks the backend with ``KERAS_BACKEND`` in the environment. Config keys: credentials, host,
out, samples, seed, epochs, and ``mirrored`` (train under MirroredStrategy on 2 logical CPU devices,
TensorFlow only: they must be configured before TensorFlow initializes, hence a process of its own).
Writes ``OUT/upload_<r>.npz`` and ``OUT/loaded_<r>.npz`` per round and finally ``OUT/done.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np


def _mirrored_scope():
    import tensorflow as tf

    cpu, = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    return strategy.scope()


def main(config: dict) -> None:
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        # as on a torch-only install: Keras would otherwise import TensorFlow for its data adapters,
        # which proves nothing here and doubles the leaf's start-up time
        sys.modules["tensorflow"] = None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    scope = _mirrored_scope() if config.get("mirrored") else contextlib.nullcontext()

    import keras

    from branchkey_integrations.core.client import Client
    from branchkey_integrations.keras import BranchKeyKerasCallback

    from .models import Recorder, data, tiny_model

    uploads = []
    original = Client.upload_arrays  # the one path both upload_weights and Federation take
    Client.upload_arrays = lambda self, *a, **k: uploads.append(1) or original(self, *a, **k)
    x, y = data(config["samples"], config["seed"])
    with scope:
        model = tiny_model(seed=config["seed"])
    before, after = Recorder("upload"), Recorder("loaded")
    callback = BranchKeyKerasCallback(config["credentials"], config["host"], num_samples=len(x),
                                      transport="websocket", timeout=90, log_every_s=5)
    history = model.fit(x, y, batch_size=8, epochs=config["epochs"], shuffle=False, verbose=0,
                        callbacks=[before, callback, after])
    for recorder in (before, after):
        for number, record in enumerate(recorder.records, start=1):
            np.savez(out / f"{recorder.label}_{number}.npz", **record)
    (out / "done.json").write_text(json.dumps({
        "round": callback.round, "uploads": len(uploads), "backend": keras.backend.backend(),
        "history": {k: [float(v) for v in values] for k, values in history.history.items()}}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
