"""BranchKeyKerasCallback in this process (the default TensorFlow backend) against a real branchkey-local:
argument checks, variable selection, validation, run control, timeouts, resuming, metrics and snapshots."""

from __future__ import annotations

import json
import logging
import sys
import threading

import keras
import numpy as np
import pytest

from branchkey_integrations import Client
from branchkey_integrations.core.errors import AggregationTimeoutError, CredentialsError, RequestRejectedError
from branchkey_integrations.core.errors import AggregateMismatchError
from branchkey_integrations.core.wire import Archive
from branchkey_integrations.keras import BranchKeyKerasCallback, federated_variables, to_numpy

from ..conftest import CREDS, partner_upload, wait_until
from .models import Recorder, data, snapshot, tiny_model
from .test_leaves import PARAMS, weighted_mean

HOST = "http://127.0.0.1:1"
X, Y = data(8, 0)
NORM = ["tiny/norm/gamma", "tiny/norm/beta"]
STATS = ["tiny/norm/moving_mean", "tiny/norm/moving_variance"]


def callback_for(credentials, server, **kwargs) -> BranchKeyKerasCallback:
    kwargs.setdefault("timeout", 30)
    kwargs.setdefault("num_samples", len(X))
    return BranchKeyKerasCallback(credentials, server.url, transport="websocket", log_every_s=0.2, **kwargs)


def fit(model, callbacks, epochs: int = 1, **kwargs):
    return model.fit(X, Y, batch_size=4, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks, **kwargs)


# ------------------------------------------------------------------------ without a server
@pytest.mark.parametrize("kwargs, message", [
    ({"num_samples": None}, "Expected num_samples to be an int > 0 or a callable returning one. Received: num_samples=None"),
    ({"num_samples": 0}, "Received: num_samples=0"),
    ({"num_samples": True}, "Received: num_samples=True"),
    ({"every_n_epochs": 0}, "Expected every_n_epochs >= 1. Received: every_n_epochs=0"),
    ({"buffers": "sync"}, "Expected buffers in ('local', 'average'). Received: buffers='sync'"),
    ({"reset_optimizer": "yes"}, "Expected reset_optimizer to be True or False. Received: reset_optimizer='yes'"),
    ({"send_metrics": 1}, "Received: send_metrics=1"),
    ({"validation_data": "val.csv"}, "Expected validation_data to be what model.evaluate takes"),
    ({"timeout": 0}, "Received: timeout=0"),
    ({"on_timeout": "skip"}, "Expected on_timeout in ('raise', 'continue'). Received: on_timeout='skip'"),
    ({"log_every_s": -1}, "Received: log_every_s=-1"),
    ({"transport": "pigeon"}, "Received: transport='pigeon'"),
    ({"client_options": {"transport": "amqp"}}, "client_options"),
    ({"proximal_mu": -1}, "Expected proximal_mu to be a number >= 0 (0 turns FedProx off). Received: proximal_mu=-1"),
    ({"proximal_mu": float("nan")}, "Received: proximal_mu=nan"),
    ({"proximal_mu": "0.1"}, "Received: proximal_mu='0.1'"),
])
def test_bad_arguments_fail_at_construction_naming_the_value(kwargs, message):
    with pytest.raises(ValueError) as info:
        BranchKeyKerasCallback(CREDS, HOST, **{"num_samples": 8, **kwargs})
    assert message in str(info.value)


def test_proximal_mu_off_adds_no_batch_hook_and_on_shows_in_repr():
    """Keras dispatches batch hooks asynchronously only when no callback overrides them: mu=0 must not.

    Checked on what the callback controls (Keras's own ``is_default`` marker is private and absent from
    the oldest Keras the project supports): with mu=0 the hook is Keras's base method, untouched."""
    import keras

    base_hook = keras.callbacks.Callback.on_train_batch_end
    off = BranchKeyKerasCallback(CREDS, HOST, num_samples=8)
    assert type(off).on_train_batch_end is base_hook and "on_train_batch_end" not in vars(off)
    assert "proximal_mu" not in repr(off)
    on = BranchKeyKerasCallback(CREDS, HOST, num_samples=8, proximal_mu=0.5)
    assert on.on_train_batch_end == on._proximal_step and "proximal_mu=0.5" in repr(on)


