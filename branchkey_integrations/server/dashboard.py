"""The dashboard of branchkey-local: a static page at ``/`` and the admin JSON it reads.

The page (``static/index.html``, ``dashboard.js``, ``dashboard.css`` and the vendored uPlot
charting library, all shipped in the package: no build step, no CDN) holds no data of its own.
Everything it shows comes from admin routes, which need the admin token like the rest of
``/admin/v1`` (401 without it), so scripts can read the same JSON:

- ``GET /admin/v1/overview``: trees, branches, run status and number, each open round in brief;
- ``GET /admin/v1/branches/{id}/live``: the open round (:func:`~.progress.round_progress`) with
  every leaf's state (uploaded, missing, refused and why) and connection (WebSocket, AMQP, last seen);
- ``GET /admin/v1/branches/{id}/history[?run=N]`` and ``.../metrics/summary[?run=N]``: the rounds
  table and the metrics across rounds (:mod:`~.history`);
- ``GET /admin/v1/branches/{id}/analytics/result``: the branch's latest analytics round's result (per column the
  derived statistics and how many leaves contributed, the other fields) and its field operations
  (:mod:`~.analytics_report`), beside the learning history;
- ``GET /admin/v1/aggregates/{id}/download``: a signed, expiring URL of a stored aggregate;
- ``GET /admin/v1/events``: a server-sent event stream of what changed (:mod:`~.events`), so the page
  refreshes one part when something happens instead of polling.

Access: the page asks for the admin token once and keeps it in ``sessionStorage``; or
``branchkey-local serve`` prints a one-time login link (``/#login=<code>``; the code sits in the
URL fragment, which browsers never send) that the page trades for the token through
``POST /admin/v1/dashboard/login``. Codes are single-use and expire; ``POST
/admin/v1/dashboard/links`` (admin) issues new ones, which is how ``simulate --dashboard`` prints
its link. Leaf tokens never leave the store through these routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from ..core.protocol import ADMIN_PREFIX
from .admin import admin
from .analytics_report import analytics_result
from .events import EVENTS, EventHub
from .history import metric_summary, round_history
from .httpio import HttpProblem, check_file_id, is_decimal, ok, read_json_object
from .lifecycle import record_action
from .presence import PRESENCE, Presence
from .progress import round_progress
from .routes import public_base_url, signed_download_url
from .state import SERVER, Server, server_of
from .store import Store

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
STATIC_PREFIX = "/dashboard/static"
LOGIN_CODE_TTL_S = 15 * 60
#: a login body is ``{"code": "<32 characters>"}``: room for it with whitespace, not for 16 MiB per anonymous socket
LOGIN_BODY_BYTES = 4096
HEARTBEAT_S = 15.0
AMQP_POLL_S = 5.0
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


class LoginCodes:
    """One-time login codes: each trades once, within its lifetime, for the admin token."""

    def __init__(self, ttl_s: float = LOGIN_CODE_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._codes: dict[str, float] = {}

    def issue(self) -> str:
        now = time.time()
        self._codes = {c: t for c, t in self._codes.items() if t > now}
        code = secrets.token_urlsafe(24)
        self._codes[code] = now + self.ttl_s
        return code

    def redeem(self, code: str) -> bool:
        match = next((c for c in self._codes if hmac.compare_digest(c.encode(), code.encode())), None)
        if match is None:
            return False
        return self._codes.pop(match) > time.time()


LOGIN_CODES = web.AppKey("login_codes", LoginCodes)


def login_url(app: web.Application, base_url: str) -> str:
    """A fresh one-time login link to the dashboard of ``app`` served at ``base_url``."""
    return f"{base_url.rstrip('/')}/#login={app[LOGIN_CODES].issue()}"


def announcement(app: web.Application, url: str, host: str, token_file: Path, *,
                 with_link: bool = True) -> tuple[str, str | None]:
    """What ``serve`` prints: the dashboard's address with a one-time login link (``with_link``: only where
    the output is a terminal; a log would keep a credential), and a warning when ``host`` makes it
    reachable from the network (None on loopback)."""
    text = f"dashboard  {url}/  (admin token in {token_file})\n"
    if with_link:
        text += f"login link {login_url(app, url)}  (one use, valid {LOGIN_CODE_TTL_S // 60} min)"
    else:
        text += (f"login link: run 'branchkey-local login --data-dir {token_file.parent}' in a terminal "
                 "(not printed here: this output is no terminal, and a log would keep it)")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    warning = None if loopback else (
        f"WARNING: --host {host} makes this server and its dashboard reachable from the network: anyone who can "
        "reach it and holds the admin token or a login link can read the federation and start, pause or stop "
        "runs. Serve on 127.0.0.1 unless other machines must connect.")
    return text, warning


# -- the page -------------------------------------------------------------------------------


#: the files the page may load, by their path under ``static/`` (nothing else is served from there)
_STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}
STATIC_FILES = {path.relative_to(STATIC_DIR).as_posix(): path for path in STATIC_DIR.rglob("*")
                if path.suffix in _STATIC_TYPES}


async def page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers=_PAGE_HEADERS)


async def static_file(request: web.Request) -> web.FileResponse:
    path = STATIC_FILES.get(request.match_info["name"])
    if path is None:
        raise HttpProblem(404, f"No dashboard file {request.match_info['name'][:80]!r}.")
    return web.FileResponse(path, headers={"Content-Type": _STATIC_TYPES[path.suffix] + "; charset=utf-8",
                                           "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})


# -- JSON -----------------------------------------------------------------------------------


def _overview(store: Store) -> dict[str, Any]:
    with store.reading():
        trees = store.list_trees()
        branches = []
        for branch in store.list_branches():
            progress = round_progress(store, branch.id)
            branches.append({
                **branch.to_dict(), "leaves": len(store.list_leaves(branch.id)), "required": progress.required,
                "round_index": progress.round_index, "uploaded": len(progress.uploaded),
                "refused": len(progress.refused), "latest_aggregate": progress.latest_aggregate,
                "state": progress.state(),
            })
    return {"trees": [{k: t[k] for k in ("id", "name", "created_at") if k in t} for t in trees],
            "branches": branches}


@admin
async def overview(request: web.Request, server: Server) -> web.Response:
    return ok({**await server.blocking(_overview, server.store), "server_time": time.time(),
               "amqp": server.notifier.amqp_enabled})


def _live(store: Store, presence: Presence, branch_id: str) -> dict[str, Any]:
    with store.reading():
        progress = round_progress(store, branch_id)
        leaves = store.list_leaves(branch_id)
    uploaded, refused = set(progress.uploaded), {r.leaf: r for r in progress.refused}
    rows = []
    for leaf in leaves:
        state = "uploaded" if leaf.name in uploaded else "refused" if leaf.name in refused else "missing"
        state = state if progress.round_index is not None else "-"  # no open round: nobody is missing
        rows.append({"id": leaf.id, "name": leaf.name, "state": state,
                     "reason": refused[leaf.name].reason if state == "refused" else None, **presence.of(leaf.id)})
    # "round" (from 1) and "state" are what the page shows: the callbacks and status number rounds so
    return {**progress.to_dict(), "round": progress.round, "aggregated": progress.aggregated,
            "state": progress.state(), "branch_id": branch_id, "leaves": rows}


@admin
async def live(request: web.Request, server: Server) -> web.Response:
    data = await server.blocking(_live, server.store, request.app[PRESENCE], request.match_info["branch_id"])
    return ok({**data, "server_time": time.time(), "amqp": server.notifier.amqp_enabled})


def _run_query(request: web.Request) -> int | None:
    text = request.query.get("run")
    if text is None:
        return None
    if not is_decimal(text):
        raise HttpProblem(400, f"Expected ?run=<run number>, e.g. ?run=1. Received: run={text[:40]!r}")
    return int(text)


class SummaryCache:
    """History and metric summaries by (what, branch, run), kept while the branch has had no event and
    for at most ``ttl_s`` (changes that bypass the event hooks, such as an operator's round reset, show
    within that time). A big branch's summary takes a fraction of a second; a page refreshes it often."""

    def __init__(self, events: EventHub, ttl_s: float = 30.0) -> None:
        self.events, self.ttl_s = events, ttl_s
        self._entries: dict[tuple[str, str, int | None], tuple[int, float, Any]] = {}

    async def get(self, server: Server, what: str, branch_id: str, run: int | None) -> Any:
        key, version = (what, branch_id, run), self.events.versions.get(branch_id, 0)
        hit = self._entries.get(key)
        if hit is not None and hit[0] == version and time.monotonic() - hit[1] < self.ttl_s:
            return hit[2]
        compute = round_history if what == "history" else metric_summary
        data = await server.blocking(compute, server.store, branch_id, run)
        if len(self._entries) > 256:
            self._entries.clear()
        self._entries[key] = (version, time.monotonic(), data)
        return data


