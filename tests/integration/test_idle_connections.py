"""Idle and stalled connections cannot starve a server (issues 11 and 22).

``branchkey-local serve`` runs as a subprocess. Issue 11: under an open-files limit of 1,024 (soft and
hard, set before it starts) with a 2 s header timeout, 1,100 TCP connections that never send a byte.
Issue 22: 1,000 connections that send the complete headers of a POST (the dashboard login's, the one
route that reads a body before any credentials) and never its body. While they are open, a leaf, the
admin and a WebSocket reconnect are served within 2 s each; every such socket is closed by the server
(the header timeout, or evicted to make room); and the server's log grows by a few lines, not one (or a
traceback) per connection.
"""

from __future__ import annotations

import asyncio
import io
import json
import resource
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import requests

from branchkey_integrations import Client

from ..conftest import init_branch, wait_until

pytestmark = pytest.mark.slow

IDLE = 1100
FD_LIMIT = 1024


def start_limited_server(data_dir: Path, log_path: Path, header_timeout_s: float = 2,
                         fd_limit: int | None = FD_LIMIT) -> tuple[subprocess.Popen, str]:
    def limit_open_files() -> None:
        if fd_limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))

    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "branchkey_integrations.cli", "serve", "--data-dir", str(data_dir), "--port", "0",
             "--header-timeout", str(header_timeout_s)],
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit_open_files)
    info = data_dir / "server.json"

    def ready() -> str | None:
        assert process.poll() is None, log_path.read_text()
        return json.loads(info.read_text())["url"] if info.exists() else None

    return process, wait_until(ready, 30, "the server to listen")


def hold_open_files(count: int) -> None:
    """Let this test process hold ``count`` sockets besides its own files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))


def wait_closed_by_server(sockets: list[socket.socket], deadline: float) -> set[socket.socket]:
    """Wait until ``deadline`` for the server to close every socket (each must read only an end of file);
    returns those still open (a deadline already past: those open now)."""
    selector = selectors.DefaultSelector()
    for sock in sockets:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    still_open = set(sockets)
    while still_open:  # one look at least, even past the deadline
        left = deadline - time.monotonic()
        for key, _ in selector.select(timeout=min(max(left, 0), 0.5)):
            try:
                data = key.fileobj.recv(1)
            except ConnectionResetError:
                data = b""
            assert data == b"", f"a socket was sent {data!r} instead of being closed"
            selector.unregister(key.fileobj)
            still_open.discard(key.fileobj)
        if left <= 0:
            break
    selector.close()
    return still_open


def test_idle_connections_do_not_starve_the_server(tmp_path: Path) -> None:
    hold_open_files(IDLE)  # this test process holds the idle sockets
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

        still_open = wait_closed_by_server(idle, opened + 15)
        assert not still_open, f"{len(still_open)} idle connections still open 15 s after they were opened"
        grown = log_path.stat().st_size - log_size
        assert grown < 4096, f"the server log grew by {grown} bytes:\n{log_path.read_text()[-3000:]}"
        assert process.poll() is None
    finally:
        stop(process, idle)


def stop(process: subprocess.Popen, sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()
    process.terminate()
    process.wait(15)


STALLED = 1000
STALLED_HEADERS = (b"POST /admin/v1/dashboard/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: 100\r\n\r\n")  # and never the body


def timed(what: str, call) -> Any:
    """``call()``'s result, after checking that it took under 2 s."""
    started = time.monotonic()
    result = call()
    elapsed = time.monotonic() - started
    assert elapsed < 2, f"{what} took {elapsed:.2f} s while the stalled bodies were held"
    return result


def npz_bytes() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, weighting=np.array([1.0]), layer_0=np.ones(1000, dtype=np.float32))
    return buffer.getvalue()


