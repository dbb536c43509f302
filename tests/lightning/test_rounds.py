"""BranchKeyCallback in real Lightning training against a real branchkey-local."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from branchkey_integrations import Client
from branchkey_integrations.core.errors import AggregationTimeoutError
from branchkey_integrations.core.errors import AggregateMismatchError
from branchkey_integrations.core.wire import Archive
from branchkey_integrations.lightning import BranchKeyCallback, federated_tensors

from ..conftest import REPO, partner_upload, wait_until
from .models import Recorder, TinyModel, loader, snapshot, trainer

PARAMS = ["stem.weight", "stem.bias", "head.weight", "head.bias"]


def weighted_mean(uploads, weights, names):
    total = float(sum(weights))
    return {n: (sum(w * u[n].astype(np.float64) for u, w in zip(uploads, weights)) / total).astype(np.float32)
            for n in names}


def callback_for(credentials, server, **kwargs) -> BranchKeyCallback:
    kwargs.setdefault("timeout", 30)
    return BranchKeyCallback(credentials, host=server.url, transport="websocket", log_every_s=0.2, **kwargs)


def test_three_leaves_in_separate_processes_hold_the_weighted_average(server_factory, tmp_path):
    server, credentials = server_factory(3)
    samples, rounds = [16, 24, 40], 3
    leaves = []
    for index, (creds, count) in enumerate(zip(credentials, samples)):
        out = tmp_path / f"leaf{index}"
        log = open(tmp_path / f"leaf{index}.log", "w")
        leaves.append((out, subprocess.Popen(
            [sys.executable, "-m", "tests.lightning.leaf", str(creds), server.url, str(out), str(count),
             str(index), str(rounds)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)))
        log.close()
    for index, (out, process) in enumerate(leaves):
        assert process.wait(120) == 0, (tmp_path / f"leaf{index}.log").read_text()[-3000:]
    for out, _ in leaves:
        assert json.loads((out / "done.json").read_text())["round"] == rounds
    for number in range(1, rounds + 1):
        sent = [dict(np.load(out / f"upload_{number}.npz")) for out, _ in leaves]
        loaded = [dict(np.load(out / f"loaded_{number}.npz")) for out, _ in leaves]
        expected = weighted_mean(sent, samples, PARAMS)
        for name in PARAMS:
            np.testing.assert_allclose(loaded[0][name], expected[name], rtol=1e-6, atol=1e-7)
            for other in loaded[1:]:
                np.testing.assert_array_equal(other[name], loaded[0][name])  # bit-identical on every leaf
        assert not np.array_equal(sent[0]["stem.weight"], sent[1]["stem.weight"])  # local training differed


def test_one_round_loads_in_place_logs_metrics_and_checkpoints_state(server_factory, uploads, tmp_path):
    server, credentials = server_factory(2)
    model = TinyModel()
    partner = [np.full(t.shape, 0.5, np.float32) for _, t in federated_tensors(model)]
    partner_upload(credentials[1], server, partner, 24.0)
    params_before = [p for p in model.parameters()]
    before = Recorder("upload")
    callback = callback_for(credentials[0], server, reset_optimizer=True, snapshot_dir=tmp_path / "snapshots")
    fit = trainer([before, callback], enable_checkpointing=True,
                  default_root_dir=tmp_path)
    fit.fit(model, loader(8, 0))

    assert [p for p in model.parameters()] == params_before  # the same Parameter objects
    expected = weighted_mean([before.records[0], {n: a for n, a in zip(PARAMS, partner)}], [8, 24], PARAMS)
    for name, tensor in model.named_parameters():
        np.testing.assert_allclose(tensor.detach().numpy(), expected[name], rtol=1e-6, atol=1e-7)
    assert [w for w, _ in uploads] == [24.0, 8.0]  # weighting = len(dataset)
    assert fit.optimizers[0].state == {}  # reset_optimizer
    metrics = fit.callback_metrics
    assert metrics["branchkey/round"].item() == 1 and metrics["branchkey/wait_s"].item() >= 0
    assert metrics["branchkey/upload_mb"].item() == pytest.approx(sum(a.nbytes for a in partner) / 1e6)

    from safetensors.numpy import load_file
    saved = load_file(str(tmp_path / "snapshots" / "round_00001.safetensors"))
    assert sorted(saved) == sorted(PARAMS)
    np.testing.assert_array_equal(saved["head.bias"], model.head.bias.detach().numpy())

    path = tmp_path / "end.ckpt"
    fit.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["callbacks"][callback.state_key]
    assert state["round"] == 1 and state["last_aggregation_id"] == callback.federation.last_aggregation_id
    assert "every_n_epochs': 1" in callback.state_key and "buffers': 'local'" in callback.state_key


def test_mismatched_aggregate_raises_and_leaves_the_model_bit_identical(server_factory, monkeypatch):
    server, credentials = server_factory(1)
    original = Client.download_aggregate

    def corrupted(self, file_id, **options):  # the only fake: the real aggregate with one NaN
        archive = original(self, file_id, **options)
        archive.layers[2] = archive.layers[2].copy()
        archive.layers[2][0, 0] = np.nan
        return Archive(archive.layers)

    monkeypatch.setattr(Client, "download_aggregate", corrupted)
    model, before = TinyModel(), Recorder("upload")
    with pytest.raises(AggregateMismatchError, match="head.weight: the aggregate holds NaN"):
        trainer([before, callback_for(credentials[0], server)]).fit(model, loader(8, 0))
    after = snapshot(model)
    for name, array in before.records[0].items():
        np.testing.assert_array_equal(after[name], array)


def test_a_leaf_whose_model_differs_is_refused_and_left_unchanged(server_factory):
    """The round's layout comes from the first upload; a leaf with another architecture cannot join it."""
    server, credentials = server_factory(2)
    partner_upload(credentials[1], server, [t.detach().numpy() for _, t in federated_tensors(TinyModel(hidden=5))], 1.0)
    model, before = TinyModel(hidden=3), Recorder("upload")
    with pytest.raises(Exception, match="do not match this round's"):
        trainer([before, callback_for(credentials[0], server)]).fit(model, loader(8, 0))
    for name, array in before.records[0].items():
        np.testing.assert_array_equal(snapshot(model)[name], array)


