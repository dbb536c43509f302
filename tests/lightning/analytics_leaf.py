"""A leaf whose training federates a model every epoch while an analytics round runs beside each model round:
``python -m tests.lightning.analytics_leaf CREDENTIALS HOST OUT SAMPLES SEED EPOCHS``.

At the end of each epoch's last batch, :class:`AnalyticsBeside` (placed before the BranchKeyCallback) starts
an analytics round in a thread, from the callback's own ``federation``; the BranchKeyCallback then runs its
model round on the training thread, so both rounds' uploads and waits overlap. Writes, per epoch, the model as
uploaded and as loaded (``OUT/upload_<r>.npz``, ``OUT/loaded_<r>.npz``), the raw column sent
(``OUT/column_<r>.npy``), and finally ``OUT/done.json`` with the model rounds and every analytics result.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from pathlib import Path

import numpy as np
from lightning.pytorch import Callback

from branchkey_integrations.lightning import BranchKeyCallback

from .models import Recorder, TinyModel, dataset, last_batch, loader, trainer


class AnalyticsBeside(Callback):
    """Runs an analytics round in a thread while the BranchKeyCallback runs the epoch's model round."""

    def __init__(self, branchkey: BranchKeyCallback, column: np.ndarray, out_dir: Path) -> None:
        self.branchkey, self.column, self.out_dir = branchkey, column, out_dir
        self.results: list[dict] = []
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not last_batch(trainer, batch_idx):
            return
        column = self.column + trainer.current_epoch  # each round's data differs
        np.save(self.out_dir / f"column_{trainer.current_epoch + 1}.npy", column)
        self.thread = threading.Thread(target=self._round, args=(column,))
        self.thread.start()

    def _round(self, column: np.ndarray) -> None:
        try:
            result = self.branchkey.federation.analytics_round(columns={"feature": column}, timeout=60)
            self.results.append({"run_number": result.run_number, "round_index": result.round_index,
                                 "aggregation_id": result.aggregation_id, "contributors": result.contributors,
                                 "fields": {k: v.tolist() for k, v in result.fields.items()},
                                 "mean": result.statistics["feature"].mean})
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        assert self.thread is not None
        self.thread.join(90)
        if self.error is not None:
            raise self.error


def main(credentials: str, host: str, out: str, samples: str, seed: str, epochs: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(threadName)s %(name)s %(message)s")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    import torch

    torch.manual_seed(int(seed))
    model = TinyModel()
    before, after = Recorder("upload"), Recorder("loaded")
    callback = BranchKeyCallback(credentials, host=host, transport="websocket", timeout=60, log_every_s=5)
    column = dataset(int(samples), int(seed)).tensors[0][:, 0].numpy().astype(np.float64)
    analytics = AnalyticsBeside(callback, column, out_dir)
    fit = trainer([before, analytics, callback, after], max_epochs=int(epochs))
    fit.fit(model, loader(int(samples), int(seed)))
    for recorder in (before, after):
        for number, record in enumerate(recorder.records, start=1):
            np.savez(out_dir / f"{recorder.label}_{number}.npz", **record)
    (out_dir / "done.json").write_text(json.dumps({"round": callback.round, "analytics": analytics.results,
                                                   "analytics_rounds": callback.federation.analytics_rounds}))


if __name__ == "__main__":
    main(*sys.argv[1:])
