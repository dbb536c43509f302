"""The branchkey-local application: :func:`create_app` and what happens at start and shutdown.

The app is assembled from modules with one concern each:

- :mod:`~branchkey_integrations.server.routes`: the leaf API of PROTOCOL.md (``/api/v1``);
- :mod:`~branchkey_integrations.server.admin`: the admin API (``/admin/v1``), with
  :mod:`~branchkey_integrations.server.lifecycle` (leaf revoke/rotate, admin token, audit trail);
- :mod:`~branchkey_integrations.server.httpio`: ``{"data"}``/``{"error"}`` answers and the one
  middleware that maps domain errors to statuses;
- :mod:`~branchkey_integrations.server.auth`: bearer tokens, signed URLs, WebSocket tickets;
- :mod:`~branchkey_integrations.server.uploads`: streamed receipt and validation of uploads;
- :mod:`~branchkey_integrations.server.rounds`: the round state machine (no HTTP);
- :mod:`~branchkey_integrations.server.store`, :mod:`~branchkey_integrations.server.aggregation`,
  :mod:`~branchkey_integrations.server.notify`: durable state, FedAvg, notifications;
- :mod:`~branchkey_integrations.server.state`: :class:`ServerConfig` and the :class:`Server`
  that holds one of each service (re-exported here);
- :mod:`~branchkey_integrations.server.connections`: connection caps and timeouts
  (:class:`GuardedAppRunner` serves an app through them);
- :mod:`~branchkey_integrations.server.outbox`: AMQP notifications kept until the broker confirms.

Start-up raises the open-files limit and fits the connection cap below it and connects the broker
(if any; notifications left in the outbox go out) before the server listens. Recovery (aggregating
rounds that were complete when the server died, O(model) each: seconds for a large model) runs once
it listens, behind :func:`recovery_gate`: until it is done every API call (``/api``, ``/admin``; not the
OpenAPI document, nor the dashboard's page) is answered 503 with ``Retry-After``, so nothing reads or
writes a round half recovered, and a leaf sees a server that is coming back (and keeps asking) rather
than a refused connection. The round-deadline
loop starts after it. A recovered round reaches AMQP leaves through the outbox and WebSocket leaves
when they connect (catch-up in :mod:`~branchkey_integrations.server.routes`). Shutdown waits for
aggregations in flight, then releases the broker, the worker threads and the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Awaitable, Callable

from aiohttp import WSCloseCode, web

from ..core import wire
from ..core.protocol import ADMIN_PREFIX, API_PREFIX, OPENAPI_PATH
from .admin import add_admin_routes
from .connections import (
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_LEAF,
    DEFAULT_RESERVED_CONNECTIONS,
    DEFAULT_UPLOAD_IDLE_TIMEOUT_S,
    GUARD,
    ConnectionGuard,
    ConnectionLimits,
    GuardedAppRunner,
    guard_middleware,
)
from .dashboard import add_dashboard_routes
from .httpio import HttpProblem, error_middleware, error_response
from .lifecycle import add_lifecycle_routes
from .notify import Notifier
from .routes import add_leaf_routes
from .analytics import DEFAULT_MAX_FIELDS
from .uploads import SMALL_READ
from .state import (
    DEFAULT_DOWNLOAD_TTL_S,
    DEFAULT_KEEP_ROUNDS,
    DEFAULT_MAX_COMPRESSION_RATIO,
    DEFAULT_MAX_MEMBERS,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_TICKET_TTL_S,
    SERVER,
    Server,
    ServerConfig,
)
from .store import Store

logger = logging.getLogger(__name__)

#: set once the rounds are recovered after a start; until then :func:`recovery_gate` answers 503
RECOVERED = web.AppKey("recovered", asyncio.Event)
#: what a client is told to wait before asking again while the server recovers
RECOVERY_RETRY_AFTER_S = 1


def create_app(
    data_dir: str | os.PathLike,
    *,
    amqp_url: str | None = None,
    amqp_management_url: str | None = None,
    amqp_ca: str | None = None,
    public_url: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_total_bytes: int = wire.DEFAULT_MAX_TOTAL_BYTES,
    download_ttl_s: int = DEFAULT_DOWNLOAD_TTL_S,
    ticket_ttl_s: int = DEFAULT_TICKET_TTL_S,
    deadline_check_interval_s: float = 1.0,
    workers: int = 8,
    max_compression_ratio: float = DEFAULT_MAX_COMPRESSION_RATIO,
    keep_uploads: bool = False,
    keep_rounds: int = DEFAULT_KEEP_ROUNDS,
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
    upload_idle_timeout_s: float = DEFAULT_UPLOAD_IDLE_TIMEOUT_S,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    max_connections_per_leaf: int = DEFAULT_MAX_CONNECTIONS_PER_LEAF,
    reserved_connections: int = DEFAULT_RESERVED_CONNECTIONS,
    max_fields: int = DEFAULT_MAX_FIELDS,
) -> web.Application:
    """Build the branchkey-local application over the store in ``data_dir`` (created if missing).

    The connection limits (``header_timeout_s`` to ``reserved_connections``, see
    :mod:`~branchkey_integrations.server.connections`) hold when the app is served through
    :class:`GuardedAppRunner` (as ``branchkey-local serve`` does); ``upload_idle_timeout_s`` always.

    Example:
        >>> import tempfile
        >>> app = create_app(tempfile.mkdtemp())
        >>> "/api/v1/run/{branch_id}" in {r.resource.canonical for r in app.router.routes() if r.method == "GET"}
        True
    """
    config = ServerConfig(public_url, max_upload_bytes, max_members, max_total_bytes, download_ttl_s,
                          ticket_ttl_s, deadline_check_interval_s, max_compression_ratio=max_compression_ratio,
                          keep_uploads=keep_uploads, keep_rounds=keep_rounds, max_fields=max_fields)
    if amqp_url is not None and not amqp_url.startswith(("amqp://", "amqps://")):
        raise ValueError(f"Expected amqp_url like 'amqp://user:pass@host:5672/'. Received a value starting {amqp_url[:8]!r}")
    limits = ConnectionLimits(header_timeout_s, upload_idle_timeout_s, max_connections, max_connections_per_leaf,
                              reserved_connections)
    store = Store(data_dir)
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="branchkey-local")
    server = Server(store, Notifier(executor, amqp_url, amqp_management_url, store=store, amqp_ca=amqp_ca), executor, config)
    # read_bufsize: aiohttp buffers up to twice it per connection before it stops reading the socket; a
    # large upload raises that for itself by reading 1 MiB at a time (uploads.py), the rest stay small
    # the guard's middleware inside the error middleware: a request whose client went away is its to answer quietly
    app = web.Application(middlewares=[error_middleware, guard_middleware, recovery_gate],
                          client_max_size=16 * 1024**2, handler_args={"read_bufsize": SMALL_READ})
    app[SERVER] = server
    app[RECOVERED] = asyncio.Event()
    app[GUARD] = ConnectionGuard(limits)
    add_leaf_routes(app)
    add_admin_routes(app)
    add_lifecycle_routes(app)
    add_dashboard_routes(app)
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_close_websockets)
    return app


@web.middleware
async def recovery_gate(request: web.Request,
                        handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Answer API calls 503 with ``Retry-After`` until the rounds are recovered."""
    if request.app[RECOVERED].is_set() or request.path == OPENAPI_PATH or not request.path.startswith(
            (API_PREFIX + "/", ADMIN_PREFIX + "/")):
        return await handler(request)
    response = error_response(503, "branchkey-local is recovering after a restart (aggregating the rounds that were "
                                   "complete when it stopped); ask again in a moment.")
    response.headers["Retry-After"] = str(RECOVERY_RETRY_AFTER_S)
    return response


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Startup: broker, then (listening) recovery and the deadline loop. Cleanup: wait for aggregations, release."""
    server = app[SERVER]
    app[GUARD].fit_to_fd_limit()
    try:
        leaves = await server.blocking(server.store.list_leaves, include_revoked=True)
        active = {leaf.id for leaf in await server.blocking(server.store.list_leaves)}
        await server.notifier.start([lf for lf in leaves if lf.id in active],
                                    revoked=[lf for lf in leaves if lf.id not in active])
    except BaseException:
        await _release(server)
        app[GUARD].close()  # its filter on asyncio's logger goes too
        raise
    recovery = asyncio.ensure_future(_recover(server, app[RECOVERED]))
    yield
    recovery.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await recovery
    server.rounds.cancel_retries()
    await server.workers.wait_for_tasks()
    await _release(server)
    app[GUARD].close()


async def _recover(server: Server, recovered: asyncio.Event) -> None:
    """Recover the rounds (requests wait behind :func:`recovery_gate`), open the gate, then watch deadlines."""
    started = asyncio.get_running_loop().time()
    try:
        await server.rounds.recover()
        await server.analytics.recover()
    except Exception:  # the server still serves what it has: a branch that failed stays as it was
        logger.exception("recovering the rounds after the start failed; serving the store as it is")
    took = asyncio.get_running_loop().time() - started
    logger.log(logging.INFO if took >= 1 else logging.DEBUG, "rounds recovered in %.1f s", took)
    recovered.set()
    await asyncio.gather(server.rounds.deadline_loop(), server.analytics.deadline_loop())


async def _release(server: Server) -> None:
    await server.notifier.close()
    server.workers.shutdown()
    server.store.close()


async def _close_websockets(app: web.Application) -> None:
    for socket in app[SERVER].notifier.all_sockets():
        await socket.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")


__all__ = [
    "create_app", "ServerConfig", "Server", "HttpProblem", "SERVER", "RECOVERED", "DEFAULT_MAX_UPLOAD_BYTES",
    "GuardedAppRunner", "recovery_gate",
]