def test_timeout_raise_stops_fit_and_continue_keeps_training(server_factory, uploads):
    server, credentials = server_factory(2)  # the second leaf never uploads
    with pytest.raises(AggregationTimeoutError, match="timeout=0.3 s"):
        trainer([callback_for(credentials[0], server, timeout=0.3)]).fit(TinyModel(), loader(8, 0))

    callback = callback_for(credentials[0], server, timeout=0.3, on_timeout="continue")
    fit = trainer([callback], max_epochs=2)
    fit.fit(TinyModel(), loader(8, 0))
    assert fit.current_epoch == 2 and callback.round == 0 and len(uploads) == 3
    assert fit.callback_metrics["branchkey/round"].item() == 0 and fit.callback_metrics["branchkey/wait_s"] > 0


def test_pause_waits_for_start_and_stop_ends_fit_gracefully(server_factory, caplog):
    server, credentials = server_factory(2)
    branch_id = json.loads(credentials[0].read_text())["branch_id"]

    def operator():
        wait_until(lambda: "waiting for the run to start for 0 s (run is 'pause')" in caplog.text, 30, "the paused round")
        server.set_run(branch_id, "start")
        wait_until(lambda: caplog.text.count("Uploaded") >= 1, 30, "the upload after start")
        server.set_run(branch_id, "stop")

    server.set_run(branch_id, "pause")
    helper = threading.Thread(target=operator, daemon=True)
    callback = callback_for(credentials[0], server)
    fit = trainer([callback], max_epochs=5)
    with caplog.at_level(logging.INFO, logger="branchkey_integrations"):
        helper.start()
        fit.fit(TinyModel(), loader(8, 0))  # returns: stop is an ending, not a failure
    helper.join(10)
    assert fit.should_stop and fit.current_epoch == 1 and callback.round == 0
    assert "stopped during round 1" in caplog.text


