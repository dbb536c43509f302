"""Connection hygiene of branchkey-local: no client, idle, slow or anonymous, can starve the server.

What this module owns:

- a cap on open connections (:attr:`ConnectionLimits.max_connections`), fitted below the process's
  open-files limit at start-up (the soft ``RLIMIT_NOFILE`` is first raised to the hard one), so the
  accept loop never runs out of descriptors;
- identified and unidentified connections. A connection is identified once a request on it
  carries valid credentials: a leaf's bearer token, the admin token, a valid signed download URL or
  a WebSocket ticket (:func:`claim_connection`, :func:`trust_connection`). Until then it is
  *unidentified* however far its request got: waiting for headers, sending a body (the dashboard
  login's, or any body of a request refused 401), or kept alive after its answer;
- slots kept for identified clients: unidentified connections may fill at most ``max_connections -
  reserved_connections`` slots; a new connection beyond that evicts the oldest of them, so a flood of
  idle sockets or of stalled bodies cannot keep out a client that identifies itself at once;
- a short timeout for the unidentified: a connection not identified within ``header_timeout_s`` of
  its accept (or of the end of its previous request) is closed, whatever it is doing; identified
  uploads have ``upload_idle_timeout_s`` instead (kept here with the other limits, applied by
  :mod:`~branchkey_integrations.server.uploads`);
- a cap per leaf (``max_connections_per_leaf``, answered 429) counted on the connections a leaf's
  credentials (or WebSocket ticket) were used on;
- bounded logging: refusals, evictions, timeouts and requests whose client went away mid-request
  (INFO, answered nothing: never a 500 and its traceback) are summed and logged at most once per
  ``LOG_INTERVAL_S``, and asyncio's own "socket.accept() out of system resource" line likewise.

The guard wraps aiohttp's protocol factory (:class:`GuardedAppRunner`), so it sees every accepted
socket before aiohttp does; a connection it refuses never reaches aiohttp. Its middleware
(:func:`guard_middleware`, inside the error middleware) sees each request.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, cast

from aiohttp import ClientPayloadError, web

from .httpio import HttpProblem, error_response
from .uploads import DEFAULT_UPLOAD_IDLE_TIMEOUT_S, MANY_CONNECTIONS, small_socket_reads

logger = logging.getLogger(__name__)

LOG_INTERVAL_S = 10.0
#: descriptors kept free for the store, upload files, the broker and worker threads
FD_HEADROOM = 100
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_MAX_CONNECTIONS = 1000
DEFAULT_MAX_CONNECTIONS_PER_LEAF = 32
DEFAULT_RESERVED_CONNECTIONS = 32


@dataclass(frozen=True)
class ConnectionLimits:
    """How many connections the server holds and how long it waits for a client; checked once."""

    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    upload_idle_timeout_s: float = DEFAULT_UPLOAD_IDLE_TIMEOUT_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connections_per_leaf: int = DEFAULT_MAX_CONNECTIONS_PER_LEAF
    reserved_connections: int = DEFAULT_RESERVED_CONNECTIONS

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "upload_idle_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"Expected {name} to be a number of seconds > 0. Received: {name}={value!r}")
        for name in ("max_connections", "max_connections_per_leaf", "reserved_connections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "reserved_connections" else 1):
                raise ValueError(f"Expected {name} to be a positive integer. Received: {name}={value!r}")
        if self.reserved_connections >= self.max_connections:
            raise ValueError(
                f"Expected reserved_connections ({self.reserved_connections}) below max_connections "
                f"({self.max_connections}): the rest are the slots for new, not yet identified clients."
            )


#: what a request handler meets when its client's connection is gone (a reset, a body cut short)
CLIENT_GONE_ERRORS = (ConnectionError, ClientPayloadError, asyncio.IncompleteReadError)


class _BoundedLog:
    """Counts events of one kind and logs their sum at most once per ``interval_s``."""

    def __init__(self, text: str, interval_s: float = LOG_INTERVAL_S, level: int = logging.WARNING) -> None:
        self.text = text
        self.interval_s = interval_s
        self.level = level
        self.count = 0
        self.total = 0
        self._last = float("-inf")
        self._flush: asyncio.TimerHandle | None = None

    def note(self, detail: str = "") -> None:
        self.count += 1
        self.total += 1
        self.detail = detail
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self.flush()
        elif self._flush is None:
            loop = asyncio.get_running_loop()
            self._flush = loop.call_later(self._last + self.interval_s - now, self.flush)

    def flush(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self.count:
            logger.log(self.level, "%s: %d in the last %g s (%d since start)%s", self.text, self.count,
                       self.interval_s, self.total, f"; {self.detail}" if self.detail else "")
            self.count = 0
            self._last = time.monotonic()

    def close(self) -> None:
        self.flush()


class _AcceptErrorFilter(logging.Filter):
    """Lets asyncio's "socket.accept() out of system resource" through once per interval, counted."""

    def __init__(self, interval_s: float = LOG_INTERVAL_S) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._last = float("-inf")
        self._suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("socket.accept() out of system resource"):
            return True
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._suppressed += 1
            return False
        record.msg = f"{record.msg} ({self._suppressed} more in the last {self.interval_s:g} s not logged)"
        record.exc_info = None  # the traceback is the same every time
        self._last, self._suppressed = now, 0
        return True


