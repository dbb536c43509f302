"""1,100 idle connections cannot starve a server under a 1,024 open-files limit (issue 11).

``branchkey-local serve`` runs as a subprocess whose open-files limit is 1,024 (soft and hard, set before
it starts), with a 2 s header timeout. The test opens 1,100 TCP connections that never send a byte. While
they are open, a leaf still uploads and the admin API answers within 2 s; every idle socket is closed by
the server (the header timeout, or evicted to make room); and the server's log grows by a few lines, not
one per refused accept.
"""

from __future__ import annotations

import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from branchkey_integrations import Client

from ..conftest import init_branch, wait_until

pytestmark = pytest.mark.slow

IDLE = 1100
FD_LIMIT = 1024


def start_limited_server(data_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    def limit_open_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))

    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "branchkey_integrations.cli", "serve", "--data-dir", str(data_dir), "--port", "0",
             "--header-timeout", "2"],
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit_open_files)
    info = data_dir / "server.json"

    def ready() -> str | None:
        assert process.poll() is None, log_path.read_text()
        return json.loads(info.read_text())["url"] if info.exists() else None

    return process, wait_until(ready, 30, "the server to listen")


def test_idle_connections_do_not_starve_the_server(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < IDLE + 200:  # this test process holds the idle sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    data_dir = tmp_path / "data"
    [credentials] = init_branch(data_dir, 1)
    log_path = tmp_path / "server.log"
    process, url = start_limited_server(data_dir, log_path)
    token = (data_dir / "admin_token").read_text().strip()
    host, port = url.rsplit("/", 1)[1].split(":")
    idle: list[socket.socket] = []
    try:
        log_size = log_path.stat().st_size
        for _ in range(IDLE):
            idle.append(socket.create_connection((host, int(port)), timeout=10))  # and never send a byte
        opened = time.monotonic()

        started = time.monotonic()
        answer = requests.get(url + "/admin/v1/branches", headers={"Authorization": f"Bearer {token}"}, timeout=5)
        admin_s = time.monotonic() - started
        assert answer.status_code == 200 and admin_s < 2, (answer.status_code, admin_s)

        with Client(str(credentials), host=url, transport="none") as client:
            client.upload_weights(1.0, [np.ones(1000, dtype=np.float32)])
            rounds_url = url + f"/admin/v1/branches/{client.branch_id}/rounds"

        def aggregated() -> bool:  # the single leaf's round completes
            rounds = requests.get(rounds_url, headers={"Authorization": f"Bearer {token}"}, timeout=5).json()["data"]
            return rounds["rounds"][0]["status"] == "aggregated"

        wait_until(aggregated, 10, "the round to aggregate")

        selector = selectors.DefaultSelector()
        for sock in idle:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        still_open = set(idle)
        deadline = opened + 15
        while still_open and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.5):
                try:
                    data = key.fileobj.recv(1)
                except ConnectionResetError:
                    data = b""
                assert data == b"", "an idle connection was sent data instead of being closed"
                selector.unregister(key.fileobj)
                still_open.discard(key.fileobj)
        assert not still_open, f"{len(still_open)} idle connections still open 15 s after they were opened"
        grown = log_path.stat().st_size - log_size
        assert grown < 4096, f"the server log grew by {grown} bytes:\n{log_path.read_text()[-3000:]}"
        assert process.poll() is None
    finally:
        for sock in idle:
            sock.close()
        process.terminate()
        process.wait(15)