def test_the_proximal_step_compounds_the_steps_of_one_call_at_the_scheduled_learning_rate():
    """Four optimizer steps in one call (steps_per_execution=4): w moves 1 - (1 - lr*mu)**4 of the way to w_g,
    with lr the schedule's value at optimizer.iterations; lr*mu above 1 is capped (w becomes w_g)."""
    model = tiny_model()
    schedule = keras.optimizers.schedules.ExponentialDecay(0.2, decay_steps=1, decay_rate=0.5)
    model.compile(optimizer=keras.optimizers.SGD(schedule), loss="mse")
    model.optimizer.build(model.trainable_variables)
    model.optimizer.iterations.assign(1)  # the schedule gives 0.1 here
    for mu, moved in ((1.0, 1 - 0.9 ** 4), (20.0, 1.0)):
        callback = BranchKeyKerasCallback(CREDS, HOST, num_samples=8, proximal_mu=mu)
        callback.set_model(model)
        callback.on_epoch_begin(0)  # the fit's first epoch: w_g is taken here
        anchor = {v.path: np.array(v) for v in model.trainable_weights}
        for variable in model.trainable_weights:
            variable.assign(variable + 1.0)  # as if training moved every weight by 1
        callback.on_train_batch_end(3)  # batches 0..3 in one call
        for variable in model.trainable_weights:
            np.testing.assert_allclose(np.array(variable), anchor[variable.path] + 1.0 - moved, rtol=1e-5, atol=1e-6)


def test_bad_host_credentials_and_snapshot_dir_fail_at_construction(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="Expected host like"):
        BranchKeyKerasCallback(CREDS, "app.branchkey.com", num_samples=8)
    with pytest.raises(CredentialsError, match="session_token"):
        BranchKeyKerasCallback({k: v for k, v in CREDS.items() if k != "session_token"}, HOST, num_samples=8)
    with pytest.raises(TypeError, match="Expected snapshot_dir to be a directory path or None. Received: snapshot_dir=3"):
        BranchKeyKerasCallback(CREDS, HOST, num_samples=8, snapshot_dir=3)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)  # as if safetensors were not installed
    with pytest.raises(ImportError, match=r"pip install 'branchkey-integrations\[keras\]'"):
        BranchKeyKerasCallback(CREDS, HOST, num_samples=8, snapshot_dir=tmp_path)
    with pytest.raises(TypeError, match="unexpected keyword argument 'every_n_epoch'"):  # a typo is not swallowed
        BranchKeyKerasCallback(CREDS, HOST, num_samples=8, every_n_epoch=2)


def test_signature_spells_out_every_option_with_the_shared_defaults():
    """IDEs and inspect.signature see every argument; the shared ones keep the Lightning callback's defaults."""
    import inspect

    from branchkey_integrations.core.callback_kit import FederatedCallbackMixin

    keras_params = inspect.signature(BranchKeyKerasCallback.__init__).parameters
    shared = inspect.signature(FederatedCallbackMixin.__init__).parameters
    assert set(keras_params) == set(shared) | {"validation_data", "calibration_data"}
    assert keras_params["num_samples"].default is inspect.Parameter.empty  # required on Keras
    assert all(keras_params[name].default == shared[name].default for name in shared if name != "num_samples")


def test_num_samples_is_required_and_construction_never_connects():
    with pytest.raises(TypeError, match="num_samples"):
        BranchKeyKerasCallback(CREDS, HOST)
    callback = BranchKeyKerasCallback(CREDS, HOST, num_samples=lambda: 8)
    assert not callback.federation.connected and "leaf-a" in repr(callback)


def test_variable_selection_frozen_layers_never_travel_and_buffers_follow_the_policy():
    model = tiny_model(batchnorm=True, dropout=True, frozen=True)
    head = ["tiny/head/kernel", "tiny/head/bias"]
    assert [v.path for v in federated_variables(model)] == NORM + head
    assert [v.path for v in federated_variables(model, "average")] == NORM + head + STATS
    model.get_layer("norm").trainable = False  # a frozen BatchNorm keeps its statistics out too
    assert [v.path for v in federated_variables(model, "average")] == head


def test_bf16_travels_as_float32_and_the_conversion_copies():
    model = tiny_model(dtype="bfloat16")
    kernel = model.get_layer("head").kernel
    array = to_numpy(kernel)
    assert array.dtype == np.float32 and str(kernel.dtype) == "bfloat16"
    array[...] = 0
    assert np.abs(to_numpy(kernel)).sum() > 0


