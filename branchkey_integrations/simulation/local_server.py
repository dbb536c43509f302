"""An embedded ``branchkey-local serve`` in a child process, and the few admin calls the simulation needs.

A child process rather than a thread: aggregation then runs on its own interpreter (no GIL shared
with the parent's polling), and the server is exactly what ``branchkey-local serve`` runs for users.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import requests

from ..core.errors import BranchKeyError, EmbeddedServerError
from ..core.protocol import ADMIN_PREFIX

logger = logging.getLogger(__name__)

_POLL_S = 0.05


@dataclass
class EmbeddedServer:
    """``branchkey-local serve`` on a free port of ``host`` (loopback unless leaves on other machines must
    reach it) over ``data_dir``; use as a context manager."""

    data_dir: Path
    amqp_url: str | None = None
    start_timeout_s: float = 60.0
    log_level: str = "WARNING"
    serve_args: tuple[str, ...] = ()  # more ``serve`` options, e.g. ("--max-compression-ratio", "2000")
    host: str = "127.0.0.1"
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    url: str = field(default="", init=False)

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / "server.log"

    def start(self) -> "EmbeddedServer":
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        command = [sys.executable, "-m", "branchkey_integrations.cli", "--log-level", self.log_level, "serve",
                   "--data-dir", str(self.data_dir), "--host", self.host, "--port", "0"]
        if self.amqp_url:
            command += ["--amqp-url", self.amqp_url]
        command += self.serve_args
        with open(self.log_path, "ab") as log:
            # a session of its own: Ctrl-C in the terminal reaches the parent only, which stops us in order
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = self._wait_until_listening()
        logger.info("Embedded branchkey-local at %s (data in %s)", self.url, self.data_dir)
        return self

    def _wait_until_listening(self) -> str:
        info, deadline = self.data_dir / "server.json", time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            if info.exists():
                url = json.loads(info.read_text(encoding="utf-8"))["url"]
                try:
                    requests.get(url + "/api/v1/run/none", timeout=2)
                    return url
                except requests.ConnectionError:
                    pass
            time.sleep(_POLL_S)
        raise EmbeddedServerError(f"branchkey-local did not listen within {self.start_timeout_s:.0f} s; see {self.log_path}")

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise EmbeddedServerError(f"branchkey-local exited with status {self.process.returncode}:\n{self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        token = (self.data_dir / "admin_token").read_text(encoding="utf-8").strip()
        try:
            answer = requests.request(method, self.url + path, json=body, timeout=30,
                                      headers={"Authorization": f"Bearer {token}", "accept": "application/json"})
        except requests.RequestException as exc:
            self.check_alive()
            raise EmbeddedServerError(f"{method} {path}: branchkey-local did not answer: {exc}") from exc
        if answer.status_code >= 300:
            raise EmbeddedServerError(f"{method} {path} failed with HTTP {answer.status_code}: {answer.text[:500]}")
        return answer.json()["data"]

    def create_branch(self, leaves: int, strategy: str = "fedavg", strategy_params: Mapping[str, float] | None = None,
                      min_leaves: int | None = None) -> tuple[dict[str, Any], list[dict[str, str]]]:
        """A tree with one branch whose rounds need ``min_leaves`` uploads (None: every leaf), aggregating with
        ``strategy`` (its parameters checked by the server); returns (the branch as the server has it, leaf
        credentials)."""
        tree = self.admin("POST", f"{ADMIN_PREFIX}/trees", {"name": "simulation"})
        branch = self.admin("POST", f"{ADMIN_PREFIX}/trees/{tree['id']}/branches", {
            "name": "simulation", "strategy": strategy, "strategy_params": dict(strategy_params or {}),
            "min_leaves": min_leaves})
        created = self.admin("POST", f"{ADMIN_PREFIX}/branches/{branch['id']}/leaves", {"count": leaves})
        return branch, created["leaves"]

    def dashboard_link(self) -> str:
        """A one-time login link to the server's dashboard (the admin token stays out of the address)."""
        return self.admin("POST", f"{ADMIN_PREFIX}/dashboard/links")["url"]

    def forget_broker_leaves(self, credentials: list[dict[str, str]]) -> None:
        """Have the server delete the broker users, queues and vhost it made for this run's leaves:
        a simulation is throwaway, and their passwords should not outlive it."""
        if not self.amqp_url:
            return
        for tree_id in sorted({leaf["tree_id"] for leaf in credentials}):
            try:
                self.admin("DELETE", f"{ADMIN_PREFIX}/trees/{tree_id}/broker")
            except BranchKeyError as exc:  # cleanup must not hide the run's result
                logger.warning("Could not remove the simulation's leaves from the broker: %s", exc)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (the server finishes what it holds and removes server.json), SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("branchkey-local ignored SIGTERM for %.0f s; killing it", timeout_s)
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "EmbeddedServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