def test_resume_continues_the_round_number_without_uploading_again(server_factory, uploads, tmp_path):
    server, credentials = server_factory(1)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = callback_for(credentials[0], server)
    trainer([first, checkpoints], max_epochs=2, enable_checkpointing=True).fit(TinyModel(), loader(8, 0))
    assert first.round == 2 and len(uploads) == 2

    resumed = callback_for(credentials[0], server)
    fit = trainer([resumed, ModelCheckpoint(dirpath=tmp_path, save_last=True)], max_epochs=3,
                  enable_checkpointing=True)
    fit.fit(TinyModel(), loader(8, 0), ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.round == 3 and len(uploads) == 3  # one new round, nothing repeated
    assert resumed.federation.last_aggregation_id != first.federation.last_aggregation_id

    again = callback_for(credentials[0], server)  # resuming a finished run uploads nothing
    trainer([again], max_epochs=3, enable_checkpointing=True, default_root_dir=tmp_path).fit(TinyModel(), loader(8, 0),
                                                                  ckpt_path=str(tmp_path / "last.ckpt"))
    assert again.round == 3 and len(uploads) == 3


def test_bf16_parameters_travel_as_float32_and_keep_their_dtype(server_factory, uploads):
    server, credentials = server_factory(1)
    model = TinyModel().to(torch.bfloat16)
    before = Recorder("upload")
    trainer([before, callback_for(credentials[0], server)]).fit(model, loader(8, 0))
    assert {a.dtype for _, arrays in uploads for a in arrays} == {np.dtype(np.float32)}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for name, tensor in model.named_parameters():  # one leaf: the aggregate is its own upload
        np.testing.assert_array_equal(tensor.detach().float().numpy(), before.records[0][name])


def test_frozen_parameters_are_not_sent(server_factory, uploads):
    server, credentials = server_factory(1)
    model = TinyModel(frozen=True)
    frozen = model.stem.weight.detach().clone()
    trainer([callback_for(credentials[0], server)]).fit(model, loader(8, 0))
    (_, arrays), = uploads
    assert [a.shape for a in arrays] == [tuple(model.head.weight.shape), tuple(model.head.bias.shape)]
    assert torch.equal(model.stem.weight, frozen)


@pytest.mark.parametrize("policy", ["local", "average"])
def test_buffers_policy(policy, server_factory, uploads):
    server, credentials = server_factory(2)
    model = TinyModel(batchnorm=True)
    names = [n for n, _ in federated_tensors(model, policy)]
    expected_names = PARAMS[:2] + ["norm.weight", "norm.bias"] + PARAMS[2:]
    if policy == "average":
        expected_names += ["norm.running_mean", "norm.running_var"]  # never num_batches_tracked
    assert names == expected_names
    partner = [np.full(t.shape, 2.0, np.float32) for _, t in federated_tensors(model, policy)]
    partner_upload(credentials[1], server, partner, 8.0)
    before = Recorder("upload")
    trainer([before, callback_for(credentials[0], server, buffers=policy)]).fit(model, loader(8, 0))
    local = before.records[0]
    for name in ("norm.running_mean", "norm.running_var"):
        got = getattr(model.norm, name.split(".")[1]).numpy()
        want = (local[name] + 2.0) / 2 if policy == "average" else local[name]
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert model.norm.num_batches_tracked.item() == local["norm.num_batches_tracked"]
    np.testing.assert_allclose(model.head.bias.detach().numpy(), (local["head.bias"] + 2.0) / 2, rtol=1e-6)


@pytest.mark.parametrize("precision, travels_as, dtype", [("bf16-true", np.float32, torch.bfloat16),
                                                          ("64-true", np.float64, torch.float64)])
def test_true_precision_models_round_trip_with_their_dtype(precision, travels_as, dtype, server_factory, uploads):
    server, credentials = server_factory(1)
    model, before = TinyModel(), Recorder("upload")
    trainer([before, callback_for(credentials[0], server)], precision=precision).fit(model, loader(8, 0))
    assert {a.dtype for _, arrays in uploads for a in arrays} == {np.dtype(travels_as)}
    assert {p.dtype for p in model.parameters()} == {dtype}
    for name, tensor in model.named_parameters():  # one leaf: the aggregate is its own upload, exactly
        np.testing.assert_array_equal(tensor.detach().to(torch.float64).numpy(), before.records[0][name])


def test_an_int8_leaf_checkpoints_its_error_feedback_as_tensors_and_resumes_it(server_factory, tmp_path):
    server, credentials = server_factory(1)
    branch_id = json.loads(credentials[0].read_text())["branch_id"]
    answer = server.admin("PUT", f"/admin/v1/branches/{branch_id}/codecs", json={"codecs": ["int8"]})
    assert answer.status_code == 200, answer.text
    callback = callback_for(credentials[0], server, quantize="int8")
    fit = trainer([callback], enable_checkpointing=True, default_root_dir=tmp_path)
    fit.fit(TinyModel(), loader(8, 0))
    path = tmp_path / "end.ckpt"
    fit.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["callbacks"][callback.state_key]  # tensors only: loads safely
    residual = state["error_feedback"]
    assert [tuple(t.shape) for t in residual] == [tuple(p.shape) for p in TinyModel().parameters()]
    assert any(float(t.abs().max()) > 0 for t in residual)
    resumed = callback_for(credentials[0], server, quantize="int8")
    resumed.load_state_dict(state)
    assert resumed.federation.state_dict()["error_feedback"][0].dtype == np.float32