# ---------------------------------------------------------------------- against a server
@pytest.mark.parametrize("policy", ["local", "average"])
def test_a_round_with_batchnorm_dropout_and_a_frozen_layer(policy, server_factory, uploads, tmp_path):
    server, credentials = server_factory(2)
    model = tiny_model(batchnorm=True, dropout=True, frozen=True)
    names = [v.path for v in federated_variables(model, policy)]
    partner = [np.full(v.shape, 2.0, np.float32) for v in federated_variables(model, policy)]
    partner_upload(credentials[1], server, partner, 24.0)
    frozen = snapshot(model)
    before = Recorder("upload")
    callback = callback_for(credentials[0], server, buffers=policy, reset_optimizer=True, send_metrics=True,
                            validation_data=(X, Y), snapshot_dir=tmp_path / "snapshots")
    history = fit(model, [before, callback])

    (_, sent), = [u for u in uploads if u[0] == len(X)]
    assert [a.shape for a in sent] == [tuple(v.shape) for v in federated_variables(model, policy)]
    local, after = before.records[0], snapshot(model)
    for name in ("tiny/stem/kernel", "tiny/stem/bias"):  # frozen: neither sent nor changed
        np.testing.assert_array_equal(after[name], frozen[name])
    expected = weighted_mean([local, dict(zip(names, partner))], [len(X), 24.0], names)
    for name in names:
        np.testing.assert_allclose(after[name], expected[name], rtol=1e-6, atol=1e-7)
    for name in STATS:
        want = expected[name] if policy == "average" else local[name]  # local: FedBN keeps its statistics
        np.testing.assert_allclose(after[name], want, rtol=1e-6, atol=1e-7)
        assert not np.array_equal(local[name], frozen[name])  # the statistics did move during the epoch

    optimizer = model.optimizer  # reset_optimizer: momentum slots zero, the step count kept
    assert all(not np.any(keras.ops.convert_to_numpy(v)) for v in optimizer.variables if v is not optimizer.iterations)
    assert int(keras.ops.convert_to_numpy(optimizer.iterations)) == 2
    logs = history.history
    assert logs["branchkey_round"] == [1.0] and logs["branchkey_wait_s"][0] >= 0 and "branchkey_test_loss" in logs
    assert logs["branchkey_upload_mb"] == [pytest.approx(sum(a.nbytes for a in sent) / 1e6)]

    from safetensors.numpy import load_file
    saved = load_file(str(tmp_path / "snapshots" / "round_00001.safetensors"))
    assert sorted(saved) == sorted(names)
    np.testing.assert_array_equal(saved["tiny/head/bias"], after["tiny/head/bias"])
    branch_id = json.loads(credentials[0].read_text())["branch_id"]
    metrics = server.admin("GET", f"/admin/v1/branches/{branch_id}/metrics").json()["data"]["metrics"]
    by_mode = {m["mode"]: m for m in metrics}
    assert sorted(by_mode) == ["test", "train"]  # both describe round 1's aggregate
    assert {m["aggregation_id"] for m in metrics} == {callback.federation.last_aggregation_id}
    assert json.loads(by_mode["test"]["data"])["loss"] == pytest.approx(logs["branchkey_test_loss"][0], rel=1e-5)
    assert json.loads(by_mode["train"]["data"])["loss"] == pytest.approx(logs["loss"][0], rel=1e-5)


def test_a_leaf_whose_architecture_differs_is_told_which_variable(server_factory):
    server, credentials = server_factory(2)
    partner_upload(credentials[1], server, [to_numpy(v) for v in federated_variables(tiny_model(hidden=5))], 1.0)
    model, before = tiny_model(hidden=3), Recorder("upload")
    callback = callback_for(credentials[0], server)
    with pytest.raises(RequestRejectedError, match=r"do not match this round's \(layer_0: .*"
                                                   r"layer_0 is 'tiny/stem/kernel'"):
        fit(model, [before, callback])
    assert not callback.federation.connected  # closed on the failure: no notification thread left behind
    for name, array in before.records[0].items():
        np.testing.assert_array_equal(snapshot(model)[name], array)


@pytest.mark.parametrize("corruption, message", [
    ("nan", "tiny/head/kernel: the aggregate holds NaN"),
    ("shape", r"tiny/head/kernel: the aggregate has shape \(2, 3\), the local model \(3, 2\)"),
    ("missing", "The aggregate has 3 layers but the local model has 4"),
])
def test_a_bad_aggregate_raises_and_leaves_every_weight_bit_identical(corruption, message, server_factory,
                                                                     monkeypatch):
    server, credentials = server_factory(1)
    original = Client.download_aggregate

    def corrupted(self, file_id, **options):  # the only fake: the real aggregate, damaged
        layers = [a.copy() for a in original(self, file_id, **options).layers]
        if corruption == "nan":
            layers[2][0, 0] = np.nan
        elif corruption == "shape":
            layers[2] = layers[2].T.copy()
        else:
            layers.pop()
        return Archive(layers)

    monkeypatch.setattr(Client, "download_aggregate", corrupted)
    model, before = tiny_model(), Recorder("upload")
    with pytest.raises(AggregateMismatchError, match=message):
        fit(model, [before, callback_for(credentials[0], server)])
    after = snapshot(model)
    for name, array in before.records[0].items():
        np.testing.assert_array_equal(after[name], array)


