"""A round that completes while RabbitMQ is down still reaches its leaves (issue 11: the AMQP outbox).
(:class:`BrokerNode` also starts a TLS-only node, for tests/integration/test_amqps.py.)

The test runs a RabbitMQ node of its own (own node name, ports, data and log directories, the
management plugin on its own port), never the shared broker, so it may stop it. ``branchkey-local serve``
(a subprocess) publishes to that node. With the broker's application stopped (``rabbitmqctl stop_app``),
the last upload completes the round: the server keeps the notification in its outbox. After
``start_app`` the outbox's retry publishes it to the leaf's durable queue, and an official 2.7.1 client
waiting on that queue receives the aggregation id, downloads the aggregate (compared with NumPy) and
sends its metrics.

The 2.7.1 leaf's upload goes in before the outage (through this package's ``Client`` with the leaf's
credentials: the same multipart upload); the 2.7.1 client then starts after the broker is back, as a
2.7.1 leaf whose consumer died with the broker must be restarted (its consumer never reconnects).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import requests

from branchkey_integrations import Client

from ..conftest import IN_CI, init_branch, wait_until
from ..tls_certs import Pair

pytestmark = [pytest.mark.slow, pytest.mark.official, pytest.mark.amqp]

LEAF_SCRIPT = Path(__file__).resolve().parent.parent / "official_leaf.py"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rabbitmq_bin(name: str) -> str | None:
    """The real RabbitMQ script: Debian's /usr/sbin wrappers switch to the rabbitmq user (who cannot read the
    test's directories) or refuse other users; the scripts behind them run as whoever calls them."""
    direct = Path("/usr/lib/rabbitmq/bin") / name
    return str(direct) if direct.exists() else shutil.which(name)


def tls_config(amqp: int, management: int, ca: Path, pair: Pair) -> str:
    """rabbitmq.conf for a node that speaks TLS only (1.2 and 1.3): AMQP on ``amqp``, the management API (https)
    on ``management``, both with ``pair``; a client certificate signed by ``ca`` is checked when one is sent."""
    files = f"cacertfile = {ca}\n{{0}}certfile = {pair.cert}\n{{0}}keyfile = {pair.key}\n"
    return (f"listeners.tcp = none\nlisteners.ssl.local = 127.0.0.1:{amqp}\n"
            "ssl_options." + files.format("ssl_options.") +
            "ssl_options.verify = verify_peer\nssl_options.fail_if_no_peer_cert = false\n"
            "ssl_options.versions.1 = tlsv1.3\nssl_options.versions.2 = tlsv1.2\n"
            f"management.ssl.ip = 127.0.0.1\nmanagement.ssl.port = {management}\n"
            "management.ssl." + files.format("management.ssl."))