async def websocket_connects(url: str, leaf: dict[str, str], times: int) -> int:
    """Connect the leaf's WebSocket ``times`` times, each with a new ticket (a reconnect); how many opened."""
    headers = {"Authorization": f"Bearer {leaf['id']}:{leaf['session_token']}"}
    opened = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for _ in range(times):
            async with session.post(url + "/api/v1/ws/ticket", headers=headers) as answer:
                assert answer.status == 200, await answer.text()
                ticket = (await answer.json())["data"]
            socket_url = f"{url.replace('http', 'ws', 1)}/api/v1/ws?ticket={ticket['ticket_id']}&request_id={ticket['request_id']}"
            async with session.ws_connect(socket_url) as ws:
                opened += not ws.closed
    return opened


def test_a_thousand_stalled_bodies_shut_out_no_identified_client(tmp_path: Path) -> None:
    """Issue 22, defect 2: the stalled bodies' connections hold no slot that an identified client needs."""
    hold_open_files(STALLED)
    data_dir = tmp_path / "data"
    [credentials_file] = init_branch(data_dir, 1)
    leaf = json.loads(credentials_file.read_text())
    log_path = tmp_path / "server.log"
    # the default limits (1,000 connections, 32 of them for identified clients, a 10 s header timeout that
    # tests/server/test_connections.py checks on stalled bodies) and no open-files cap
    process, url = start_limited_server(data_dir, log_path, header_timeout_s=10, fd_limit=None)
    admin_headers = {"Authorization": f"Bearer {(data_dir / 'admin_token').read_text().strip()}"}
    leaf_headers = {"Authorization": f"Bearer {leaf['id']}:{leaf['session_token']}"}
    host, port = url.rsplit("/", 1)[1].split(":")
    stalled: list[socket.socket] = []
    try:
        log_size = log_path.stat().st_size
        for _ in range(STALLED):
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(STALLED_HEADERS)
            stalled.append(sock)

        answer = timed("an admin call", lambda: requests.get(url + "/admin/v1/branches", headers=admin_headers, timeout=5))
        assert answer.status_code == 200, answer.text
        answer = timed("a leaf's run details", lambda: requests.get(
            f"{url}/api/v1/run/{leaf['branch_id']}", headers=leaf_headers, timeout=5))
        assert answer.status_code == 200, answer.text
        weights = npz_bytes()
        answer = timed("a leaf's upload", lambda: requests.post(
            url + "/api/v1/file/upload", headers=leaf_headers, timeout=5,
            files={"file": ("weights.npz", weights), "data": (None, json.dumps({"leaf_name": leaf["name"]}))}))
        assert answer.status_code == 201, answer.text

        def aggregate_id() -> str | None:  # the one leaf's round aggregates
            answer = timed("a leaf's round call", lambda: requests.get(
                f"{url}/api/v1/round/{leaf['branch_id']}", headers=leaf_headers, timeout=5))
            assert answer.status_code == 200, answer.text
            return (answer.json()["data"]["latest_aggregate"] or {}).get("aggregation_id")

        file_id = wait_until(aggregate_id, 10, "the round to aggregate")
        answer = timed("a leaf's download URL", lambda: requests.get(
            f"{url}/api/v1/file/download/{file_id}", headers=leaf_headers, timeout=5))
        assert answer.status_code == 200, answer.text
        blob = timed("a download", lambda: requests.get(answer.json()["data"]["download_url"], timeout=5))
        assert blob.status_code == 200
        assert np.array_equal(np.load(io.BytesIO(blob.content))["layer_0"], np.ones(1000, dtype=np.float32))
        assert timed("a WebSocket connect and reconnect", lambda: asyncio.run(websocket_connects(url, leaf, 2))) == 2

        held = len(wait_closed_by_server(stalled, time.monotonic()))  # a deadline past: those open now
        assert held > STALLED - 100, f"only {held} stalled sockets were still held while the calls were made"
        log = log_path.read_text()[log_size:]
        flood = [line for line in log.splitlines() if leaf["id"] not in line and leaf["branch_id"] not in line]
        assert len(flood) <= 3 and "Traceback" not in log and " ERROR " not in log, log[-3000:]
        assert process.poll() is None
    finally:
        stop(process, stalled)
