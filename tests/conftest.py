"""Fixtures shared by the integration tests: a real branchkey-local (a subprocess, or in-process where
no process needs killing), a real RabbitMQ, and the official clients in virtual environments of their own.

Also owns the ``slow`` marker's rule (one place, so test modules need no marker lines): the fast lane
``pytest -m "not slow"`` keeps the unit and in-process tests; the plain ``pytest`` of CI runs everything.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest
import requests

# written once, for the benchmarks and the tests: the official client's venv, the CLI's init, polling
from benchmarks.harness import AMQP_URL, build_official_python, init_branch, wait_until  # noqa: F401 - re-exported

REPO = Path(__file__).resolve().parent.parent
MANAGEMENT_URL = os.environ.get("BRANCHKEY_TEST_AMQP_MANAGEMENT_URL", "http://127.0.0.1:15672")
IN_CI = os.environ.get("CI", "").lower() == "true"

#: a leaf's six credentials, well formed, for tests that never reach a server with them (written once here)
CREDS = {"id": "5b2a1f0e-7c3d-4e5f-8a9b-0c1d2e3f4a5b", "name": "leaf-a", "session_token": "t" * 32,
         "owner_id": "6c3b2a1f-8d4e-4f60-9bac-1d2e3f4a5b6c", "tree_id": "7d4c3b2a-9e5f-4071-acbd-2e3f4a5b6c7d",
         "branch_id": "8e5d4c3b-af60-4182-bdce-3f4a5b6c7d8e"}
#: short ones, for tests against a scripted server that checks the headers and the leaf name they make
SHORT_CREDS = {"id": "leaf-1", "name": "site-a", "session_token": "tok", "owner_id": "o", "tree_id": "t", "branch_id": "b"}

# What makes a test slow, measured on a 2-core machine: each of these costs seconds to minutes.
SLOW_DIRECTORIES = {
    "lightning": "trains Lightning models, some in ddp_spawn subprocesses",
    "keras": "trains Keras models on three backends, some in leaf subprocesses",
    "notebooks": "executes the tutorials end to end",
}
SLOW_MODULES = {"simulate/test_run.py": "runs whole simulations: a server and N training leaf processes"}
SLOW_MARKERS = {"official": "builds and runs the official clients in virtual environments of their own"}
# Broker tests (marker ``amqp``) that run in-process take milliseconds and stay in the fast lane; the
# ones that start subprocess servers are caught here.
SLOW_FIXTURES = {"server_factory": "starts branchkey-local init + serve subprocesses"}


def slow_reason(item: pytest.Item) -> str | None:
    """Why ``item`` belongs to the slow lane, or None. Test modules may also mark single tests."""
    path = Path(str(item.path)).resolve()
    if path.is_relative_to(REPO / "tests"):
        relative = path.relative_to(REPO / "tests").as_posix()
        if relative.split("/", 1)[0] in SLOW_DIRECTORIES:
            return SLOW_DIRECTORIES[relative.split("/", 1)[0]]
        if relative in SLOW_MODULES:
            return SLOW_MODULES[relative]
    for name, reason in SLOW_MARKERS.items():
        if item.get_closest_marker(name):
            return reason
    for name, reason in SLOW_FIXTURES.items():
        if name in getattr(item, "fixturenames", ()):
            return reason
    return None


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Under the fast lane's exact ``-m "not slow"``, skip importing the framework test directories
    (torch, lightning, tensorflow: ~6 s in every xdist worker) whose tests would all be deselected.
    Any other mark expression collects everything and lets the per-test marks decide."""
    if config.getoption("markexpr", "").strip() != "not slow":
        return None
    if collection_path.is_dir() and collection_path.parent.resolve() == REPO / "tests":
        return True if collection_path.name in SLOW_DIRECTORIES else None
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if not item.get_closest_marker("slow") and slow_reason(item):
            item.add_marker(pytest.mark.slow)


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``branchkey-local`` as a user would."""
    result = subprocess.run([sys.executable, "-m", "branchkey_integrations.cli", *args],
                            capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"branchkey-local {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


class AdminCalls:
    """The admin calls a test server offers over its ``url`` and ``admin_token``: one definition for the
    subprocess ``LocalServer`` and the in-process ``InProcessServer`` (tests/inprocess.py), so a test written
    against one runs against the other unchanged."""

    url: str
    admin_token: str

    def admin(self, method: str, path: str, **kwargs) -> requests.Response:
        return requests.request(method, self.url + path, headers={"Authorization": f"Bearer {self.admin_token}"},
                                timeout=30, **kwargs)

    def set_run(self, branch_id: str, status: str) -> None:
        """Start, pause or stop a branch's run through the admin API (leaves are notified)."""
        response = self.admin("POST", f"/admin/v1/branches/{branch_id}/run", json={"run_status": status})
        assert response.status_code == 200, response.text