SUMMARIES = web.AppKey("summaries", SummaryCache)


@admin
async def history(request: web.Request, server: Server) -> web.Response:
    return ok(await request.app[SUMMARIES].get(server, "history", request.match_info["branch_id"], _run_query(request)))


@admin
async def metrics(request: web.Request, server: Server) -> web.Response:
    return ok(await request.app[SUMMARIES].get(server, "metrics", request.match_info["branch_id"], _run_query(request)))


def _analytics(store: Store, branch_id: str) -> dict[str, Any]:
    result = analytics_result(store, branch_id)  # checks the branch exists
    return {"branch_id": branch_id, "field_ops": store.field_ops(branch_id), "result": result}


@admin
async def analytics(request: web.Request, server: Server) -> web.Response:
    """The branch's latest analytics result (null before its first analytics round is combined)."""
    return ok(await server.blocking(_analytics, server.store, request.match_info["branch_id"]))


@admin
async def aggregate_download(request: web.Request, server: Server) -> web.Response:
    """A signed URL of a stored aggregate (the blob route serves it without credentials, until it expires)."""
    file_id = check_file_id(request.match_info["file_id"])
    record = await server.blocking(server.store.get_file, file_id)
    if record is None or record.kind != "aggregate":
        raise HttpProblem(404, f"No aggregate {file_id} in this server's store.")
    if record.removed_at:
        raise HttpProblem(410, f"Aggregate {file_id} was removed by retention at {record.removed_at} "
                               "(serve --keep-rounds N keeps more; 0 keeps all).")
    return ok({"download_url": signed_download_url(server, request, file_id), "size": record.size,
               "sha256": record.sha256})


