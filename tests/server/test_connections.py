"""Connection hygiene (server/connections.py) on the real app served through ``GuardedAppRunner``, in-process.

The subprocess test with 1,100 idle sockets under a 1,024 open-files limit is
tests/integration/test_idle_connections.py; these check each rule on its own, in milliseconds.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
from aiohttp import web

from branchkey_integrations.server.connections import (
    GUARD,
    ConnectionLimits,
    GuardedAppRunner,
    _AcceptErrorFilter,
)

from ..conftest import wait_until
from ..inprocess import ServerThread


class GuardedThread(ServerThread):
    """The in-process server, accepting through the app's ConnectionGuard as ``branchkey-local serve`` does."""

    async def _start(self) -> Any:
        runner = GuardedAppRunner(self.app, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    @property
    def guard(self):
        return self.app[GUARD]

    def admin(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return requests.request(method, self.url + path, timeout=10,
                                headers={"Authorization": f"Bearer {self.server.store.admin_token}"}, **kwargs)

    def leaf(self) -> tuple[dict[str, Any], dict[str, str]]:
        tree = self.admin("POST", "/admin/v1/trees", json={"name": "t"}).json()["data"]
        branch = self.admin("POST", f"/admin/v1/trees/{tree['id']}/branches", json={"name": "b"}).json()["data"]
        [leaf] = self.admin("POST", f"/admin/v1/branches/{branch['id']}/leaves", json={"count": 1}).json()["data"]["leaves"]
        return branch, leaf

    def address(self) -> tuple[str, int]:
        host, port = self.url.rsplit("/", 1)[1].split(":")
        return host, int(port)


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator:
    threads: list[GuardedThread] = []

    def start(**options: Any) -> GuardedThread:
        thread = GuardedThread(tmp_path / f"data{len(threads)}", **options)
        threads.append(thread)
        return thread

    yield start
    for thread in threads:
        thread.stop()


def closed_by_server(sock: socket.socket, timeout: float = 10) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_leaf_over_its_connection_cap_is_answered_429(guarded) -> None:
    server = guarded(max_connections_per_leaf=2)
    branch, leaf = server.leaf()
    headers = {"Authorization": f"Bearer {leaf['id']}:{leaf['session_token']}"}
    connections = [http.client.HTTPConnection(*server.address(), timeout=10) for _ in range(3)]  # kept alive

    def get(connection: http.client.HTTPConnection) -> tuple[int, bytes]:
        connection.request("GET", f"/api/v1/run/{branch['id']}", headers=headers)
        answer = connection.getresponse()
        return answer.status, answer.read()

    answers = [get(c) for c in connections]
    assert [status for status, _ in answers] == [200, 200, 429]
    assert b"already holds 2 connections" in answers[2][1]
    connections[0].close()  # a slot comes free once the server sees the close
    wait_until(lambda: len(server.guard._per_leaf.get(leaf["id"], ())) == 1, 10, "the closed connection to be forgotten")
    assert get(connections[2])[0] == 200
    for connection in connections:
        connection.close()


def test_idle_sockets_are_closed_after_the_header_timeout(guarded) -> None:
    server = guarded(header_timeout_s=0.3)
    with socket.create_connection(server.address(), timeout=10) as idle:
        assert closed_by_server(idle)
    assert server.guard.open_connections == 0


def test_past_the_pending_slots_the_oldest_idle_socket_makes_room_and_identified_clients_get_in(guarded) -> None:
    server = guarded(max_connections=10, reserved_connections=4, header_timeout_s=60)
    idle = [socket.create_connection(server.address(), timeout=10) for _ in range(10)]
    try:
        # 6 slots for clients not yet identified: the 4 oldest idle sockets were closed to make room
        assert all(closed_by_server(sock) for sock in idle[:4])
        wait_until(lambda: server.guard.pending_connections == 6, 10, "six idle sockets to remain")
        started = requests.get(server.url + "/admin/v1/branches", timeout=10,
                               headers={"Authorization": f"Bearer {server.server.store.admin_token}"})
        assert started.status_code == 200  # the admin got in by evicting another idle socket
        assert closed_by_server(idle[4])
    finally:
        for sock in idle:
            sock.close()


def test_connection_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="reserved_connections"):
        ConnectionLimits(max_connections=10, reserved_connections=10)
    with pytest.raises(ValueError, match="header_timeout_s"):
        ConnectionLimits(header_timeout_s=0)
    with pytest.raises(ValueError, match="max_connections_per_leaf"):
        ConnectionLimits(max_connections_per_leaf=True)


def test_asyncio_accept_errors_are_logged_at_most_once_per_interval() -> None:
    log_filter = _AcceptErrorFilter(interval_s=3600)

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None, None)

    passed = [log_filter.filter(record("socket.accept() out of system resource")) for _ in range(1000)]
    assert passed.count(True) == 1
    assert log_filter.filter(record("something else")) is True


