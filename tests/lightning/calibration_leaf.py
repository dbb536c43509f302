"""A classifying leaf that federates every epoch and calibrates its final layer when training ends (leaf 1 names
the layer by passing the module as ``head=``, leaf 0 leaves it to the default):
``python -m tests.lightning.calibration_leaf CREDENTIALS HOST OUT SEED CALIBRATE``; writes ``OUT/head_before.npz``
(the final layer as the last aggregate left it), ``OUT/head.npz`` (after fit) and ``OUT/done.json``."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from branchkey_integrations.lightning import BranchKeyCallback

from .models import trainer



def labelled(seed: int) -> DataLoader:
    """Three classes in 4-D, this leaf holding mostly two of them (class 2 only on leaf 1): label skew."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.tensor([seed % 2, 2 * (seed % 2)] * 12)
    x = torch.randn(y.numel(), 4, generator=generator) + 3 * nn.functional.one_hot(y, 4).float()
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def main(credentials: str, host: str, out: str, seed: str, calibrate: str) -> None:
    from .test_calibration import Classifier

    logging.basicConfig(level=logging.INFO)
    torch.manual_seed(0)  # the same initial model on every leaf
    model = Classifier()
    callback = BranchKeyCallback(credentials, host=host, transport="websocket", timeout=60, log_every_s=5,
                                 calibrate_head=calibrate if calibrate != "True" else True,
                                 head=model.head if seed == "1" else None)  # the module itself, or the default
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)

    class Before(Callback):  # after the BranchKey callback: the head the last aggregate left, before calibration
        def on_train_epoch_end(self, trainer, pl_module):
            np.savez(out_dir / "head_before.npz", weight=model.head.weight.detach().numpy(),
                     bias=model.head.bias.detach().numpy())

    trainer([callback, Before()], max_epochs=2).fit(model, labelled(int(seed)))
    np.savez(out_dir / "head.npz", weight=model.head.weight.detach().numpy(), bias=model.head.bias.detach().numpy())
    (out_dir / "done.json").write_text(json.dumps({"round": callback.round,
                                                   "analytics_rounds": callback.federation.analytics_rounds}))


if __name__ == "__main__":
    main(*sys.argv[1:])
