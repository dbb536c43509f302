"""One leaf in a process of its own: ``python -m tests.lightning.leaf CREDENTIALS HOST OUT SAMPLES SEED EPOCHS``.

Trains TinyModel with BranchKeyCallback and writes, per round, the model as uploaded and as loaded
(``OUT/upload_<r>.npz``, ``OUT/loaded_<r>.npz``) and finally ``OUT/done.json``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np

from branchkey_integrations.lightning import BranchKeyCallback

from .models import Recorder, TinyModel, loader, trainer


def main(credentials: str, host: str, out: str, samples: str, seed: str, epochs: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    import torch

    torch.manual_seed(int(seed))
    model = TinyModel()
    before, after = Recorder("upload"), Recorder("loaded")
    callback = BranchKeyCallback(credentials, host=host, transport="websocket", timeout=60, log_every_s=5)
    fit = trainer([before, callback, after], max_epochs=int(epochs))
    fit.fit(model, loader(int(samples), int(seed)))
    for recorder in (before, after):
        for number, record in enumerate(recorder.records, start=1):
            np.savez(out_dir / f"{recorder.label}_{number}.npz", **record)
    metrics = {k: float(v) for k, v in fit.callback_metrics.items()}
    (out_dir / "done.json").write_text(json.dumps({"round": callback.round, "metrics": metrics}))


if __name__ == "__main__":
    main(*sys.argv[1:])
