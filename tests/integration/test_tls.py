"""branchkey-local over TLS: ``serve --tls-cert/--tls-key`` (HTTPS and WSS on one port), mutual TLS, a
certificate reloaded on SIGHUP mid-run, our client and the official 3.0.1 client verifying the server with a
CA bundle of the test's own (never verify=False)."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from branchkey_integrations import Client

from ..conftest import LocalServer, cli, init_branch, wait_until
from ..tls_certs import TestCA
from .test_client import assert_aggregate, federate_round, layers_for
from .test_official_clients import check_rounds, make_rounds, run_official_leaves


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "pki")


@pytest.fixture
def servers():
    made: list[LocalServer] = []
    yield made
    for server in made:
        server.stop()


def start_tls(tmp_path: Path, ca: TestCA, servers: list, leaves: int = 2, *extra: str,
              probe: dict | None = None) -> tuple[LocalServer, list[Path]]:
    pair = ca.server()
    credentials = init_branch(tmp_path / "data", leaves)
    server = LocalServer(tmp_path / "data", serve_args=("--tls-cert", str(pair.cert), "--tls-key", str(pair.key),
                                                        *extra),
                         probe={"verify": str(ca.bundle), **(probe or {})})
    servers.append(server)
    server.start()
    assert server.url.startswith("https://127.0.0.1:")
    return server, credentials


def connect(creds: Path, server: LocalServer, ca: TestCA, tmp_path: Path) -> Client:
    client = Client(creds, host=server.url, ssl=str(ca.bundle), transport="websocket",
                    output_dir=tmp_path / f"out-{creds.stem}", run_check_interval_s=0.5)
    assert client.notifications.wait_connected(15), f"no WSS connection:\n{server.log()}"
    return client


def served_certificate(url: str, bundle: Path) -> bytes:
    """The DER certificate a new TLS handshake with the server presents (verified against ``bundle``)."""
    host, port = url.removeprefix("https://").rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(bundle))
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls:
        return tls.getpeercert(binary_form=True)


def test_serve_refuses_a_tls_key_others_may_read(tmp_path: Path, ca: TestCA) -> None:
    pair = ca.server()
    os.chmod(pair.key, 0o640)
    init_branch(tmp_path / "data", 1)
    result = cli("serve", "--data-dir", str(tmp_path / "data"), "--port", "0", "--tls-cert", str(pair.cert),
                 "--tls-key", str(pair.key), check=False)
    assert result.returncode == 1
    assert f"chmod 600 {pair.key}" in result.stderr and "Traceback" not in result.stderr


def test_our_client_federates_over_https_and_wss_and_plain_http_is_closed(tmp_path, ca, servers) -> None:
    server, credentials = start_tls(tmp_path, ca, servers)
    clients = [connect(creds, server, ca, tmp_path) for creds in credentials]
    try:
        for round_index in range(2):
            expected, aggregates, _ = federate_round(clients, seed=7 * round_index)
            for archive in aggregates:
                assert_aggregate(expected, archive)
    finally:
        for client in clients:
            client.close()
    plain = server.url.replace("https://", "http://")
    for _ in range(3):  # closed cleanly, answered nothing
        with pytest.raises(requests.ConnectionError):
            requests.get(plain + "/api/v1/run/x", timeout=5)
    other = TestCA(tmp_path / "other", name="another CA")
    with pytest.raises(requests.exceptions.SSLError):  # a client that trusts another CA refuses the server
        requests.get(server.url + "/api/v1/run/x", verify=str(other.bundle), timeout=5)
    line = wait_until(lambda: "plain-HTTP request to the TLS port" in server.log() or None, 10, "the log line")
    assert line and server.log().count("TLS handshake from 127.0.0.1 failed") == 1  # once per peer and interval
    assert "Traceback" not in server.log()
    status = cli("status", "--data-dir", str(tmp_path / "data"))  # the CLI trusts the served certificate
    assert status.stdout.startswith(f"server  {server.url}  (TLS:")
    assert json.loads(cli("status", "--json", "--data-dir", str(tmp_path / "data")).stdout)["tls"] is True


def test_mutual_tls_refuses_a_leaf_without_a_certificate(tmp_path, ca, servers, monkeypatch) -> None:
    leaf_cert = ca.client()
    server, credentials = start_tls(tmp_path, ca, servers, 1, "--tls-client-ca", str(ca.bundle),
                                    probe={"cert": (str(leaf_cert.cert), str(leaf_cert.key))})
    creds = json.loads(credentials[0].read_text())
    run = f"{server.url}/api/v1/run/{creds['branch_id']}"
    auth = {"Authorization": f"Bearer {creds['id']}:{creds['session_token']}"}
    with pytest.raises(requests.ConnectionError):  # refused at the handshake, before any HTTP
        requests.get(run, headers=auth, verify=str(ca.bundle), timeout=5)
    stranger = TestCA(tmp_path / "stranger", name="stranger CA").client()
    with pytest.raises(requests.ConnectionError):
        requests.get(run, headers=auth, verify=str(ca.bundle), cert=(str(stranger.cert), str(stranger.key)), timeout=5)
    answer = requests.get(run, headers=auth, verify=str(ca.bundle), cert=(str(leaf_cert.cert), str(leaf_cert.key)),
                          timeout=5)
    assert answer.status_code == 200 and answer.json()["data"]["run_status"] == "start"
    wait_until(lambda: "the client sent no certificate" in server.log() or None, 10, "the refusal in the log")
    monkeypatch.setenv("BRANCHKEY_TLS_CLIENT_CERT", str(leaf_cert.cert))
    monkeypatch.setenv("BRANCHKEY_TLS_CLIENT_KEY", str(leaf_cert.key))
    assert cli("run", "pause", "--data-dir", str(tmp_path / "data")).stdout.endswith("(leaves notified)\n")


def test_a_certificate_reloaded_on_sighup_mid_run_loses_no_round(tmp_path, ca, servers) -> None:
    server, credentials = start_tls(tmp_path, ca, servers)
    before = served_certificate(server.url, ca.bundle)
    clients = [connect(creds, server, ca, tmp_path) for creds in credentials]
    try:
        federate_round(clients, seed=1)
        clients[0].upload_weights(1.0, layers_for(20))  # round 1 half done when the certificate changes
        ca.server()  # a new certificate and key in the same files
        server.process.send_signal(signal.SIGHUP)
        wait_until(lambda: served_certificate(server.url, ca.bundle) != before or None, 15, "the new certificate")
        clients[1].upload_weights(2.0, layers_for(21))  # a new connection, under the new certificate
        ids = {client.wait_for_aggregation(30) for client in clients}  # the WSS opened before still deliver
        assert len(ids) == 1
        federate_round(clients, seed=3)
    finally:
        for client in clients:
            client.close()
    rounds = server.admin("GET", f"/admin/v1/branches/{clients[0].branch_id}/rounds",
                          verify=str(ca.bundle)).json()["data"]["rounds"]
    assert [(r["round_index"], r["status"], r["upload_count"]) for r in rounds[:3]] == \
        [(0, "aggregated", 2), (1, "aggregated", 2), (2, "aggregated", 2)]
    assert "TLS certificate reloaded" in server.log() and "Traceback" not in server.log()


@pytest.mark.official
def test_official_3_0_1_clients_complete_rounds_over_https_and_wss(official_python, tmp_path, ca, servers,
                                                                   monkeypatch) -> None:
    python = official_python("3.0.1")
    server, credentials = start_tls(tmp_path, ca, servers)
    # 3.0.1 hands its `ssl` option to requests as `verify` (a CA bundle path works) and opens its WebSocket with
    # ssl.create_default_context(), which reads the bundle named by SSL_CERT_FILE
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.bundle))
    per_leaf, weightings = make_rounds(leaves=2, rounds=2, seed=4)
    results = run_official_leaves(python, server, credentials, per_leaf, weightings, tmp_path,
                                  extra={"ca": str(ca.bundle)})
    assert {r["version"] for r in results} == {"3.0.1"}
    check_rounds(results, per_leaf, weightings)


def test_the_cli_refuses_to_act_in_the_store_behind_a_live_tls_server_it_cannot_verify(tmp_path, ca, servers) -> None:
    server, _ = start_tls(tmp_path, ca, servers)
    info = json.loads((tmp_path / "data" / "server.json").read_text())
    info["tls_cert"] = str(TestCA(tmp_path / "wrong", name="wrong CA").bundle)  # not what the server presents
    (tmp_path / "data" / "server.json").write_text(json.dumps(info))
    result = subprocess.run([sys.executable, "-m", "branchkey_integrations.cli", "run", "pause", "--data-dir",
                             str(tmp_path / "data")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "refused this CLI's TLS connection" in result.stderr
