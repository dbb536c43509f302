"""BranchKeyCallback without rounds: argument checks, strategy and data checks, state, pickling."""

from __future__ import annotations

import pickle
import sys
import traceback
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.utils.data import DataLoader

from branchkey_integrations import Client
from branchkey_integrations.core.errors import CredentialsError, TransportError
from branchkey_integrations.core.errors import BranchKeyError, RequestRejectedError
from branchkey_integrations.core.errors import AggregateMismatchError
from branchkey_integrations.core.outcome import Outcome
from branchkey_integrations.lightning import BranchKeyCallback, federated_tensors, to_numpy

from .models import Stream, TinyModel, dataset, loader, trainer
from ..conftest import CREDS

HOST = "http://127.0.0.1:1"


@pytest.mark.parametrize("kwargs, message", [
    ({"every_n_epochs": 0}, "Expected every_n_epochs >= 1. Received: every_n_epochs=0"),
    ({"every_n_epochs": True}, "Received: every_n_epochs=True"),
    ({"num_samples": 0}, "Expected num_samples to be an int > 0, a callable returning one, or None. Received: num_samples=0"),
    ({"num_samples": 2.5}, "Received: num_samples=2.5"),
    ({"buffers": "sync"}, "Expected buffers in ('local', 'average'). Received: buffers='sync'"),
    ({"reset_optimizer": 1}, "Expected reset_optimizer to be True or False. Received: reset_optimizer=1"),
    ({"timeout": -5}, "Received: timeout=-5"),
    ({"on_timeout": "skip"}, "Expected on_timeout in ('raise', 'continue'). Received: on_timeout='skip'"),
    ({"send_metrics": "yes"}, "Expected send_metrics to be True or False. Received: send_metrics='yes'"),
    ({"log_every_s": 0}, "Received: log_every_s=0"),
    ({"transport": "pigeon"}, "Received: transport='pigeon'"),
    ({"client_options": {"host": HOST}}, "client_options"),
])
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError) as info:
        BranchKeyCallback(CREDS, HOST, **kwargs)
    assert message in str(info.value)


def test_bad_host_and_credentials_fail_at_construction():
    with pytest.raises(ValueError, match="Expected host like"):
        BranchKeyCallback(CREDS, "app.branchkey.com")
    with pytest.raises(CredentialsError, match="session_token"):
        BranchKeyCallback({k: v for k, v in CREDS.items() if k != "session_token"}, HOST)


def test_a_snapshot_dir_fails_at_construction_when_it_is_no_path_or_safetensors_is_missing(monkeypatch, tmp_path):
    with pytest.raises(TypeError, match="Expected snapshot_dir to be a directory path or None. Received: snapshot_dir=3"):
        BranchKeyCallback(CREDS, HOST, snapshot_dir=3)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)  # as if safetensors were not installed
    with pytest.raises(ImportError, match=r"pip install 'branchkey-integrations\[lightning\]'"):
        BranchKeyCallback(CREDS, HOST, snapshot_dir=tmp_path)


def test_state_key_names_the_settings_so_two_callbacks_checkpoint_side_by_side():
    a = BranchKeyCallback(CREDS, HOST)
    b = BranchKeyCallback(CREDS, HOST, every_n_epochs=2, buffers="average")
    assert a.state_key != b.state_key and "every_n_epochs': 2" in b.state_key and CREDS["id"] in a.state_key


def test_state_round_trips_and_old_state_loads_with_defaults():
    callback = BranchKeyCallback(CREDS, HOST)
    callback.load_state_dict({"round": 4, "last_aggregation_id": "x1", "last_epoch": 7})
    assert callback.state_dict() == {"round": 4, "last_aggregation_id": "x1", "last_epoch": 7, "error_feedback": []}
    callback.load_state_dict({})  # no quantization residual yet: an empty list, as an old checkpoint loads
    assert callback.state_dict() == {"round": 0, "last_aggregation_id": None, "last_epoch": -1, "error_feedback": []}


def test_pickles_without_a_client():
    callback = BranchKeyCallback(CREDS, HOST)
    callback.federation._client = object()
    clone = pickle.loads(pickle.dumps(callback))
    assert not clone.federation.connected and clone.federation.credentials == callback.federation.credentials


def test_sharding_strategies_are_refused_at_setup():
    callback = BranchKeyCallback(CREDS, HOST)
    fake_trainer = SimpleNamespace(strategy=FSDPStrategy(), is_global_zero=True)
    with pytest.raises(RuntimeError, match="does not support FSDPStrategy: it shards parameters"):
        callback.setup(fake_trainer, TinyModel(), "fit")
    assert not callback.federation.connected