class _Connection(asyncio.Protocol):
    """One accepted socket: admitted (or refused) by the guard, then handed to aiohttp's protocol."""

    def __init__(self, guard: "ConnectionGuard", inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.admitted = False
        self.leaf_id: str | None = None
        self.trusted = False  # the admin, or a valid signed download: kept like a leaf's connection
        self.dropped = False  # closed by the guard (evicted, timed out), not by its client
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.guard.admit(self):
            self.admitted = True
            self.inner.connection_made(transport)
        else:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.admitted:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.admitted else None

    def pause_writing(self) -> None:
        if self.admitted:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.admitted:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.forget(self)
        if self.admitted:
            self.inner.connection_lost(exc)


class ConnectionGuard:
    """Admits, times out and counts the connections of one server (see the module docstring)."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.max_connections = limits.max_connections
        self._pending: OrderedDict[_Connection, None] = OrderedDict()  # not identified yet, oldest first
        self._open: set[_Connection] = set()
        self._by_transport: dict[Any, _Connection] = {}
        self._per_leaf: dict[str, set[_Connection]] = {}
        self._refused = _BoundedLog("connections refused at the cap")
        self._evicted = _BoundedLog("connections of clients not identified closed to make room")
        self._timed_out = _BoundedLog("connections of clients not identified closed by the header timeout")
        self._gone = _BoundedLog("requests ended early: the client disconnected", level=logging.INFO)
        self._accept_filter = _AcceptErrorFilter()

    # -- start-up -------------------------------------------------------------------------

    def fit_to_fd_limit(self) -> int:
        """Raise the soft open-files limit to the hard one, and cap connections below it; returns the cap.

        Windows has no such limit (nor the ``resource`` module): the cap stays ``max_connections``.
        """
        if sys.platform != "win32":
            import resource

            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            if hard == resource.RLIM_INFINITY or soft < hard:
                target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
                try:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                    soft = target
                except (ValueError, OSError) as exc:
                    logger.warning("could not raise the open-files limit from %d to %d: %s", soft, target, exc)
            usable = max(soft - FD_HEADROOM, self.limits.reserved_connections + 1)
            if usable < self.limits.max_connections:
                logger.warning("open-files limit %d: serving at most %d connections (max_connections %d)",
                               soft, usable, self.limits.max_connections)
            self.max_connections = min(self.limits.max_connections, usable)
        logging.getLogger("asyncio").addFilter(self._accept_filter)
        return self.max_connections

    def close(self) -> None:
        logging.getLogger("asyncio").removeFilter(self._accept_filter)
        for log in (self._refused, self._evicted, self._timed_out, self._gone):
            log.close()

    # -- admission ------------------------------------------------------------------------

    @property
    def open_connections(self) -> int:
        return len(self._open)

    @property
    def pending_connections(self) -> int:
        return len(self._pending)

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory that puts the guard in front of ``factory``'s protocols."""
        return lambda: _Connection(self, factory())

    def admit(self, conn: _Connection) -> bool:
        pending_cap = self.max_connections - self.limits.reserved_connections
        if len(self._pending) >= pending_cap or len(self._open) >= self.max_connections:
            if not self._pending:
                self._refused.note(f"{len(self._open)} open, all of identified clients")
                return False
            oldest = next(iter(self._pending))
            self._evicted.note(f"cap {self.max_connections}, {pending_cap} for clients not yet identified")
            self._drop(oldest)
        self._open.add(conn)
        if len(self._open) > MANY_CONNECTIONS:  # many leaves at once: bound what each one's socket reads buffer
            small_socket_reads(conn.transport)
        self._pending[conn] = None
        self._by_transport[conn.transport] = conn
        loop = asyncio.get_running_loop()
        conn.timer = loop.call_later(self.limits.header_timeout_s, self._header_timeout, conn)
        return True

    def _header_timeout(self, conn: _Connection) -> None:
        if conn in self._pending:
            self._timed_out.note(f"no credentials within {self.limits.header_timeout_s:g} s")
            self._drop(conn)

    def _drop(self, conn: _Connection) -> None:
        conn.dropped = True
        self.forget(conn)
        if conn.transport is not None:
            conn.transport.abort()

    def forget(self, conn: _Connection) -> None:
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        self._pending.pop(conn, None)
        self._open.discard(conn)
        self._by_transport.pop(conn.transport, None)
        if conn.leaf_id is not None:
            self._leave_group(conn)

    def connection_of(self, request: web.Request) -> _Connection | None:
        return self._by_transport.get(request.transport)

    def finished_request(self, conn: _Connection | None) -> None:
        """A request on ``conn`` is done: if its client is still not identified, the header timeout starts
        again and the connection becomes the newest of those that may be evicted."""
        if conn is None or conn not in self._pending:
            return
        self._pending.move_to_end(conn)
        if conn.timer is not None:
            conn.timer.cancel()
        conn.timer = asyncio.get_running_loop().call_later(self.limits.header_timeout_s, self._header_timeout, conn)

    def client_gone(self, conn: _Connection | None, request: web.Request, exc: BaseException) -> bool:
        """Whether ``exc``, raised by the handler of ``request``, only says that its client went away (then it
        is counted, and logged at INFO at most once per interval); False for anything else."""
        transport = request.transport
        if not isinstance(exc, CLIENT_GONE_ERRORS) or (transport is not None and not transport.is_closing()):
            return False
        if conn is None or not conn.dropped:  # the guard's own closes are counted where they happen
            self._gone.note(f"the latest {request.method} {request.path[:80]} from {request.remote}: "
                            f"{type(exc).__name__}")
        return True

    def _identified(self, conn: _Connection) -> None:
        """``conn`` carried valid credentials: it leaves the evictable, timed-out connections for good."""
        self._pending.pop(conn, None)
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None

    def trust(self, request: web.Request) -> None:
        """The request's connection is the admin's (or a signed download's): keep it like a leaf's."""
        conn = self._by_transport.get(request.transport)
        if conn is not None:
            conn.trusted = True
            self._identified(conn)

    def claim(self, request: web.Request, leaf_id: str) -> None:
        """Count the request's connection as ``leaf_id``'s; 429 when the leaf holds its cap already."""
        conn = self._by_transport.get(request.transport)
        if conn is None or conn.leaf_id == leaf_id:
            return
        group = self._per_leaf.setdefault(leaf_id, set())
        if len(group) >= self.limits.max_connections_per_leaf:
            raise HttpProblem(
                429, f"Leaf {leaf_id} already holds {len(group)} connections (the limit is "
                     f"{self.limits.max_connections_per_leaf}); close some or reuse them (keep-alive).",
            )
        if conn.leaf_id is not None:  # one connection used by another leaf before (a proxy): move it
            self._leave_group(conn)
        conn.leaf_id = leaf_id
        group.add(conn)
        self._identified(conn)

    def _leave_group(self, conn: _Connection) -> None:
        group = self._per_leaf.get(conn.leaf_id or "", set())
        group.discard(conn)
        if not group:
            self._per_leaf.pop(conn.leaf_id or "", None)


GUARD = web.AppKey("connection_guard", ConnectionGuard)


@web.middleware
async def guard_middleware(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Restarts an unidentified connection's header timeout after each of its requests, and answers a
    request whose client went away mid-request quietly (it must sit inside the error middleware, which
    would log that as a 500 with its traceback)."""
    guard = request.app.get(GUARD)
    if guard is None:
        return await handler(request)
    conn = guard.connection_of(request)
    try:
        return await handler(request)
    except CLIENT_GONE_ERRORS as exc:
        if not guard.client_gone(conn, request, exc):
            raise
        return error_response(408, "The client disconnected before the request was complete.")  # read by no one
    finally:
        guard.finished_request(conn)


def trust_connection(request: web.Request) -> None:
    """Keep the request's connection like a leaf's: it authenticated as the admin or holds a signed URL."""
    guard = request.app.get(GUARD)
    if guard is not None:
        guard.trust(request)


def claim_connection(request: web.Request, leaf_id: str) -> None:
    """Count the request's connection against ``leaf_id``'s cap (no-op outside a guarded server)."""
    guard = request.app.get(GUARD)
    if guard is not None:
        guard.claim(request, leaf_id)


class GuardedAppRunner(web.AppRunner):
    """An ``AppRunner`` whose sites accept through the app's :class:`ConnectionGuard`.

    Example::

        runner = GuardedAppRunner(create_app(data_dir), handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 8080).start()
    """

    @property
    def server(self) -> Any:
        inner = super().server
        guard = self.app.get(GUARD)
        if inner is None or guard is None:
            return inner
        return guard.wrap(inner)


__all__ = [
    "ConnectionLimits", "ConnectionGuard", "GuardedAppRunner", "GUARD", "guard_middleware", "claim_connection",
    "trust_connection",
    "DEFAULT_HEADER_TIMEOUT_S", "DEFAULT_UPLOAD_IDLE_TIMEOUT_S", "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_CONNECTIONS_PER_LEAF", "DEFAULT_RESERVED_CONNECTIONS",
]