def test_timeout_raise_fails_fit_and_continue_keeps_training(server_factory, uploads):
    server, credentials = server_factory(2)  # the second leaf never uploads
    with pytest.raises(AggregationTimeoutError, match="timeout=0.3 s"):
        fit(tiny_model(), [callback_for(credentials[0], server, timeout=0.3)])

    model, before = tiny_model(), Recorder("upload")
    callback = callback_for(credentials[0], server, timeout=0.3, on_timeout="continue")
    history = fit(model, [before, callback], epochs=2)
    assert len(history.epoch) == 2 and callback.round == 0 and len(uploads) == 3
    assert history.history["branchkey_round"] == [0.0, 0.0] and min(history.history["branchkey_wait_s"]) > 0.1
    for name, array in before.records[1].items():  # the local model, untouched
        np.testing.assert_array_equal(snapshot(model)[name], array)


def test_pause_waits_for_start_and_stop_ends_fit_gracefully(server_factory, caplog):
    server, credentials = server_factory(2)
    branch_id = json.loads(credentials[0].read_text())["branch_id"]

    def operator():
        wait_until(lambda: "waiting for the run to start for 0 s (run is 'pause')" in caplog.text, 60, "the paused round")
        server.set_run(branch_id, "start")
        wait_until(lambda: "Round 1: uploaded" in caplog.text, 60, "the upload after start")
        server.set_run(branch_id, "stop")

    server.set_run(branch_id, "pause")
    helper = threading.Thread(target=operator, daemon=True)
    callback = callback_for(credentials[0], server)
    with caplog.at_level(logging.INFO, logger="branchkey_integrations"):
        helper.start()
        history = fit(tiny_model(), [callback], epochs=5)  # returns: stop is an ending, not a failure
    helper.join(10)
    assert history.epoch == [0] and callback.round == 0 and history.history["branchkey_round"] == [0.0]
    assert "stopped during round 1" in caplog.text and not callback.federation.connected