def test_weighting_from_int_callable_or_dataset_and_a_clear_error_without_length():
    with_len = SimpleNamespace(train_dataloader=DataLoader(dataset(12, 0)))
    assert BranchKeyCallback(CREDS, HOST)._weighting(with_len) == 12.0
    assert BranchKeyCallback(CREDS, HOST, num_samples=5)._weighting(with_len) == 5.0
    assert BranchKeyCallback(CREDS, HOST, num_samples=lambda: 7)._weighting(with_len) == 7.0
    with pytest.raises(ValueError, match=r"num_samples\(\) to return a number > 0. Received: 0"):
        BranchKeyCallback(CREDS, HOST, num_samples=lambda: 0)._weighting(with_len)
    stream = SimpleNamespace(train_dataloader=DataLoader(Stream()))
    with pytest.raises(ValueError, match="training data \\(Stream\\) has no length. Pass num_samples"):
        BranchKeyCallback(CREDS, HOST)._weighting(stream)
    assert BranchKeyCallback(CREDS, HOST, num_samples=8)._weighting(stream) == 8.0


def test_iterable_data_without_num_samples_fails_at_fit_start(server_factory):
    server, credentials = server_factory(1)
    callback = BranchKeyCallback(credentials[0], server.url, transport="websocket")
    with pytest.raises(ValueError, match="has no length"):
        trainer([callback]).fit(TinyModel(), DataLoader(Stream(), batch_size=4))
    assert not callback.federation.connected  # closed on the failure, no thread left behind


def test_an_epoch_that_already_took_part_in_a_round_is_not_uploaded_again(server_factory):
    """Defensive: a checkpoint that says epoch 0 finished its round must not upload epoch 0 again."""
    server, credentials = server_factory(1)
    model = TinyModel()

    class Restored(BranchKeyCallback):
        def setup(self, trainer, pl_module, stage):
            super().setup(trainer, pl_module, stage)
            self.load_state_dict({"round": 3, "last_aggregation_id": "a", "last_epoch": 0})

    restored = Restored(credentials[0], server.url, transport="websocket")
    trainer([restored]).fit(model, DataLoader(dataset(8, 0)))
    assert restored.round == 3 and restored.federation.last_aggregation_id == "a"


def test_tensor_selection_and_conversion():
    model = TinyModel(batchnorm=True, frozen=True).to(torch.float16)
    assert [n for n, _ in federated_tensors(model)] == ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    assert [n for n, _ in federated_tensors(model, "average")][-2:] == ["norm.running_mean", "norm.running_var"]
    array = to_numpy(model.head.weight)
    assert array.dtype == "float32"
    array[...] = 0  # a copy: the model is not touched
    assert model.head.weight.abs().sum() > 0


def test_an_error_on_rank_0_reaches_the_other_ranks_as_an_error_they_can_raise():
    """What DDP broadcasts must survive pickling: errors that do not are sent as their text."""
    rejected = RequestRejectedError("POST /api/v1/file/upload: bad layers", 400)
    assert Outcome("error", error=rejected).portable().error is rejected

    class Unpicklable(RuntimeError):
        def __init__(self, text):
            super().__init__(text)
            self.callback = lambda: None

    portable = Outcome("error", error=Unpicklable("broken pipe")).portable().error
    assert type(portable) is BranchKeyError
    assert str(portable) == "Unpicklable on global rank 0: broken pipe"
    mismatch = AggregateMismatchError("head.weight: the aggregate holds NaN or infinity.")
    assert Outcome("error", error=mismatch).portable().error is mismatch
    other_rank = BranchKeyCallback(CREDS, HOST)  # no local error: it raises what rank 0 broadcast
    with pytest.raises(AggregateMismatchError, match="head.weight"):
        other_rank._apply(pickle.loads(pickle.dumps(Outcome("error", error=mismatch))), None, None, [])


def test_without_lightning_the_import_fails_with_an_install_hint():
    import subprocess

    code = ("import sys; sys.modules['lightning'] = None\n"
            "import branchkey_integrations\n"  # the package itself needs no lightning
            "try:\n    import branchkey_integrations.lightning\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ("branchkey_integrations.lightning needs PyTorch and Lightning: "
                           "pip install 'branchkey-integrations[lightning]'")


def test_a_server_that_is_not_running_is_one_line_at_setup():
    """Issue 28: with the server down, fit failed at setup with a ~100-line urllib3 -> requests chain."""
    callback = BranchKeyCallback(CREDS, HOST, client_options={"max_retries": 0})
    with pytest.raises(TransportError) as info:
        trainer([callback]).fit(TinyModel(), loader(8, 0))
    assert str(info.value) == (
        f"GET /api/v1/run/{CREDS['branch_id']}: cannot reach a BranchKey server at {HOST} (connection refused). Is "
        "'branchkey-local serve' running there? Start it, or give the client the host that serves your branch.")
    shown = "".join(traceback.format_exception(info.value))
    assert "urllib3" not in shown and "direct cause" not in shown and "During handling" not in shown, shown


def test_https_against_the_plain_http_server_says_so(inprocess_server):
    server, [credentials] = inprocess_server(1)
    https = server.url.replace("http://", "https://")
    with pytest.raises(TransportError) as info:
        Client(credentials, host=https, transport="none", max_retries=0)
    plain = server.url.removeprefix("http://")
    assert f"{https} answered in plain HTTP, not TLS: use http://{plain}" in str(info.value)
    assert "WRONG_VERSION_NUMBER" not in str(info.value) and info.value.__cause__ is None
