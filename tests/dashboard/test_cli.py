"""``branchkey-local serve``, ``login-link`` and ``simulate --dashboard`` as a user runs them: the printed
address and one-time login link work (the link printed to a terminal only, never into a log), a
network-wide bind is warned about, and the simulation's dashboard stays open after the run until Ctrl-C."""

from __future__ import annotations

import os
import pty
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from queue import Empty, Queue

import pytest
import requests

from branchkey_integrations.cli import announce_dashboard
from branchkey_integrations.server.dashboard import announcement

from ..conftest import wait_until

LINK = re.compile(r"(http://127\.0\.0\.1:\d+)/#login=([A-Za-z0-9_-]+)")


class Lines:
    """A child's output, line by line, read in a thread."""

    def __init__(self, stream) -> None:
        self.queue: Queue = Queue()
        self.seen: list[str] = []
        threading.Thread(target=lambda: [self.queue.put(line) for line in stream], daemon=True).start()

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        while True:
            try:
                line = self.queue.get(timeout=timeout)
            except Empty:
                raise AssertionError(f"no line matching {pattern!r} within {timeout} s; saw:\n{''.join(self.seen)}") from None
            self.seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match


def login(base: str, code: str) -> str:
    answer = requests.post(base + "/admin/v1/dashboard/login", json={"code": code}, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]["token"]


def test_announcement_warns_only_off_loopback(tmp_path):
    from branchkey_integrations.server.app import create_app

    app = create_app(tmp_path / "data")
    for host in ("127.0.0.1", "::1", "localhost"):
        text, warning = announcement(app, "http://127.0.0.1:8080", host, tmp_path / "data" / "admin_token")
        assert warning is None and "#login=" in text
    for host in ("0.0.0.0", "::", "192.0.2.10", "example.org"):
        _, warning = announcement(app, "http://127.0.0.1:8080", host, tmp_path / "admin_token")
        assert warning and "reachable from the network" in warning and host in warning


def test_serve_prints_the_login_link_to_a_terminal_only(tmp_path, monkeypatch, capsys):
    """Issue 22 (9): ``serve > server.log`` (and the simulation's server.log) kept a working login link."""
    from branchkey_integrations.server.app import create_app

    app = create_app(tmp_path / "data")
    announce_dashboard(app, "http://127.0.0.1:8080", "127.0.0.1", tmp_path / "data")
    piped = capsys.readouterr().out
    assert "#login=" not in piped and f"branchkey-local login --data-dir {tmp_path / 'data'}" in piped
    controller, terminal_fd = pty.openpty()
    with os.fdopen(terminal_fd, "w") as terminal:
        monkeypatch.setattr(sys, "stdout", terminal)
        announce_dashboard(app, "http://127.0.0.1:8080", "127.0.0.1", tmp_path / "data")
    assert re.search(r"login link http://127\.0\.0\.1:8080/#login=[\w-]+", os.read(controller, 65536).decode())
    os.close(controller)


@pytest.mark.slow
def test_serve_keeps_the_login_link_out_of_its_output_and_login_link_prints_one(tmp_path):
    data = tmp_path / "data"
    process = subprocess.Popen([sys.executable, "-m", "branchkey_integrations.cli", "--log-level", "WARNING", "serve",
                                "--data-dir", str(data), "--host", "0.0.0.0", "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = Lines(process.stdout), Lines(process.stderr)
        out.wait_for(r"login link: run 'branchkey-local login --data-dir", 60)  # a pipe, not a terminal: no link
        err.wait_for(r"WARNING: --host 0\.0\.0\.0 makes this server and its dashboard reachable from the network", 10)
        assert not any("#login=" in line for line in out.seen + err.seen)
        for command in ("login", "login-link"):  # login-link: the command's earlier name
            printed = subprocess.run([sys.executable, "-m", "branchkey_integrations.cli", command, "--data-dir",
                                      str(data)], capture_output=True, text=True, timeout=60)
            assert printed.returncode == 0, printed.stderr
            base, code = LINK.search(printed.stdout).groups()
            assert login(base, code) == (data / "admin_token").read_text().strip()
        used = requests.post(base + "/admin/v1/dashboard/login", json={"code": code}, timeout=10)
        assert used.status_code == 401 and "'branchkey-local login --data-dir DIR'" in used.json()["error"]
        assert requests.get(base + "/", timeout=10).status_code == 200
    finally:
        process.terminate()
        process.wait(30)


@pytest.mark.slow
def test_simulate_dashboard_prints_its_link_and_stays_open_until_ctrl_c(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "branchkey_integrations.cli", "simulate", "--dashboard",
                                "--leaves", "2", "--rounds", "2", "--epochs-per-round", "1",
                                "--output", str(tmp_path / "out")],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = Lines(process.stdout)
        announced = out.wait_for(r"dashboard http://", 120).string
        base, code = LINK.search(announced).groups()
        token = login(base, code)
        # locked out (the link used in another tab): the line names the command for a new link and the token's file
        data = Path(re.search(r"'branchkey-local login --data-dir (\S+)'", announced).group(1))
        assert f"the admin token is in {data / 'admin_token'}" in announced
        out.wait_for(r"the dashboard stays open", 300)
        assert any("after 2 rounds: federated" in line for line in out.seen)  # the report came first
        headers = {"Authorization": f"Bearer {token}"}
        [branch] = requests.get(base + "/admin/v1/overview", headers=headers, timeout=10).json()["data"]["branches"]
        history = requests.get(f"{base}/admin/v1/branches/{branch['id']}/history", headers=headers, timeout=10)
        assert len(history.json()["data"]["rounds"]) == 2  # the run is over, its server still answers
        summary = requests.get(f"{base}/admin/v1/branches/{branch['id']}/metrics/summary", headers=headers, timeout=10)
        series = {(s["mode"], s["metric"]): s for s in summary.json()["data"]["series"]}
        heldout, common = series[("test", "heldout_accuracy")], series[("test", "common_test_accuracy")]
        assert heldout["rounds"] == [0, 1] and len(heldout["per_leaf"]) == 2  # each leaf, on its held-out data
        assert common["rounds"] == [0, 1] and len(common["per_leaf"]) == 1  # the evaluator, on the common test set
        final = next(m.group(1) for line in out.seen if (m := re.search(r"federated (\d+\.\d%)", line)))
        assert f"{common['mean'][-1]:.1%}" == final  # the dashboard plots the terminal's number
        assert [branch["run_status"], branch["state"]] == ["stop", "run 1 stopped after 2 aggregated rounds"]
        printed = subprocess.run([sys.executable, "-m", "branchkey_integrations.cli", "login", "--data-dir", str(data)],
                                 capture_output=True, text=True, timeout=60)
        assert login(*LINK.search(printed.stdout).groups()) == token  # a fresh link, though the first was used
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0
        wait_until(lambda: _refused(base), 30, "the embedded server to stop")
    finally:
        if process.poll() is None:
            process.kill()


def _refused(base: str) -> bool:
    try:
        requests.get(base + "/", timeout=2)
    except requests.ConnectionError:
        return True
    return False
