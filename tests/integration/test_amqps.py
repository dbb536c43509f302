"""The RabbitMQ path over TLS: ``serve --tls-cert ... --amqp-url amqps://... --amqp-ca ca.pem`` against a node of
the test's own that speaks TLS only (no plain AMQP listener; the management API over https), with verification
on everywhere (never verify=False).

- The server provisions leaves over https and publishes over amqps, verifying the broker against the CA.
- Official 2.7.1 leaves complete whole rounds: their REST calls over https (``ssl=<CA bundle>``); their AMQP
  through a verifying TLS tunnel on the leaf's side (:mod:`tests.tls_tunnel`), since 2.7.1 opens plain AMQP
  only (``pika.ConnectionParameters`` without ``ssl_options``), as a 2.7.1 leaf must be deployed against a
  TLS-only broker.
- Our ``Client`` completes rounds over https and amqps itself (``rbmq_host="amqps://host:port"``).
- A CA that did not sign the broker's certificate is refused, by the server and by our client.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from branchkey_integrations import Client
from branchkey_integrations.core.errors import BrokerError
from branchkey_integrations.core.notifications import AmqpTransport, client_tls_context
from branchkey_integrations.server.rabbitmq import RabbitMQBroker

from ..conftest import init_branch, wait_until
from ..tls_certs import TestCA
from ..tls_tunnel import TlsTunnel
from .test_broker_outage import BrokerNode
from .test_client import assert_aggregate
from .test_official_clients import check_rounds, make_rounds, run_official_leaves, weighted_mean

pytestmark = [pytest.mark.slow, pytest.mark.official, pytest.mark.amqp]


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "pki")


@pytest.fixture
def tls_node(tmp_path: Path, ca: TestCA) -> Iterator[BrokerNode]:
    node = BrokerNode(tmp_path / "rabbitmq", tls=(ca.bundle, ca.server("broker")))
    yield node
    node.close()


class Served:
    """``branchkey-local serve`` over TLS, publishing to the TLS node; ``stop`` ends it."""

    def __init__(self, data_dir: Path, ca: TestCA, node: BrokerNode) -> None:
        pair = ca.server()
        self.log_path = data_dir.parent / "server.log"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "branchkey_integrations.cli", "serve", "--data-dir", str(data_dir), "--port",
                 "0", "--tls-cert", str(pair.cert), "--tls-key", str(pair.key), "--amqp-url", node.amqp_url,
                 "--amqp-management-url", node.management_url, "--amqp-ca", str(ca.bundle)],
                stdout=log, stderr=subprocess.STDOUT)
        info = data_dir / "server.json"

        def listening() -> str | None:
            assert self.process.poll() is None, self.log()
            return json.loads(info.read_text())["url"] if info.exists() else None

        self.url: str = wait_until(listening, 60, "the server to listen")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def test_rounds_over_https_and_amqps_with_official_2_7_1_leaves_and_our_client(
        tls_node: BrokerNode, official_python, ca: TestCA, tmp_path: Path, caplog) -> None:
    python = official_python("2.7.1")
    credentials = init_branch(tmp_path / "data", 2)  # while the node starts
    tls_node.wait_running()
    other = TestCA(tmp_path / "other", name="other CA")
    with pytest.raises(BrokerError, match="Cannot reach the RabbitMQ management API"):  # its https is not trusted
        RabbitMQBroker(tls_node.amqp_url, tls_node.management_url, ca_file=str(other.bundle)).check()
    served = Served(tmp_path / "data", ca, tls_node)
    tunnel = TlsTunnel("127.0.0.1", tls_node.amqp_port, ca.bundle)
    try:
        assert served.url.startswith("https://") and "RabbitMQ reachable at amqps://guest:***@" in served.log()
        per_leaf, weightings = make_rounds(leaves=2, rounds=2, seed=5)
        results = run_official_leaves(python, served, credentials, per_leaf, weightings, tmp_path,
                                      extra={"ca": str(ca.bundle), "rbmq_port": tunnel.port})
        assert {r["version"] for r in results} == {"2.7.1"} and tunnel.connections == 2
        check_rounds(results, per_leaf, weightings)

        clients = [Client(creds, host=served.url, ssl=str(ca.bundle), transport="amqp", run_check_interval_s=0.5,
                          rbmq_host=f"amqps://127.0.0.1:{tls_node.amqp_port}", output_dir=tmp_path / f"out{i}")
                   for i, creds in enumerate(credentials)]
        try:
            for client in clients:
                assert client.notifications.wait_connected(30), f"no amqps connection:\n{served.log()}"
            ours, our_weightings = make_rounds(leaves=2, rounds=2, seed=6)  # the model the official leaves sent
            for index in range(2):
                for client, layers, weighting in zip(clients, ours, our_weightings):
                    client.upload_weights(weighting[index], layers[index])
                [aggregation_id] = {client.wait_for_aggregation(30) for client in clients}  # told over amqps
                expected = weighted_mean([layers[index] for layers in ours], [w[index] for w in our_weightings])
                for client in clients:
                    assert_aggregate(expected, client.download_aggregate(aggregation_id))
        finally:
            for client in clients:
                client.close()
        leaf = json.loads(credentials[0].read_text())
        untrusting = AmqpTransport("127.0.0.1", tls_node.amqp_port, leaf["id"], leaf["session_token"],
                                   leaf["tree_id"], tls=client_tls_context(str(other.bundle), None))
        caplog.set_level(logging.WARNING, logger="branchkey_integrations.core.notifications")
        untrusting.start(lambda notification: None)
        try:  # refused at the handshake, and said so once, with the option to check
            refusal = wait_until(lambda: [r.getMessage() for r in caplog.records if "AMQP over TLS" in r.getMessage()],
                                 30, "the refusal in the log")
        finally:
            untrusting.close()
        assert "CERTIFICATE_VERIFY_FAILED" in refusal[0] and "check the CA bundle in ssl=" in refusal[0]
        assert not untrusting.connected.is_set()
        assert "Traceback" not in served.log()
    finally:
        tunnel.close()
        served.stop()
