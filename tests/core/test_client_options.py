"""Client settings are checked once, by one validator, when they are written: by Client and by Federation."""

from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path

import pytest

from branchkey_integrations import Client
from branchkey_integrations.core.client import check_client_options, check_host
from branchkey_integrations.core.client_options import CLIENT_OPTIONS, TRANSPORTS, ClientOptions
from branchkey_integrations.core.federation import Federation
from branchkey_integrations.core.leaf_options import LeafOptions

from ..conftest import SHORT_CREDS as CREDS

HOST = "http://127.0.0.1:9"  # nothing listens: a check that let a bad value through would fail on the network instead

BAD_VALUES = [
    ("host", "app.branchkey.com"), ("host", "ftp://x"), ("host", None), ("rbmq_host", 5), ("rbmq_port", 0),
    ("rbmq_port", "5672"), ("ssl", 3), ("run_check_interval_s", 0), ("proxies", "http://proxy"),
    ("transport", "mqtt"), ("output_dir", 7), ("timeout", -5), ("timeout", "30"), ("max_retries", -1),
    ("max_retries", 1.5), ("backoff_factor", -1), ("backoff_factor", True),
    # the one seconds rule Federation's own timeouts follow too: no bool, no infinity, no NaN
    ("timeout", True), ("timeout", float("inf")), ("run_check_interval_s", float("nan")),
    # AMQP over TLS takes a URL without credentials or vhost; a client certificate must name files that exist
    ("rbmq_host", "amqps://leaf:secret@broker/tree"), ("rbmq_host", "https://broker"), ("cert", 5),
    ("cert", ("a.pem", "b.key", "c")), ("cert", "/no/such/client.pem"),
]


def test_every_client_argument_has_a_rule():
    parameters = list(inspect.signature(Client.__init__).parameters)
    assert parameters[:2] == ["self", "credentials"] and tuple(parameters[2:]) == CLIENT_OPTIONS


def test_good_options_come_back_normalized():
    checked = check_client_options({"host": HOST + "/", "request_timeout": 5, "proxies": None, "output_dir": Path("out"),
                                    "ssl": "ca.pem", "transport": "websocket", "backoff_factor": 0})
    assert checked == {"host": HOST, "request_timeout": 5.0, "proxies": None, "output_dir": Path("out"), "ssl": "ca.pem",
                       "transport": "websocket", "backoff_factor": 0.0}
    assert check_host("https://app.branchkey.com/") == "https://app.branchkey.com"


@pytest.mark.parametrize("name, value", BAD_VALUES)
def test_a_bad_value_fails_the_same_way_in_client_and_federation(name, value):
    message = f"Received: {name}={value!r}"
    with pytest.raises(ValueError, match="Expected") as by_validator:
        check_client_options({name: value})
    assert message in str(by_validator.value)
    with pytest.raises(ValueError) as by_client:
        Client(CREDS, **{"host": HOST, "transport": "none", name: value})
    assert message in str(by_client.value)
    if name in ("host", "transport"):
        federation_kwargs = {"host": value} if name == "host" else {"transport": value}
    else:
        federation_kwargs = {"client_options": {name: value}}
    with pytest.raises(ValueError) as by_federation:
        Federation(CREDS, **{"host": HOST, **federation_kwargs})
    assert message in str(by_federation.value)


def test_the_per_request_timeout_is_request_timeout_and_the_old_name_still_works_with_a_warning():
    with pytest.warns(DeprecationWarning, match="now called 'request_timeout'"):
        assert check_client_options({"timeout": 5}) == {"request_timeout": 5.0}
    with pytest.warns(DeprecationWarning):
        federation = Federation(CREDS, HOST, timeout=60, client_options={"timeout": 5})
    assert federation.options.client.request_timeout == 5.0 and federation.timeout == 60.0  # the round's is apart
    assert ClientOptions().request_timeout == inspect.signature(Client).parameters["request_timeout"].default
    with pytest.raises(ValueError, match="request_timeout or its old name timeout, not both"):
        ClientOptions.checked({"timeout": 5, "request_timeout": 6})


def test_client_and_federation_read_their_defaults_from_the_options_objects():
    for function, options in ((Client, ClientOptions()), (Federation, LeafOptions())):
        defaults = {name: p.default for name, p in inspect.signature(function).parameters.items()
                    if p.default is not inspect.Parameter.empty and hasattr(options, name)}
        assert len(defaults) >= 8 and defaults == {name: getattr(type(options), name) for name in defaults}
    assert {f.name for f in fields(LeafOptions) if f.init} <= set(inspect.signature(Federation).parameters)


def test_the_broker_endpoint_and_the_client_certificate_come_from_the_options(tmp_path: Path) -> None:
    pem, key = tmp_path / "leaf.pem", tmp_path / "leaf.key"
    pem.write_text("x")
    key.write_text("x")
    options = ClientOptions(host="https://bk.example.org:8443", rbmq_host="amqps://mq.example.org:5999",
                            cert=[pem, key])
    assert options.amqp_endpoint() == ("mq.example.org", 5999, True) and options.cert == (str(pem), str(key))
    assert options.http_settings()["cert"] == (str(pem), str(key))
    assert ClientOptions(rbmq_host="amqps://mq", rbmq_port=6000).amqp_endpoint() == ("mq", 6000, True)
    assert ClientOptions(rbmq_host="mq", rbmq_port=6000).amqp_endpoint() == ("mq", 6000, False)  # as 2.7.1


def test_federation_refuses_a_bogus_transport_at_construction_listing_the_allowed_ones():
    with pytest.raises(ValueError) as info:
        Federation(CREDS, HOST, transport="bogus")
    assert "Received: transport='bogus'" in str(info.value) and str(TRANSPORTS) in str(info.value)


def test_federation_refuses_an_unknown_client_option_at_construction_listing_the_allowed_ones():
    with pytest.raises(ValueError) as info:
        Federation(CREDS, HOST, client_options={"timeout": -5, "nonsense": 1})
    assert "Received: nonsense=1" in str(info.value) and "'rbmq_host'" in str(info.value)
    with pytest.raises(ValueError, match=r"Expected timeout to be a number of seconds > 0. Received: timeout=-5"):
        Federation(CREDS, HOST, client_options={"timeout": -5})


def test_federation_still_keeps_its_own_settings_out_of_client_options():
    with pytest.raises(ValueError, match="without 'wait_for_run'"):
        Federation(CREDS, HOST, client_options={"wait_for_run": True})