def test_a_client_that_disconnects_mid_upload_is_logged_at_info_not_as_an_error(guarded, caplog) -> None:
    server = guarded()
    _, leaf = server.leaf()
    files_dir = server.server.store.files_dir
    before = set(files_dir.iterdir())
    caplog.set_level(logging.INFO, logger="branchkey_integrations")
    with socket.create_connection(server.address(), timeout=10) as raw:
        raw.sendall(b"POST /api/v1/file/upload HTTP/1.1\r\nHost: x\r\n"
                    + f"Authorization: Bearer {leaf['id']}:{leaf['session_token']}\r\n".encode()
                    + b"Content-Type: multipart/form-data; boundary=xx\r\nContent-Length: 100000\r\n\r\n"
                    + b"--xx\r\nContent-Disposition: form-data; name=\"file\"; filename=\"w.npz\"\r\n\r\n" + b"\0" * 5000)
        wait_until(lambda: set(files_dir.iterdir()) != before, 10, "the upload to start")
    wait_until(lambda: any("ended early" in r.getMessage() for r in caplog.records), 10, "the disconnect to be logged")
    # the server's own loggers and aiohttp's (asyncio's garbage collector may report an earlier test's loop)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith(("branchkey", "aiohttp"))]
    assert not errors, [r.getMessage() for r in caplog.records]
    wait_until(lambda: set(files_dir.iterdir()) == before, 10, "the temporary file to be removed")


def test_kept_alive_connections_of_unidentified_clients_are_evicted_like_idle_ones(guarded) -> None:
    """A 401 answered, the connection kept alive: it holds no slot of the reserve; a leaf's and the admin's do."""
    server = guarded(max_connections=8, reserved_connections=4, header_timeout_s=60)
    branch, leaf = server.leaf()
    identified = {
        "leaf": (f"/api/v1/run/{branch['id']}", {"Authorization": f"Bearer {leaf['id']}:{leaf['session_token']}"}),
        "admin": ("/admin/v1/branches", {"Authorization": f"Bearer {server.server.store.admin_token}"}),
    }
    kept: dict[str, http.client.HTTPConnection] = {}
    for name, (path, headers) in identified.items():
        kept[name] = http.client.HTTPConnection(*server.address(), timeout=10)
        kept[name].request("GET", path, headers=headers)
        answer = kept[name].getresponse()
        assert answer.status == 200, answer.read()
        answer.read()
    strangers = []
    for _ in range(4):  # each gets its 401 and keeps the connection open
        stranger = http.client.HTTPConnection(*server.address(), timeout=10)
        stranger.request("GET", f"/api/v1/run/{branch['id']}")
        answer = stranger.getresponse()
        assert answer.status == 401
        answer.read()
        strangers.append(stranger)
    wait_until(lambda: server.guard.pending_connections == 4, 10, "the strangers' connections to count as pending")
    idle = [socket.create_connection(server.address(), timeout=10) for _ in range(4)]  # evict the 4 strangers
    try:
        assert all(closed_by_server(s.sock) for s in strangers)
        for name, (path, headers) in identified.items():  # the identified connections kept their slots
            kept[name].request("GET", path, headers=headers)
            assert kept[name].getresponse().status == 200
    finally:
        for sock in idle:
            sock.close()
        for connection in [*kept.values(), *strangers]:
            connection.close()


def test_a_connection_used_by_two_leaves_in_turn_counts_for_the_latest_only(guarded) -> None:
    server = guarded(max_connections_per_leaf=1)
    (branch_a, leaf_a), (branch_b, leaf_b) = server.leaf(), server.leaf()
    shared = http.client.HTTPConnection(*server.address(), timeout=10)  # e.g. a proxy's kept-alive connection
    for branch, leaf in ((branch_a, leaf_a), (branch_b, leaf_b)):
        shared.request("GET", f"/api/v1/run/{branch['id']}",
                       headers={"Authorization": f"Bearer {leaf['id']}:{leaf['session_token']}"})
        answer = shared.getresponse()
        assert answer.status == 200, answer.read()
        answer.read()
    assert {k: len(v) for k, v in server.guard._per_leaf.items()} == {leaf_b["id"]: 1}
    shared.close()
    wait_until(lambda: not server.guard._per_leaf, 10, "the closed connection to be forgotten")


