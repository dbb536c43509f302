"""Metrics: validation runs on the aggregated model and is sent as "test"; the epoch's training
metrics are sent as "train"; both name the round's aggregate."""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from branchkey_integrations.lightning import federated_tensors

from .models import TinyModel, loader, trainer
from ..conftest import partner_upload
from .test_rounds import callback_for


class ValidatedModel(TinyModel):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))


def test_validation_measures_the_aggregate_and_metrics_reach_the_platform(server_factory):
    server, credentials = server_factory(2)
    model = ValidatedModel()
    partner = [np.full(t.shape, 0.5, np.float32) for _, t in federated_tensors(model)]
    partner_upload(credentials[1], server, partner, 8.0)
    callback = callback_for(credentials[0], server)
    val = loader(8, 99)
    fit = trainer([callback], num_sanity_val_steps=0)
    fit.fit(model, loader(8, 0), val)

    # one epoch, one round: the model now IS the aggregate, and validation measured exactly it
    x, y = val.dataset.tensors
    with torch.no_grad():
        aggregate_loss = nn.functional.mse_loss(model(x), y).item()
    assert fit.callback_metrics["val_loss"].item() == np.float32(aggregate_loss)

    branch = callback.federation.credentials.branch_id
    sent = server.admin("GET", f"/admin/v1/branches/{branch}/metrics").json()["data"]["metrics"]
    by_mode = {m["mode"]: m for m in sent}
    assert set(by_mode) == {"test", "train"}
    aggregation_id = callback.federation.last_aggregation_id
    assert {m["aggregation_id"] for m in sent} == {aggregation_id}
    test, train = json.loads(by_mode["test"]["data"]), json.loads(by_mode["train"]["data"])
    assert test == {"val_loss": np.float32(aggregate_loss).item()}
    assert set(train) == {"train_loss"}
