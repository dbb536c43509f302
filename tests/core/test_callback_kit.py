"""The callback kit without a framework: settings checked at construction, the four outcomes of
Federation.exchange, outcomes that survive a broadcast, and the dtype rule both callbacks share."""

from __future__ import annotations

import inspect
import logging
import pickle
import sys

import numpy as np
import pytest

from branchkey_integrations.core.callback_kit import LEAF_OPTION_NAMES, CallbackSettings, FederatedCallbackMixin
from branchkey_integrations.core.callback_kit import travels_as_float32
from branchkey_integrations.core.leaf_options import LeafOptions
from branchkey_integrations.core.errors import AggregationTimeoutError, BranchKeyError, CredentialsError
from branchkey_integrations.core.errors import RequestRejectedError, RunStopped
from branchkey_integrations.core.federation import Federation, RoundResult
from branchkey_integrations.core.outcome import Outcome

from ..conftest import CREDS

HOST = "http://127.0.0.1:1"
NAMES = ["encoder.weight", "encoder.bias"]
LAYERS = [np.ones((2, 3), np.float32), np.zeros(3, np.float32)]


# ------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("kwargs, message", [
    ({"every_n_epochs": 0}, "Expected every_n_epochs >= 1. Received: every_n_epochs=0"),
    ({"num_samples": -1}, "Expected num_samples to be an int > 0, a callable returning one, or None. "
                          "Received: num_samples=-1"),
    ({"num_samples": None, "num_samples_required": True},
     "Expected num_samples to be an int > 0 or a callable returning one. Received: num_samples=None"),
    ({"buffers": "all"}, "Expected buffers in ('local', 'average'). Received: buffers='all'"),
    ({"reset_optimizer": None}, "Expected reset_optimizer to be True or False. Received: reset_optimizer=None"),
    ({"send_metrics": "no"}, "Expected send_metrics to be True or False. Received: send_metrics='no'"),
    ({"timeout": -1}, "Received: timeout=-1"),
    ({"on_timeout": "skip"}, "Expected on_timeout in ('raise', 'continue'). Received: on_timeout='skip'"),
    ({"log_every_s": 0}, "Received: log_every_s=0"),
    ({"host": "app.branchkey.com"}, "Expected host like"),
    ({"client_options": {"host": "http://elsewhere"}}, "client_options"),
])
def test_every_bad_setting_fails_in_the_constructor(kwargs, message):
    with pytest.raises(ValueError) as info:
        CallbackSettings(CREDS, **{"host": HOST, **kwargs})
    assert message in str(info.value)


def test_bad_credentials_and_a_snapshot_dir_that_is_no_path_fail_in_the_constructor():
    with pytest.raises(CredentialsError, match="session_token"):
        CallbackSettings({k: v for k, v in CREDS.items() if k != "session_token"}, HOST)
    with pytest.raises(TypeError, match="Expected snapshot_dir to be a directory path or None. Received: snapshot_dir=5"):
        CallbackSettings(CREDS, HOST, snapshot_dir=5)


def test_snapshot_dir_without_safetensors_fails_in_the_constructor_naming_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)  # the import now fails, as when not installed
    with pytest.raises(ImportError, match=r"safetensors is not installed. Install it \(pip install "
                                          r"'branchkey-integrations\[keras\]'\) or pass snapshot_dir=None"):
        CallbackSettings(CREDS, HOST, snapshot_dir=tmp_path, install_extra="keras")
    assert CallbackSettings(CREDS, HOST).snapshot_dir is None  # no snapshot_dir: safetensors is not needed


def test_settings_build_an_unconnected_federation_and_resolve_the_snapshot_path(tmp_path):
    settings = CallbackSettings(CREDS, HOST, timeout=None, on_timeout="continue", snapshot_dir=str(tmp_path))
    federation = settings.federation
    assert isinstance(federation, Federation) and not federation.connected
    assert (federation.timeout, federation.on_timeout, settings.snapshot_dir) == (None, "continue", tmp_path)
    with pytest.raises(AttributeError):
        settings.every_n_epochs = 2  # frozen: what was checked stays checked
    clone = pickle.loads(pickle.dumps(settings))  # callbacks travel to DDP ranks in a pickle
    assert clone.federation.credentials == federation.credentials and clone.snapshot_dir == tmp_path