@dataclass
class LocalServer(AdminCalls):
    """A ``branchkey-local serve`` subprocess on a free port; can be killed and restarted."""

    data_dir: Path
    amqp_url: str | None = None
    serve_args: tuple[str, ...] = ()  # more ``serve`` options, e.g. ("--max-compression-ratio", "2000")
    probe: dict = field(default_factory=dict)  # requests options of the readiness probe (a TLS client certificate)
    process: subprocess.Popen | None = None
    url: str = ""
    port: int = 0  # 0 on the first start; a restart reuses the port so clients can reconnect
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-server.log"

    def start(self, timeout: float = 30) -> "LocalServer":
        info = self.data_dir / "server.json"
        info.unlink(missing_ok=True)
        args = [sys.executable, "-m", "branchkey_integrations.cli", "serve",
                "--data-dir", str(self.data_dir), "--host", "127.0.0.1", "--port", str(self.port)]
        if self.amqp_url:
            args += ["--amqp-url", self.amqp_url, "--amqp-management-url", MANAGEMENT_URL]
        args += self.serve_args
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()

        def ready():
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()}")
            if not info.exists():
                return None
            url = json.loads(info.read_text())["url"]
            try:
                requests.get(url + "/api/v1/run/none", timeout=2, **self.probe)
            except requests.ConnectionError:
                return None
            return url

        self.url = wait_until(ready, timeout, "branchkey-local to listen")
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def kill(self) -> None:
        """kill -9: no chance to flush or clean up."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "admin_token").read_text().strip()


@pytest.fixture
def server_factory(tmp_path) -> Iterator:
    """Make branchkey-local servers; every one is stopped at the end of the test."""
    servers: list[LocalServer] = []

    def make(leaves: int = 2, *init_args: str, amqp: bool = False, name: str = "data"):
        data_dir = tmp_path / name
        credentials = init_branch(data_dir, leaves, *init_args)
        server = LocalServer(data_dir, amqp_url=AMQP_URL if amqp else None).start()
        servers.append(server)
        return server, credentials

    yield make
    for server in servers:
        server.stop()
        if server.amqp_url:
            forget_broker_state(tmp_path.glob("*-credentials/*.json"))


@pytest.fixture
def inprocess_server(tmp_path) -> Iterator:
    """Make in-process branchkey-local servers (``InProcessServer``: the real app, real HTTP and
    WebSocket, no subprocess): ``make(leaves)`` returns ``(server, [credentials dict, ...])`` like
    ``server_factory``; every server is stopped at the end of the test."""
    from .inprocess import InProcessServer

    servers: list[InProcessServer] = []

    def make(leaves: int = 2, name: str = "data"):
        server = InProcessServer(tmp_path / name)
        servers.append(server)
        return server, server.create_branch(leaves)

    yield make
    for server in servers:
        server.stop()


def forget_broker_state(credential_files) -> None:
    """Delete the vhosts and users branchkey-local provisioned, so the shared broker stays clean."""
    from urllib.parse import quote

    for path in credential_files:
        creds = json.loads(Path(path).read_text())
        for resource in (f"vhosts/{quote(creds['tree_id'], safe='')}", f"users/{quote(creds['id'], safe='')}"):
            requests.delete(f"{MANAGEMENT_URL}/api/{resource}", auth=("guest", "guest"), timeout=10)


def _broker_problem() -> str | None:
    try:
        response = requests.get(MANAGEMENT_URL + "/api/overview", auth=("guest", "guest"), timeout=3)
    except requests.RequestException as exc:
        return f"RabbitMQ management API not reachable at {MANAGEMENT_URL}: {exc}"
    if response.status_code != 200:
        return f"RabbitMQ management API at {MANAGEMENT_URL} answered {response.status_code}"
    return None


@pytest.fixture(scope="session")
def rabbitmq() -> str:
    """A real RabbitMQ with the management plugin: a failure in CI, a skip elsewhere."""
    problem = _broker_problem()
    if problem:
        if IN_CI:
            pytest.fail(f"{problem}; CI needs a broker (.ci/setup starts one).")
        pytest.skip(f"{problem}; run .ci/setup to start one")
    return AMQP_URL


@pytest.fixture(scope="session")
def official_python() -> "callable":
    """``build_official_python``: ``official_python(version)`` is the official client's Python."""
    return build_official_python


def partner_upload(credentials, server: LocalServer, arrays, weighting: float) -> None:
    """A leaf that only uploads (the round needs it), through the plain Client."""
    from branchkey_integrations import Client

    with Client(credentials, host=server.url, transport="none") as client:
        client.upload_weights(weighting, arrays)


@pytest.fixture
def uploads(monkeypatch):
    """Every upload of arrays in this process (``upload_weights`` and Federation's rounds), as (weighting, [arrays])."""
    import numpy as np

    from branchkey_integrations import Client

    seen: list = []
    original = Client.upload_arrays  # the one path both upload_weights and Federation take

    def spy(self, weighting, parameters, **kwargs):
        seen.append((weighting, [np.array(p, copy=True) for p in parameters]))
        return original(self, weighting, parameters, **kwargs)

    monkeypatch.setattr(Client, "upload_arrays", spy)
    return seen


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