@admin
async def create_login_link(request: web.Request, server: Server) -> web.Response:
    await record_action(request, server, "dashboard.login_link", "admin")
    return ok({"url": login_url(request.app, public_base_url(server, request)),
               "expires_in_s": request.app[LOGIN_CODES].ttl_s}, status=201)


async def login(request: web.Request) -> web.Response:
    """Trade a one-time login code for the admin token (the only admin route without the token).

    Its caller is not identified, so its body is small (:data:`LOGIN_BODY_BYTES`) and, like any request of
    an unidentified client, must arrive within the header timeout (:mod:`~.connections`).
    """
    body = await read_json_object(request, max_bytes=LOGIN_BODY_BYTES)
    code = body.get("code")
    if not isinstance(code, str) or not code.isascii() or not request.app[LOGIN_CODES].redeem(code):
        raise HttpProblem(401, "This login link was already used or has expired; get a new one with "
                               "'branchkey-local login --data-dir DIR' (DIR: the server's data directory), or "
                               "enter the admin token (the file DIR/admin_token).")
    server = server_of(request)
    await record_action(request, server, "dashboard.login", "admin")
    return ok({"token": server.store.admin_token})


# -- live stream ----------------------------------------------------------------------------


async def event_stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: one ``event: <kind>`` / ``data: <json>`` per server event, comments as heartbeat."""
    server = server_of(request)
    server.auth.authenticate_admin(request)
    hub = request.app[EVENTS]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
    queue = hub.subscribe()  # before the headers go out: a page that sees them misses no event after
    watcher = _AmqpWatcher.ensure(request.app)
    try:
        await response.prepare(request)
        await response.write(b"event: hello\ndata: {\"kind\": \"hello\"}\n\n")
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), HEARTBEAT_S)
            except asyncio.TimeoutError:
                await response.write(b": ping\n\n")
                continue
            if hub.is_closed(event):
                break
            await response.write(f"event: {event['kind']}\ndata: {json.dumps(event)}\n\n".encode())
    except (ConnectionResetError, RuntimeError):  # the page went away
        pass
    finally:
        hub.unsubscribe(queue)
        if watcher is not None and hub.subscribers == 0:
            watcher.stop()
    return response


class _AmqpWatcher:
    """While a dashboard watches a server with a broker, read each leaf queue's consumers every few seconds."""

    KEY = web.AppKey("amqp_watcher", dict)

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.task: asyncio.Task[None] | None = None

    @classmethod
    def ensure(cls, app: web.Application) -> "_AmqpWatcher | None":
        server = app[SERVER]
        if not server.notifier.amqp_enabled:
            return None
        holder = app[cls.KEY]
        watcher = holder.setdefault("watcher", cls(app))
        if watcher.task is None or watcher.task.done():
            watcher.task = asyncio.ensure_future(watcher.run())
        return watcher

    async def run(self) -> None:
        server, presence = self.app[SERVER], self.app[PRESENCE]
        while True:
            try:
                for tree in await server.blocking(server.store.list_trees):
                    leaves = await server.blocking(server.store.list_leaves, tree_id=tree["id"])
                    presence.set_amqp_consumers(leaves, await server.notifier.amqp_consumers(tree["id"]))
            except Exception as exc:  # a broker hiccup must not end the watch
                logger.warning("could not read AMQP consumers from the broker: %s", exc)
            await asyncio.sleep(AMQP_POLL_S)

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()