def test_the_shared_constructor_has_the_settings_defaults():
    """One signature (FederatedCallbackMixin.__init__), one set of checks (CallbackSettings): they must agree."""
    signature = inspect.signature(FederatedCallbackMixin.__init__).parameters
    fields = inspect.signature(CallbackSettings).parameters
    shared = [name for name in signature if name != "self"]
    assert all(signature[name].default == fields[name].default for name in shared)
    assert set(fields) - set(shared) == {"num_samples_required", "install_extra"}


def test_compression_and_quantize_are_options_of_their_own_and_reach_the_client():
    settings = CallbackSettings(CREDS, HOST, quantize="int8", compression="none")
    client = settings.federation.options.client
    assert (client.quantize, client.compression) == ("int8", "none")
    assert (settings.federation.quantize, settings.federation.compression) == ("int8", "none")
    federation = Federation(CREDS, HOST, quantize="fp16", client_options={"request_timeout": 4})
    assert (federation.options.client.quantize, federation.options.client.request_timeout) == ("fp16", 4.0)
    with pytest.raises(ValueError, match=r"Expected quantize once: as an argument or in client_options"):
        LeafOptions(HOST, quantize="int8", client_options={"quantize": "fp16"})
    with pytest.raises(ValueError, match="quantize"):
        CallbackSettings(CREDS, HOST, quantize="int4")  # the client's own check names the accepted ones


def test_every_leaf_option_is_a_callback_option_with_the_same_default_and_reaches_the_federation():
    """LeafOptions writes the round's defaults once: the callbacks take every one of them (check_every_s and
    connect_timeout included) and hand them to their Federation."""
    signature = inspect.signature(FederatedCallbackMixin.__init__).parameters
    for name in LEAF_OPTION_NAMES:
        assert signature[name].default == getattr(LeafOptions, name), name
    settings = CallbackSettings(CREDS, HOST, check_every_s=0.5, connect_timeout=2, timeout=9,
                                client_options={"request_timeout": 4})
    options = settings.federation.options
    assert (options.check_every_s, options.connect_timeout, options.timeout) == (0.5, 2.0, 9.0)
    assert options.client.request_timeout == 4.0 and options.client.host == HOST
    with pytest.raises(ValueError, match="Received: check_every_s=0"):
        CallbackSettings(CREDS, HOST, check_every_s=0)


def test_dtypes_that_travel_as_float32_are_matched_by_name():
    assert travels_as_float32("bfloat16") and travels_as_float32(np.dtype(np.float16))
    assert travels_as_float32("torch.bfloat16")  # str(torch.bfloat16)
    assert not travels_as_float32(np.dtype(np.float32)) and not travels_as_float32("int8")


# ------------------------------------------------------------------------------------------- exchange
@pytest.fixture
def federation():
    return Federation(CREDS, HOST, on_timeout="continue")


def round_that(monkeypatch, federation, behaviour):
    """Replace run_round, the one call exchange makes, with ``behaviour(layers, weighting, names)``."""
    calls = []

    def run_round(layers, weighting, expected=None, names=None):
        calls.append((layers, weighting, names))
        return behaviour(layers, weighting, names)

    monkeypatch.setattr(federation, "run_round", run_round)
    return calls


def raising(error: BaseException):
    def behaviour(*_):
        raise error
    return behaviour


def test_a_finished_round_is_done_and_saved_as_a_snapshot(monkeypatch, federation, tmp_path):
    result = RoundResult("agg-1", [a * 2 for a in LAYERS], 0.5, 0.1, 1)
    calls = round_that(monkeypatch, federation, lambda *_: result)
    outcome = federation.exchange(lambda: LAYERS, lambda: 12.0, NAMES, snapshot_dir=tmp_path)
    assert outcome == Outcome("done", result) and outcome.error is None
    assert calls == [(LAYERS, 12.0, NAMES)]  # functions are called inside the round
    from safetensors.numpy import load_file
    saved = load_file(str(tmp_path / "round_00001.safetensors"))
    np.testing.assert_array_equal(saved["encoder.weight"], result.layers[0])


