"""Fixtures for branchkey-local tests: a real server on a free port in a background thread."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests

from branchkey_integrations.core import wire

from ..conftest import wait_until
from ..inprocess import ServerThread


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll ``condition`` until it returns something truthy, or fail after ``timeout`` seconds."""
    return wait_until(condition, timeout, "the condition", interval)


def auth(leaf: dict[str, str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {leaf['id']}:{leaf['session_token']}", "accept": "application/json"}


@dataclass
class Handle:
    """A running server plus its admin token; helpers speak the real HTTP API."""

    url: str
    admin_token: str
    thread: ServerThread
    session: requests.Session = field(default_factory=requests.Session)

    # Test modules reach the helpers through the handle, not ``from conftest import``,
    # which becomes ambiguous once tests/conftest.py exists.
    auth = staticmethod(auth)
    wait_for = staticmethod(wait_for)

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None, expect: int | None = None) -> Any:
        answer = self.session.request(method, self.url + path, json=body,
                                      headers={"Authorization": f"Bearer {self.admin_token}"}, timeout=30)
        if expect is not None:
            assert answer.status_code == expect, answer.text
        return answer.json()["data"] if answer.ok else answer.json()

    def make_branch(self, leaves: int = 2, **settings: Any) -> tuple[dict[str, Any], list[dict[str, str]]]:
        tree = self.admin("POST", "/admin/v1/trees", {"name": "t"}, expect=201)
        branch = self.admin("POST", f"/admin/v1/trees/{tree['id']}/branches", {"name": "b", **settings}, expect=201)
        created = self.admin("POST", f"/admin/v1/branches/{branch['id']}/leaves", {"count": leaves}, expect=201)
        return branch, created["leaves"]

    def rounds(self, branch_id: str) -> list[dict[str, Any]]:
        return self.admin("GET", f"/admin/v1/branches/{branch_id}/rounds", expect=200)["rounds"]

    def wait_aggregate(self, branch_id: str, run: int = 1, index: int = 0, timeout: float = 60) -> str:
        def done() -> str | None:
            for item in self.rounds(branch_id):
                if (item["run_number"], item["round_index"]) == (run, index) and item["status"] == "aggregated":
                    return item["aggregate_id"]
            return None

        return wait_for(done, timeout)

    def ticket(self, leaf: dict[str, str]) -> dict[str, str]:
        """A WebSocket ticket for ``leaf`` (``ticket_id``, ``request_id``)."""
        answer = requests.post(self.url + "/api/v1/ws/ticket", headers=auth(leaf), timeout=10)
        assert answer.status_code == 200, answer.text
        return answer.json()["data"]

    def upload(self, leaf: dict[str, str], content: bytes, *, headers: dict[str, str] | None = None,
               data: str | None = None) -> requests.Response:
        data = data if data is not None else json.dumps({"leaf_name": leaf["name"], "metadata": "{}"})
        return self.session.post(self.url + "/api/v1/file/upload", files={"file": ("w.npz", content)},
                                 data={"data": data}, headers={**auth(leaf), **(headers or {})}, timeout=30)

    def download(self, leaf: dict[str, str], file_id: str) -> requests.Response:
        return self.session.get(self.url + "/api/v1/file/download/" + file_id,
                                headers={**auth(leaf), "accept": "*/*"}, timeout=30)

    def fetch(self, leaf: dict[str, str], file_id: str) -> wire.Archive:
        answer = self.download(leaf, file_id)
        assert answer.status_code == 200, answer.text
        blob = requests.get(answer.json()["data"]["download_url"], timeout=30)
        assert blob.status_code == 200 and blob.headers["Content-Type"] == "application/octet-stream"
        return wire.decode(blob.content)


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Handle]]:
    """Factory: start a server over ``tmp_path/data`` (or a given dir) with app options."""
    started: list[ServerThread] = []

    def start(data_dir: Path | None = None, **options: Any) -> Handle:
        thread = ServerThread(data_dir or tmp_path / "data", **options)
        started.append(thread)
        return Handle(thread.url, thread.server.store.admin_token, thread)

    yield start
    for thread in started:
        thread.stop()


@pytest.fixture
def live(start_server: Callable[..., Handle]) -> Handle:
    return start_server()
