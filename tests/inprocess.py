"""An in-process branchkey-local for tests: the real aiohttp app on a free port, in a thread.

This module owns the one way tests run the server without a subprocess. It starts in milliseconds
where ``branchkey-local init`` + ``serve`` subprocesses take seconds, yet it is the same app speaking
real HTTP and real WebSocket, so tests of the server and of the leaf-side round logic (which need a
peer, not a fake) stay honest and fast. Tests that must kill or restart a server process use the
subprocess ``LocalServer`` of tests/conftest.py instead.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from branchkey_integrations.server.app import RECOVERED, SERVER, Server, create_app

from .conftest import AdminCalls


class ServerThread:
    """Runs the aiohttp app on 127.0.0.1:<free port> in its own event loop thread."""

    def __init__(self, data_dir: Path, *, recovered: bool = True, **options: Any) -> None:
        self.app = create_app(data_dir, **options)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.runner = self._call(self._start())
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        if recovered:  # it listens first; until its rounds are recovered it answers 503
            self._call(self.app[RECOVERED].wait())

    async def _start(self) -> Any:
        from aiohttp import web

        runner = web.AppRunner(self.app, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    def _call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def server(self) -> Server:
        return self.app[SERVER]

    def stop(self) -> None:
        self._call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class InProcessServer(ServerThread, AdminCalls):
    """A ``ServerThread`` with the admin calls of the subprocess ``LocalServer`` (the same ``AdminCalls``),
    so a test written against one runs against the other unchanged."""

    @property
    def admin_token(self) -> str:
        return self.server.store.admin_token

    def create_branch(self, leaves: int) -> list[dict[str, str]]:
        """A new tree, branch and ``leaves`` leaves, through the admin API as ``branchkey-local init``
        does against a live server; returns each leaf's six credential fields."""
        tree = self._created("/admin/v1/trees", {"name": "tree"})
        branch = self._created(f"/admin/v1/trees/{tree['id']}/branches", {"name": "branch"})
        return self._created(f"/admin/v1/branches/{branch['id']}/leaves", {"count": leaves})["leaves"]

    def _created(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.admin("POST", path, json=body)
        assert response.status_code == 201, response.text
        return response.json()["data"]