# -- wiring ---------------------------------------------------------------------------------


async def _close_streams(app: web.Application) -> None:
    app[EVENTS].close()
    watcher = app[_AmqpWatcher.KEY].get("watcher")
    if watcher is not None:
        watcher.stop()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            if watcher.task is not None:
                await watcher.task


def add_dashboard_routes(app: web.Application) -> None:
    """The page, its static files, its JSON and its event stream; and the hooks that feed the stream."""
    server = app[SERVER]
    hub = EventHub()
    app[EVENTS] = hub
    app[PRESENCE] = presence = Presence(hub)
    app[LOGIN_CODES] = LoginCodes()
    app[SUMMARIES] = SummaryCache(hub)
    app[_AmqpWatcher.KEY] = {}
    server.notifier.listeners.append(hub.notification)
    server.auth.on_leaf = presence.seen
    app.on_shutdown.append(_close_streams)
    branches = ADMIN_PREFIX + "/branches/{branch_id}"
    app.router.add_get("/", page)
    app.router.add_get(STATIC_PREFIX + "/{name:.+}", static_file)
    app.router.add_get(ADMIN_PREFIX + "/overview", overview)
    app.router.add_get(branches + "/live", live)
    app.router.add_get(branches + "/history", history)
    app.router.add_get(branches + "/metrics/summary", metrics)
    app.router.add_get(branches + "/analytics/result", analytics)
    app.router.add_get(ADMIN_PREFIX + "/aggregates/{file_id}/download", aggregate_download)
    app.router.add_get(ADMIN_PREFIX + "/events", event_stream)
    app.router.add_post(ADMIN_PREFIX + "/dashboard/links", create_login_link)
    app.router.add_post(ADMIN_PREFIX + "/dashboard/login", login)


__all__ = ["add_dashboard_routes", "login_url", "announcement", "LoginCodes", "LOGIN_CODES", "STATIC_DIR"]