class BrokerNode:
    """One RabbitMQ node of the test's own, starting: ``wait_running``, then ``amqp_url``, ``management_url``,
    ``stop_app``/``start_app``."""

    def __init__(self, base: Path, tls: tuple[Path, Pair] | None = None) -> None:
        server, self.ctl = rabbitmq_bin("rabbitmq-server"), rabbitmq_bin("rabbitmqctl")
        if server is None or self.ctl is None:
            message = "rabbitmq-server is not installed; the broker outage test starts a node of its own"
            if IN_CI:
                pytest.fail(message)
            pytest.skip(message)
        base.mkdir()
        base.chmod(0o755)
        amqp, management, dist = free_port(), free_port(), free_port()
        self.node = f"bk-{uuid.uuid4().hex[:8]}@localhost"
        config = f"listeners.tcp.local = 127.0.0.1:{amqp}\nmanagement.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {management}\n"
        self.verify: bool | str = True
        if tls is not None:  # TLS only: no plain listener, AMQP over TLS and the management API over https
            config = tls_config(amqp, management, *tls)
            self.verify = str(tls[0])
        (base / "rabbitmq.conf").write_text(config)
        (base / "enabled_plugins").write_text("[rabbitmq_management].\n")
        (base / "env.conf").write_text("")  # not the system's rabbitmq-env.conf, which names the shared node
        self.env = {**os.environ, "HOME": str(base), "RABBITMQ_NODENAME": self.node,
                    "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
                    "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
                    "RABBITMQ_CONF_ENV_FILE": str(base / "env.conf"), "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
                    "RABBITMQ_LOG_BASE": str(base / "log"), "RABBITMQ_DIST_PORT": str(dist)}
        self.amqp_port = amqp
        scheme = "amqps" if tls else "amqp"
        self.amqp_url = f"{scheme}://guest:guest@127.0.0.1:{amqp}/"
        self.management_url = f"{'https' if tls else 'http'}://127.0.0.1:{management}"
        self.log = open(base / "node.out", "wb")
        self.process = subprocess.Popen([server], env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        # the caller waits (wait_running) once it has done what needs no broker: the node takes seconds

    def running(self) -> bool:
        assert self.process.poll() is None, "the test's RabbitMQ node exited"
        try:
            return requests.get(self.management_url + "/api/overview", auth=("guest", "guest"), timeout=2,
                                verify=self.verify).ok
        except requests.RequestException:
            return False

    def wait_running(self) -> None:
        wait_until(self.running, 90, f"RabbitMQ node {self.node} to start")

    def ctl_call(self, *args: str) -> None:
        subprocess.run([self.ctl, "-n", self.node, *args], env=self.env, check=True, capture_output=True, timeout=60)

    def stop_app(self) -> None:
        self.ctl_call("stop_app")

    def start_app(self) -> None:
        self.ctl_call("start_app")
        self.wait_running()

    def close(self) -> None:
        try:
            self.ctl_call("stop")
            self.process.wait(30)
        except (subprocess.SubprocessError, OSError):
            self.process.kill()
            self.process.wait(10)
        self.log.close()


@pytest.fixture
def broker_node(tmp_path: Path) -> Iterator[BrokerNode]:
    node = BrokerNode(tmp_path / "rabbitmq")
    yield node
    node.close()


def test_a_round_completed_while_rabbitmq_is_down_reaches_an_official_2_7_1_leaf(
        broker_node: BrokerNode, official_python, tmp_path: Path) -> None:
    python = official_python("2.7.1")
    data_dir = tmp_path / "data"
    cred_a, cred_b = init_branch(data_dir, 2)  # while the node starts
    broker_node.wait_running()
    log_path = tmp_path / "server.log"
    with open(log_path, "ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "branchkey_integrations.cli", "serve", "--data-dir", str(data_dir), "--port", "0",
             "--amqp-url", broker_node.amqp_url, "--amqp-management-url", broker_node.management_url],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        info = data_dir / "server.json"

        def listening() -> str | None:
            assert server.poll() is None, log_path.read_text()
            return json.loads(info.read_text())["url"] if info.exists() else None

        url = wait_until(listening, 30, "the server to listen")
        upload_a, upload_b = np.arange(12, dtype=np.float32), np.full(12, 3.0, dtype=np.float32)
        with Client(str(cred_a), host=url, transport="none") as client:
            client.upload_weights(10.0, [upload_a])

        broker_node.stop_app()
        with Client(str(cred_b), host=url, transport="none") as client:
            client.upload_weights(30.0, [upload_b])  # completes the round while RabbitMQ is down
        wait_until(lambda: "AMQP publish of aggregation_status" in log_path.read_text(), 20,
                   "the server to find the broker down and keep the notification")
        assert "failed (attempt 1; kept" in log_path.read_text()

        broker_node.start_app()
        workdir = tmp_path / "leaf-a"
        workdir.mkdir()
        spec = {"credentials": str(cred_a), "host": url, "output_dir": str(workdir), "rbmq_port": broker_node.amqp_port,
                "upload": False, "rounds": [[]], "weightings": [10.0], "timeout": 30,
                "result": str(workdir / "result.json")}
        (workdir / "spec.json").write_text(json.dumps(spec))
        leaf = subprocess.run([str(python), str(LEAF_SCRIPT), str(workdir / "spec.json")], cwd=workdir,
                              capture_output=True, text=True, timeout=90)
        assert leaf.returncode == 0, f"{leaf.stdout}\n{leaf.stderr}\n--- server log ---\n{log_path.read_text()}"
        [got] = json.loads((workdir / "result.json").read_text())["rounds"]
        expected = ((upload_a.astype(np.float64) * 10 + upload_b.astype(np.float64) * 30) / 40).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(got["aggregate"][0], np.float32), expected)
        assert got["metrics_ok"] is True
        assert "confirmed after" in log_path.read_text()  # the outbox's retry, not a lucky first try
    finally:
        server.terminate()
        server.wait(15)