def test_rounds_resume_with_initial_epoch_and_backup_and_restore(server_factory, uploads, tmp_path):
    """Round n belongs to epoch n-1 (every_n_epochs=1): a fit that starts at epoch e has done e rounds,
    so numbering and snapshot files continue, and an epoch that a backup says is done is not uploaded again."""
    server, credentials = server_factory(1)
    model, snapshots = tiny_model(), tmp_path / "snapshots"
    callback = callback_for(credentials[0], server, snapshot_dir=snapshots)
    assert fit(model, [callback], epochs=2).history["branchkey_round"] == [1.0, 2.0]
    again = fit(model, [callback], epochs=4, initial_epoch=2)  # the same instance serves a second fit
    assert again.history["branchkey_round"] == [3.0, 4.0] and len(uploads) == 4

    class Crash(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise RuntimeError("power cut")

    backup = tmp_path / "backup"
    first = callback_for(credentials[0], server, snapshot_dir=snapshots)  # a new process would start like this
    with pytest.raises(RuntimeError, match="power cut"):
        fit(tiny_model(), [first, keras.callbacks.BackupAndRestore(backup), Crash()], epochs=4)
    assert first.round == 2 and len(uploads) == 6
    resumed = callback_for(credentials[0], server, snapshot_dir=snapshots)
    history = fit(tiny_model(), [resumed, keras.callbacks.BackupAndRestore(backup)], epochs=4)
    assert history.epoch == [2, 3] and history.history["branchkey_round"] == [3.0, 4.0] and len(uploads) == 8
    assert sorted(p.name for p in snapshots.iterdir()) == [f"round_0000{n}.safetensors" for n in (1, 2, 3, 4)]


def test_every_n_epochs_keeps_history_aligned_and_bf16_keeps_its_dtype(server_factory, uploads):
    server, credentials = server_factory(1)
    model, after = tiny_model(dtype="bfloat16"), Recorder("loaded")
    history = fit(model, [callback_for(credentials[0], server, every_n_epochs=2), after], epochs=3)
    assert history.history["branchkey_round"] == [0.0, 1.0, 1.0] and len(uploads) == 1
    assert {a.dtype for _, arrays in uploads for a in arrays} == {np.dtype(np.float32)}
    assert {str(v.dtype) for v in model.trainable_weights} == {"bfloat16"}
    (_, sent), = uploads  # one leaf: the aggregate is its own upload, exact in bf16
    for index, name in enumerate(PARAMS):
        np.testing.assert_array_equal(after.records[1][name], sent[index])


def test_the_readme_advice_monitoring_the_aggregate_runs_and_the_value_is_repeated_between_rounds(
        server_factory, tmp_path):
    """EarlyStopping and ModelCheckpoint on ``branchkey_test_loss`` with ``mode="min"`` (Keras cannot infer the
    direction of a metric it did not compile and raises without it), placed after the callback."""
    server, credentials = server_factory(1)
    x_val, y_val = data(8, 1)
    callback = callback_for(credentials[0], server, every_n_epochs=2, validation_data=(x_val, y_val))
    stopping = keras.callbacks.EarlyStopping(monitor="branchkey_test_loss", mode="min", patience=5,
                                             restore_best_weights=True)
    best = tmp_path / "best.keras"
    checkpoint = keras.callbacks.ModelCheckpoint(best, monitor="branchkey_test_loss", mode="min", save_best_only=True)
    history = fit(tiny_model(), [callback, stopping, checkpoint], epochs=4).history
    losses = history["branchkey_test_loss"]
    assert len(losses) == 3  # from the first round's epoch (1) on, every epoch
    assert losses[0] == losses[1] != losses[2]  # epoch 2 repeats round 1's aggregate; epoch 3 is round 2's
    assert best.exists()
    with pytest.raises(ValueError, match="mode='min'"):  # why the README says mode="min"
        fit(tiny_model(), [callback_for(credentials[0], server, validation_data=(x_val, y_val)),
                           keras.callbacks.EarlyStopping(monitor="branchkey_test_loss")])


def test_a_leaf_two_rounds_behind_loads_the_latest_aggregate_and_counts_the_branchs_rounds(
        server_factory, uploads, capsys):
    server, credentials = server_factory(1)  # rounds complete with this leaf alone
    first = callback_for(credentials[0], server)
    ids = []
    track = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: ids.append(
        first.federation.last_aggregation_id))
    fit(tiny_model(), [first, track], epochs=3)
    uploads.clear()

    lagging = callback_for(credentials[0], server)  # holds round 1's aggregate, as a leaf restored from then would
    lagging.federation.load_state_dict({"round": 1, "last_aggregation_id": ids[0], "last_run_number": 1,
                                        "last_round_index": 0})
    model, after = tiny_model(seed=3), Recorder("loaded")
    history = model.fit(X, Y, batch_size=4, epochs=3, initial_epoch=1, shuffle=False, verbose=2,
                        callbacks=[lagging, after])
    assert history.history["branchkey_round"] == [3.0, 4.0]  # caught up to the branch's round 3, then round 4
    assert len(uploads) == 1  # round 4 only: nothing uploaded into a round long closed
    assert "behind its branch" in capsys.readouterr().out  # said through Keras's printing
    with Client(credentials[0], host=server.url, transport="none") as client:
        latest = client.download_aggregate(ids[2])
        for name, array in zip(PARAMS, latest.layers):
            np.testing.assert_array_equal(after.records[0][name], array)


def test_without_keras_the_import_fails_with_an_install_hint():
    import subprocess
    import sys

    code = ("import sys; sys.modules['keras'] = None\n"
            "import branchkey_integrations\n"  # the package itself needs no keras
            "try:\n    import branchkey_integrations.keras\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'branchkey-integrations[keras]'" in out


@pytest.mark.parametrize("interactive", [True, False], ids=["stdout", "logging"])
def test_round_lines_go_where_keras_sends_its_own(server_factory, capsys, caplog, interactive):
    """Keras prints to stdout, or to logging under ``keras.config.disable_interactive_logging()``: so do we."""
    server, credentials = server_factory(1)  # the round completes with this leaf alone
    caplog.set_level(logging.INFO, logger="branchkey_integrations.keras")
    if not interactive:
        keras.config.disable_interactive_logging()
    try:
        tiny_model().fit(X, Y, batch_size=4, epochs=1, verbose=2, callbacks=[callback_for(credentials[0], server)])
    finally:
        keras.config.enable_interactive_logging()
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("BranchKey:")]
    logged = [r.getMessage() for r in caplog.records
              if r.name == "branchkey_integrations.keras" and r.getMessage().startswith("BranchKey:")]
    assert (printed if interactive else logged), (printed, logged)
    assert not (logged if interactive else printed), (printed, logged)
