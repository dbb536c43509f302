"""SCAFFOLD in BranchKeyCallback: a real Lightning leaf runs 2 rounds in a SCAFFOLD branch of a real branchkey-local
beside a leaf that sends no controls (as the official client): each step's gradient gets exactly c - c_i, the
uploads carry the control updates, the aggregate brings c back, and c_i survives a checkpoint loaded with
``weights_only=True``; in a FedAvg branch the callback sends no controls and corrects nothing."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback

from branchkey_integrations.lightning import BranchKeyCallback, federated_tensors

from ..conftest import partner_upload
from .models import TinyModel, loader, trainer


def scaffold_branch(server, credentials: list[dict[str, str]]) -> list[dict[str, str]]:
    """The branch of ``credentials``, switched to SCAFFOLD (between rounds, through the admin API)."""
    answer = server.admin("PUT", f"/admin/v1/branches/{credentials[0]['branch_id']}/strategy",
                          json={"strategy": "scaffold"})
    assert answer.status_code == 200, answer.text
    return credentials


class Partner(Callback):
    """The other leaf of the branch: uploads its layers (no controls) as each epoch begins."""

    def __init__(self, credentials, server) -> None:
        self.credentials, self.server = credentials, SimpleNamespace(url=server.url)  # picklable: DDP spawn

    def on_train_epoch_start(self, trainer, pl_module):
        partner_upload(self.credentials, self.server,
                       [np.full(t.shape, 0.25, np.float32) for _, t in federated_tensors(pl_module)], 16.0)


class GradientSpy(Callback):
    """Placed before and after the BranchKeyCallback: the first step's gradients of each epoch, as they come, and
    the weights as the epoch's second batch starts."""

    def __init__(self) -> None:
        self.seen: dict[int, list[np.ndarray]] = {}
        self.weights: dict[int, list[np.ndarray]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.current_epoch not in self.seen:
            self.seen[trainer.current_epoch] = [p.grad.detach().clone().numpy() for p in pl_module.parameters()]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 1:
            self.weights[trainer.current_epoch] = [p.detach().clone().numpy() for p in pl_module.parameters()]


def sent_controls(monkeypatch) -> list[list[np.ndarray]]:
    """The controls of every upload of this process (empty for an upload without them)."""
    from branchkey_integrations import Client

    seen: list[list[np.ndarray]] = []
    original = Client.upload_arrays

    def spy(self, weighting, parameters, **kwargs):
        seen.append([np.array(c, copy=True) for c in kwargs.get("controls", ())])
        return original(self, weighting, parameters, **kwargs)

    monkeypatch.setattr(Client, "upload_arrays", spy)
    return seen


@pytest.mark.parametrize("mode", ["decoupled", "gradient"])
def test_two_scaffold_rounds_correct_every_step_and_round_trip_the_control_variates(inprocess_server, monkeypatch,
                                                                                    tmp_path, mode):
    server, credentials = inprocess_server(2)
    ours, partner = scaffold_branch(server, credentials)
    sent = sent_controls(monkeypatch)
    torch.manual_seed(0)
    model = TinyModel()
    callback = BranchKeyCallback(ours, host=server.url, transport="websocket", timeout=60, scaffold_correction=mode)
    before, after = GradientSpy(), GradientSpy()
    fit = trainer([Partner(partner, server), before, callback, after], max_epochs=2)
    fit.fit(model, loader(16, 0))
    assert callback.round == 2
    state = callback._scaffold
    assert state is not None and state.c is not None and state.c_i is not None
    delta_1, delta_2 = [controls for controls in sent if controls]  # the partner's uploads carry none
    assert sum(1 for controls in sent if not controls) == 2

    # epoch 0: c = c_i = 0, nothing is added; epoch 1: exactly c - c_i = delta_1 / 2 - delta_1 (N = 2, the partner's
    # delta is 0): added to every parameter's gradient ("gradient"), or a step of lr (0.1) times it after the
    # optimizer's, seen as the next batch starts ("decoupled", which leaves the gradients alone)
    for epoch in (0, 1):
        for index, (a, b) in enumerate(zip(before.weights[epoch], after.weights[epoch])):
            change = -0.1 * -delta_1[index] / 2 if mode == "decoupled" and epoch == 1 else np.zeros_like(a)
            np.testing.assert_allclose(b - a, change, rtol=1e-5, atol=1e-8)
    for grad_before, grad_after in zip(before.seen[0], after.seen[0]):
        np.testing.assert_array_equal(grad_before, grad_after)
    for grad_before, grad_after, delta in zip(before.seen[1], after.seen[1], delta_1):
        assert np.abs(delta).max() > 1e-3
        added = -delta / 2 if mode == "gradient" else np.zeros_like(delta)
        np.testing.assert_allclose(grad_after - grad_before, added, rtol=1e-5, atol=1e-7)
    # after round 2: c_i = delta_1 + delta_2; c (from the aggregate) = (delta_1 + delta_2) / 2
    for c, c_i, d1, d2 in zip(state.c, state.c_i, delta_1, delta_2):
        np.testing.assert_allclose(c_i, d1.astype(np.float64) + d2, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(c, (d1.astype(np.float64) + d2) / 2, rtol=1e-6, atol=1e-7)

    # c_i is in the checkpoint, as tensors a weights_only load accepts, and a new callback restores it
    path = tmp_path / "leaf.ckpt"
    fit.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    restored = BranchKeyCallback(ours, host=server.url)
    restored.load_state_dict(checkpoint["callbacks"][callback.state_key])
    for name in ("c_i", "c"):
        for kept, back in zip(getattr(state, name), getattr(restored._scaffold, name)):
            np.testing.assert_array_equal(kept, back)
    if mode != "decoupled":
        return
    # a fit resumed from the checkpoint, in a new callback: its first correction is the restored c - c_i
    resumed = BranchKeyCallback(ours, host=server.url, transport="websocket", timeout=60)
    before, after = GradientSpy(), GradientSpy()
    trainer([Partner(partner, server), before, resumed, after], max_epochs=3).fit(TinyModel(), loader(16, 0),
                                                                                  ckpt_path=path)
    assert resumed.round == 3
    for index, (a, b) in enumerate(zip(before.weights[2], after.weights[2])):
        np.testing.assert_allclose(b - a, -0.1 * (state.c[index] - state.c_i[index]), rtol=1e-5, atol=1e-8)


def test_a_fedavg_branch_gets_no_controls_and_no_correction(inprocess_server, monkeypatch):
    server, (ours, partner) = inprocess_server(2)
    sent = sent_controls(monkeypatch)
    torch.manual_seed(0)
    callback = BranchKeyCallback(ours, host=server.url, transport="websocket", timeout=60)
    before, after = GradientSpy(), GradientSpy()
    trainer([Partner(partner, server), before, callback, after], max_epochs=2).fit(TinyModel(), loader(16, 0))
    assert callback.round == 2 and callback._scaffold is None and "scaffold" not in callback.state_dict()
    assert len(sent) == 4 and not any(sent)
    for epoch in (0, 1):
        for grad_before, grad_after in zip(before.seen[epoch], after.seen[epoch]):
            np.testing.assert_array_equal(grad_before, grad_after)


class RankZeroPartner(Partner):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.is_global_zero:  # one partner upload per round, whatever the number of ranks
            super().on_train_epoch_start(trainer, pl_module)


def test_under_ddp_every_rank_corrects_alike_and_loads_the_same_aggregate(inprocess_server, tmp_path):
    from .models import DiskRecorder

    server, credentials = inprocess_server(2)
    ours, partner = scaffold_branch(server, credentials)
    torch.manual_seed(0)
    callback = BranchKeyCallback(ours, host=server.url, transport="websocket", timeout=60)
    trained, loaded = DiskRecorder(tmp_path, "trained"), DiskRecorder(tmp_path, "loaded")
    trainer([RankZeroPartner(partner, server), trained, callback, loaded], max_epochs=2, strategy="ddp_spawn",
            devices=2).fit(TinyModel(), loader(32, 0))
    for label in ("trained", "loaded"):
        for number in (1, 2):  # round 2's local training ran with c - c_i != 0 on both ranks
            ranks = [dict(np.load(tmp_path / f"{label}_rank{r}_{number}.npz")) for r in (0, 1)]
            for name in set(ranks[0]) - {"__connected__"}:  # only rank 0 talks to the platform
                np.testing.assert_array_equal(ranks[0][name], ranks[1][name])
    first, second = (dict(np.load(tmp_path / f"loaded_rank0_{n}.npz")) for n in (1, 2))
    assert any(not np.array_equal(first[k], second[k]) for k in first if k != "__connected__")