def test_a_json_body_that_stalls_is_answered_408(guarded, monkeypatch) -> None:
    from branchkey_integrations.server import httpio

    monkeypatch.setattr(httpio, "JSON_BODY_TIMEOUT_S", 0.3)
    server = guarded()
    _, leaf = server.leaf()
    with socket.create_connection(server.address(), timeout=10) as raw:
        raw.sendall(b"POST /api/v1/performance/analysis HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                    + f"Authorization: Bearer {leaf['id']}:{leaf['session_token']}\r\n\r\n".encode() + b'{"mode": ')
        answer = raw.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive" in answer


LOGIN_HEADERS = (b"POST /admin/v1/dashboard/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n")


def stalled_body(server: GuardedThread, headers: bytes = LOGIN_HEADERS) -> socket.socket:
    """A connection that sent complete request headers and never sends the body they announce."""
    sock = socket.create_connection(server.address(), timeout=10)
    sock.sendall(headers)
    return sock


def test_stalled_bodies_of_unidentified_clients_are_evicted_to_make_room(guarded) -> None:
    """Issue 22: past their headers, stalled bodies of clients without credentials held every slot."""
    server = guarded(max_connections=10, reserved_connections=4, header_timeout_s=60)
    branch, leaf = server.leaf()
    stalled = [stalled_body(server) for _ in range(10)]
    try:
        assert all(closed_by_server(sock) for sock in stalled[:4])  # 6 slots for the unidentified
        wait_until(lambda: server.guard.pending_connections == 6, 10, "six stalled bodies to remain")
        answers = [server.admin("GET", "/admin/v1/branches"),
                   requests.get(f"{server.url}/api/v1/run/{branch['id']}", timeout=10,
                                headers={"Authorization": f"Bearer {leaf['id']}:{leaf['session_token']}"})]
        assert [a.status_code for a in answers] == [200, 200]
        assert closed_by_server(stalled[4])  # evicted for the admin's connection, which then left the six
        assert server.guard.pending_connections == 5
    finally:
        for sock in stalled:
            sock.close()


def test_an_unidentified_body_has_the_header_timeout_an_identified_one_the_body_timeout(guarded) -> None:
    server = guarded(header_timeout_s=0.3)
    _, leaf = server.leaf()
    identified = stalled_body(server, b"POST /api/v1/performance/analysis HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                              + f"Authorization: Bearer {leaf['id']}:{leaf['session_token']}\r\n\r\n".encode())
    unidentified = stalled_body(server)  # opened after the leaf's: its timeout comes later
    try:
        assert closed_by_server(unidentified)
        identified.setblocking(False)
        with pytest.raises(BlockingIOError):  # the leaf's body keeps its 60 s (JSON_BODY_TIMEOUT_S)
            identified.recv(1)
    finally:
        identified.close()
        unidentified.close()


def test_clients_that_disconnect_mid_body_are_logged_once_at_info_never_as_a_500(guarded, caplog) -> None:
    server = guarded()
    caplog.set_level(logging.DEBUG)
    for _ in range(20):
        with stalled_body(server, LOGIN_HEADERS + b'{"code": "ab'):
            pass
    wait_until(lambda: server.guard.open_connections == 0, 10, "the server to see every close")
    wait_until(lambda: any("requests ended early" in r.getMessage() for r in caplog.records), 10, "the INFO line")
    ours = [r for r in caplog.records if r.name.startswith(("branchkey", "aiohttp")) and r.levelno >= logging.INFO
            and r.name != "aiohttp.access"]  # serve turns the access log off
    assert [(r.levelno, r.getMessage()[:42]) for r in ours] == [
        (logging.INFO, "requests ended early: the client disconnec")], [r.getMessage() for r in ours]


def test_the_login_body_of_an_unidentified_client_is_small(guarded) -> None:
    server = guarded()
    answer = requests.post(server.url + "/admin/v1/dashboard/login", json={"code": "x" * 5000}, timeout=10)
    assert answer.status_code == 413 and "4096 bytes" in answer.json()["error"]
    answer = requests.post(server.url + "/admin/v1/dashboard/login", json={"code": "wrong"}, timeout=10)
    assert answer.status_code == 401


def test_past_many_connections_a_socket_reads_small_from_its_accept_even_after_an_upload(guarded, monkeypatch) -> None:
    """With many leaves connected, what one socket read brings in waits in aiohttp's buffer before any
    handler runs (1,000 leaves x 1 MB: +512 MB of server RSS): a connection accepted past
    MANY_CONNECTIONS reads small from its accept, and an upload on it puts that back, not asyncio's 256 KiB."""
    import numpy as np

    from branchkey_integrations.core import wire
    from branchkey_integrations.server import connections, uploads

    monkeypatch.setattr(connections, "MANY_CONNECTIONS", 1)
    monkeypatch.setattr(uploads, "_MANY_UPLOADS", -1)  # the upload sets (then restores) its own small reads
    server = guarded()
    branch, leaf = server.leaf()
    first = socket.create_connection(server.address(), timeout=10)
    wait_until(lambda: server.guard.open_connections == 1, 10, "the first connection to be accepted")
    session = requests.Session()
    answer = session.post(server.url + "/api/v1/file/upload",
                          files={"file": ("w.npz", wire.encode([np.ones(300_000, np.float32)], 1.0))},
                          data={"data": json.dumps({"leaf_name": leaf["name"], "metadata": "{}"})},
                          headers={"Authorization": f"Bearer {leaf['id']}:{leaf['session_token']}"}, timeout=30)
    assert answer.status_code == 201, answer.text
    reads = {index: vars(transport).get("max_size") for index, transport in enumerate(server.guard._by_transport)}
    assert reads == {0: None, 1: uploads.SMALL_RECV}, reads  # the first as asyncio reads; the second small, still
    assert uploads.SMALL_RECV < type(next(iter(server.guard._by_transport))).max_size
    first.close()
    session.close()
