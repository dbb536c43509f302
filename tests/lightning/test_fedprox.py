"""FedProx in BranchKeyCallback (``proximal_mu``): real Lightning training, one process and DDP, against a real
branchkey-local. The proximal term must keep a leaf's local epoch closer to the global model it started from."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback

from branchkey_integrations.lightning import BranchKeyCallback, federated_tensors

from ..conftest import partner_upload
from .models import DiskRecorder, Recorder, TinyModel, loader, snapshot, trainer
from .test_callback import CREDS, HOST
from .test_rounds import PARAMS, weighted_mean

MU = 5.0  # lr 0.1 * mu 5 = 0.5 per step: a strong pull, still stable under SGD momentum 0.9


class ManualAdam(TinyModel):
    """Manual optimization with Adam: Lightning still calls on_before_optimizer_step inside optimizer.step()."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        optimizer.step()
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((a[n].astype(np.float64) - b[n]) ** 2) for n in PARAMS)))


def local_epoch_drift(credentials, url: str, out, mu: float, model_class=TinyModel, **trainer_options) -> float:
    """Train one epoch from a seeded start with ``proximal_mu=mu``; how far the upload moved from that start."""
    torch.manual_seed(0)
    model = model_class()
    start = snapshot(model)
    callback = BranchKeyCallback(credentials, host=url, transport="websocket", timeout=60, proximal_mu=mu)
    trainer([DiskRecorder(out, "upload"), callback], **trainer_options).fit(model, loader(128, 0))
    return distance(dict(np.load(out / "upload_rank0_1.npz")), start)


@pytest.mark.parametrize("options", [
    {},
    {"precision": "bf16-mixed"},
    {"accumulate_grad_batches": 2},
    {"strategy": "ddp_spawn", "devices": 2},
    {"model_class": ManualAdam},
], ids=["fp32", "bf16-mixed", "accumulate", "ddp", "manual-adam"])
def test_a_large_proximal_mu_keeps_the_local_epoch_close_to_the_global_model(inprocess_server, tmp_path, options):
    server, _ = inprocess_server(1)
    drifts = {}
    for mu in (0.0, MU):  # a one-leaf branch each: its round completes with the one upload
        creds, = server.create_branch(1)
        drifts[mu] = local_epoch_drift(creds, server.url, tmp_path / f"mu{mu:g}", mu, **options)
    assert drifts[0.0] > 0.05  # local training really moved the model
    assert drifts[MU] < 0.5 * drifts[0.0], drifts


def test_the_global_model_is_the_loaded_aggregate(inprocess_server, caplog):
    """After a round, w_g holds exactly what was loaded (the weighted average), on the parameters' device and dtype."""
    server, credentials = inprocess_server(2)
    torch.manual_seed(0)
    model = TinyModel()
    partner = [np.full(t.shape, 0.5, np.float32) for _, t in federated_tensors(model)]
    partner_upload(credentials[1], server, partner, 16.0)
    callback = BranchKeyCallback(credentials[0], host=server.url, transport="websocket", timeout=30, proximal_mu=1.0)
    seen = {}

    class Spy(Callback):  # after the BranchKeyCallback: sees the epoch's end once the aggregate is in place
        def on_train_start(self, trainer, pl_module):
            seen["start"] = [g.clone() for g in callback._global]
            seen["ids"] = [id(g) for g in callback._global]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx + 1 == trainer.num_training_batches:
                seen["upload"] = upload.records[-1]
                seen["loaded"] = snapshot(pl_module)
                seen["global"] = [g.clone() for g in callback._global]
                seen["same_tensors"] = [id(g) for g in callback._global] == seen["ids"]

    upload = Recorder("upload")
    start = snapshot(model)
    with caplog.at_level(logging.INFO):
        trainer([upload, callback, Spy()]).fit(model, loader(16, 0))
    assert "Local training pulls toward it (FedProx, proximal_mu=1)." in caplog.text  # the round's line says so
    for name, value in zip(PARAMS, seen["start"]):
        np.testing.assert_array_equal(value.numpy(), start[name])  # w_g starts as the fit's starting point
    expected = weighted_mean([seen["upload"], dict(zip(PARAMS, partner))], [16, 16], PARAMS)
    for name, value in zip(PARAMS, seen["global"]):
        np.testing.assert_allclose(value.numpy(), expected[name], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(value.numpy(), seen["loaded"][name])
    assert seen["same_tensors"]  # updated in place: no second copy
    assert callback._global is None  # freed with the fit


def test_the_proximal_gradient_is_mu_times_the_distance_and_skips_what_the_optimizer_does_not_step():
    from branchkey_integrations.lightning import add_proximal_gradient

    a, b, frozen = (torch.nn.Parameter(torch.full((2,), v)) for v in (1.0, 2.0, 3.0))
    a.grad, b.grad = torch.full((2,), 0.5), None
    anchors = [torch.zeros(2), torch.zeros(2), torch.zeros(2)]
    frozen.grad = torch.zeros(2)
    optimizer = torch.optim.SGD([a, b], lr=0.1)  # frozen has a gradient but is not this optimizer's
    add_proximal_gradient([a, b, frozen], anchors, optimizer, 0.25)
    assert a.grad.tolist() == [0.75, 0.75] and b.grad is None and frozen.grad.tolist() == [0.0, 0.0]


def test_under_fp16_amp_a_fused_optimizer_gets_the_term_at_the_loss_scale_its_step_divides_by():
    """Lightning unscales before the hook, except for optimizers that unscale in their step (fused Adam): their
    gradients still carry the loss scale, so the proximal term must carry it too."""
    from types import SimpleNamespace

    from branchkey_integrations.lightning import amp_scale_left_in

    weight = torch.nn.Parameter(torch.ones(2))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    amp = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler))
    fused = torch.optim.Adam([weight], fused=True)
    assert amp_scale_left_in(amp, fused) == 1024.0
    assert amp_scale_left_in(amp, torch.optim.Adam([weight])) == 1.0  # Lightning unscaled it already
    assert amp_scale_left_in(SimpleNamespace(precision_plugin=SimpleNamespace()), fused) == 1.0  # no AMP
    callback = BranchKeyCallback(CREDS, HOST, proximal_mu=0.5)
    callback._global, callback._trainable = [torch.zeros(2)], [weight]
    weight.grad = torch.zeros(2)
    callback.on_before_optimizer_step(amp, None, fused)
    assert weight.grad.tolist() == [512.0, 512.0]  # 0.5 * (1 - 0) * 1024


@pytest.mark.parametrize("mu, message", [
    (-0.1, "Expected proximal_mu to be a number >= 0 (0 turns FedProx off). Received: proximal_mu=-0.1"),
    (float("nan"), "Received: proximal_mu=nan"),
    (float("inf"), "Received: proximal_mu=inf"),
    ("0.1", "Received: proximal_mu='0.1'"),
    (True, "Received: proximal_mu=True"),
])
def test_bad_proximal_mu_fails_at_construction(mu, message):
    with pytest.raises(ValueError) as info:
        BranchKeyCallback(CREDS, HOST, proximal_mu=mu)
    assert message in str(info.value)


def test_proximal_mu_is_shown_only_when_set_and_costs_no_copy_when_off():
    assert "proximal_mu" not in repr(BranchKeyCallback(CREDS, HOST))
    callback = BranchKeyCallback(CREDS, HOST, proximal_mu=0.01)
    assert callback.proximal_mu == 0.01 and "proximal_mu=0.01" in repr(callback)
    off = BranchKeyCallback(CREDS, HOST)
    off._keep_global_model(TinyModel())
    assert off._global is None
