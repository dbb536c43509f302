"""The Lightning callback's cost per round: the same ``fit`` with and without BranchKeyCallback.

A model of ~11.7M parameters (a few big Linear layers), a few batches per epoch, one round per
epoch on a 1-leaf branch of a local server, so every round is a whole round: upload,
aggregation, notification, download, load into the model.
"""

from __future__ import annotations

import logging
from typing import Any

from .common import local_server, median, timed


def _model(width: int) -> Any:
    import torch
    from lightning.pytorch import LightningModule
    from torch import nn

    class Wide(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                     nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return Wide()


def _fit(width: int, epochs: int, callbacks: list[Any]) -> None:
    import torch
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, width), torch.randint(0, 10, (64,)))
    trainer = Trainer(max_epochs=epochs, callbacks=callbacks, accelerator="cpu", devices=1, logger=False,
                      enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                      num_sanity_val_steps=0)
    trainer.fit(_model(width), DataLoader(data, batch_size=16))


def measure(width: int = 1976, epochs: int = 3, repeat: int = 3) -> dict[str, Any]:
    """Median seconds of ``fit`` without and with the callback; overhead per round is their difference / epochs."""
    from branchkey_integrations.lightning import BranchKeyCallback

    for name in ("lightning", "branchkey_integrations"):
        logging.getLogger(name).setLevel(logging.WARNING)
    params = 3 * (width * width + width) + 10 * width + 10
    plain, federated = [], []
    with local_server(1) as bench:
        for _ in range(repeat):
            plain.append(timed(lambda: _fit(width, epochs, [])))
            callback = BranchKeyCallback(bench.credentials[0], host=bench.server.url, transport="websocket", timeout=120)
            federated.append(timed(lambda: _fit(width, epochs, [callback])))
    without, with_callback = median(plain), median(federated)
    return {"params": params, "model_mb": params * 4 / 1e6, "epochs": epochs, "repeat": repeat,
            "fit_without_s": without, "fit_with_s": with_callback,
            "overhead_per_round_s": (with_callback - without) / epochs, "epoch_s": without / epochs}
