"""Calibration in the Lightning callback: two classifying leaves against a real branchkey-local end with the
bit-identical final layer; a model whose last trainable layer is not linear is refused before training, naming
what to pass."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule
from torch import nn

from branchkey_integrations.lightning import BranchKeyCallback
from branchkey_integrations.torch_tensors import linear_head

from ..conftest import CREDS, REPO
from .models import trainer


class Classifier(LightningModule):
    """4 -> 5 -> 3 with ReLU, cross-entropy, Adam; ``norm_last`` registers a BatchNorm after the head."""

    def __init__(self, norm_last: bool = False) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)
        if norm_last:
            self.norm = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(torch.relu(self.stem(x)))
        return self.norm(out) if hasattr(self, "norm") else out

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def test_two_leaves_end_with_the_identical_calibrated_layer(server_factory, tmp_path):
    server, credentials = server_factory(2)
    leaves = []
    for index, creds in enumerate(credentials):
        log = open(tmp_path / f"leaf{index}.log", "w")
        leaves.append(subprocess.Popen(
            [sys.executable, "-m", "tests.lightning.calibration_leaf", str(creds), server.url,
             str(tmp_path / f"leaf{index}"), str(index), "True"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    for index, process in enumerate(leaves):
        assert process.wait(180) == 0, (tmp_path / f"leaf{index}.log").read_text()[-4000:]
    done = [json.loads((tmp_path / f"leaf{i}" / "done.json").read_text()) for i in range(2)]
    assert [(d["round"], d["analytics_rounds"]) for d in done] == [(2, 1), (2, 1)]
    before, after = ([dict(np.load(tmp_path / f"leaf{i}" / name)) for i in range(2)]
                     for name in ("head_before.npz", "head.npz"))
    for key in ("weight", "bias"):
        assert before[0][key].tobytes() == before[1][key].tobytes()  # both start from the last aggregate
        assert after[0][key].tobytes() == after[1][key].tobytes()  # and end with the same calibrated bytes
        assert np.abs(after[0][key] - before[0][key]).max() > 1e-3  # which calibration changed
    log = (tmp_path / "leaf0.log").read_text()
    assert "calibration: final layer refit from 2 leaves' class statistics (classes [0, 1, 2])" in log


def test_a_last_trainable_layer_that_is_not_linear_is_refused_before_training():
    callback = BranchKeyCallback(CREDS, host="http://127.0.0.1:9", calibrate_head=True)
    data = [(torch.randn(4, 4), torch.tensor([0, 1, 2, 0]))]
    with pytest.raises(ValueError, match=r"the last trainable layer of Classifier is 'norm', a BatchNorm1d, not a "
                                         r"torch.nn.Linear: .* Pass head=<the nn.Linear that makes the logits> \(the "
                                         r"module, or its name in model.named_modules\(\)\) \(this model's Linear "
                                         r"modules: \['stem', 'head'\]\)"):
        trainer([callback]).fit(Classifier(norm_last=True), data)
    with pytest.raises(ValueError, match=r"head='norm' is a BatchNorm1d, not a torch.nn.Linear"):
        trainer([BranchKeyCallback(CREDS, host="http://127.0.0.1:9", calibrate_head=True, head="norm")]).fit(
            Classifier(norm_last=True), data)


def test_a_head_module_that_is_not_linear_is_refused_at_construction():
    model = Classifier(norm_last=True)
    with pytest.raises(ValueError, match=r"head=<BatchNorm1d> is a BatchNorm1d, not a torch.nn.Linear: .* Pass "
                                         r"head=<the nn.Linear that makes the logits> \(the module, or its name in "
                                         r"model.named_modules\(\)\), or calibrate_head=False"):
        BranchKeyCallback(CREDS, host="http://127.0.0.1:9", calibrate_head=True, head=model.norm)
    with pytest.raises(ValueError, match=r"Expected head to be the nn.Linear that makes the logits, its name in "
                                         r"model.named_modules\(\), or None .* Received: head=3"):
        BranchKeyCallback(CREDS, host="http://127.0.0.1:9", calibrate_head=True, head=3)
    callback = BranchKeyCallback(CREDS, host="http://127.0.0.1:9", calibrate_head=True, head=model.head)
    assert callback.head is model.head and linear_head(model, model.head) == ("head", model.head)
    with pytest.raises(ValueError, match=r"head=<Linear> is not a module of Classifier \(the model trained\)"):
        linear_head(model, Classifier().head)
