"""A Keras leaf as a new user writes it: ``python -m tests.keras.quiet_leaf '<json config>'``.

No logging set-up; ``fit`` prints as Keras does by default (``verbose`` from the config, default "auto").
Config keys: credentials, host, out, log_every_s, and optionally verbose, epochs, every_n_epochs. The caller
picks the backend with ``KERAS_BACKEND``. Ctrl-C behaves as in a terminal (a test runner may start this
process with SIGINT ignored). Writes ``OUT/done.json`` when ``fit`` returns, and ``OUT/finally`` from the
script's ``finally`` block (a SIGTERM that ends the run must still let it run).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path


def main(config: dict) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        sys.modules["tensorflow"] = None  # as on a torch-only install (see tests/keras/leaf.py)
    out = Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)

    from branchkey_integrations.keras import BranchKeyKerasCallback

    from .models import data, tiny_model

    x, y = data(16, 0)
    callback = BranchKeyKerasCallback(config["credentials"], config["host"], num_samples=len(x),
                                      every_n_epochs=config.get("every_n_epochs", 1), transport="websocket",
                                      timeout=120, log_every_s=config["log_every_s"])
    try:
        history = tiny_model().fit(x, y, batch_size=8, epochs=config.get("epochs", 2), shuffle=False,
                                   verbose=config.get("verbose", "auto"), callbacks=[callback])
        (out / "done.json").write_text(json.dumps({"round": callback.round, "history": {
            k: [float(v) for v in values] for k, values in history.history.items()}}))
    finally:
        (out / "finally").write_text("ran")


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