def test_a_round_that_timed_out_is_a_timeout_with_its_result(monkeypatch, federation, tmp_path):
    result = RoundResult(None, None, 3.0, 0.1, 0)
    round_that(monkeypatch, federation, lambda *_: result)
    outcome = federation.exchange(LAYERS, 12.0, NAMES, snapshot_dir=tmp_path)
    assert (outcome.kind, outcome.result, outcome.error) == ("timeout", result, None)
    assert not any(tmp_path.iterdir())  # nothing to save


def test_a_stopped_run_is_stopped_not_an_error(monkeypatch, federation, caplog):
    stop = RunStopped("The run of branch b was stopped during round 1.")
    round_that(monkeypatch, federation, raising(stop))
    with caplog.at_level(logging.INFO, logger="branchkey_integrations"):
        outcome = federation.exchange(LAYERS, 12.0, NAMES)
    assert (outcome.kind, outcome.result, outcome.error) == ("stopped", None, stop)
    assert "stopped during round 1. Stopping training." in caplog.text


@pytest.mark.parametrize("failure, expected", [
    (RequestRejectedError("bad upload: layer_1 has shape (4,), expected (3,)", 400),
     "bad upload: layer_1 has shape (4,), expected (3,) (on this leaf layer_1 is 'encoder.bias'; "
     "every leaf of the branch must federate the same parameters) (HTTP 400)"),
    (RequestRejectedError("bad upload", 400), "bad upload (HTTP 400)"),
    (AggregationTimeoutError("Round 1: still waiting for the aggregate after timeout=2 s."), "timeout=2 s"),
])
def test_a_failed_round_is_an_error_and_a_refusal_names_the_local_layer(monkeypatch, federation, failure, expected):
    round_that(monkeypatch, federation, raising(failure))
    outcome = federation.exchange(LAYERS, 12.0, NAMES)
    assert outcome.kind == "error" and outcome.result is None
    assert type(outcome.error) is type(failure) and expected in str(outcome.error)


def test_a_weighting_that_fails_is_an_error_outcome_not_an_exception(monkeypatch, federation):
    calls = round_that(monkeypatch, federation, raising(AssertionError("no round without a weighting")))

    def broken() -> float:
        raise ValueError("Expected num_samples() to return a number > 0. Received: 0")

    outcome = federation.exchange(LAYERS, broken, NAMES)
    assert outcome.kind == "error" and "Received: 0" in str(outcome.error) and calls == []


def test_an_outcome_survives_a_broadcast_and_an_unpicklable_error_travels_as_its_text():
    class Unpicklable(RuntimeError):
        def __init__(self, text):
            super().__init__(text)
            self.socket = lambda: None

    portable = Outcome("error", error=Unpicklable("broken pipe")).portable()
    assert type(portable.error) is BranchKeyError and str(portable.error) == "Unpicklable on global rank 0: broken pipe"
    done = Outcome("done", RoundResult("agg-1", LAYERS, 0.5, 0.1, 1))
    assert done.portable() is done and pickle.loads(pickle.dumps(done)).result.aggregation_id == "agg-1"
    with pytest.raises(ValueError, match="Expected kind in \\('done', 'timeout', 'stopped', 'error'\\). Received: kind='ok'"):
        Outcome("ok")


def test_record_round_adopts_a_round_run_elsewhere(federation):
    federation.record_round(3, "agg-3")
    assert federation.state_dict() == {"round": 3, "last_aggregation_id": "agg-3"}
    federation.record_round(5)  # a resumed fit: rounds counted, the last aggregate kept
    assert federation.state_dict() == {"round": 5, "last_aggregation_id": "agg-3"}
