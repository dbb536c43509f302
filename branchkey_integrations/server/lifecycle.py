"""The leaf lifecycle and the admin token over the admin API, and the audit trail of admin actions.

Routes (``Authorization: Bearer {admin_token}``):

- ``POST /admin/v1/branches/{branch_id}/leaves/{leaf}/revoke`` (``{"drop_upload": bool, "note": text}``):
  the leaf (id or name) is refused at once on every leaf route (its bearer token and its WebSocket
  tickets), its WebSocket is closed (code 1008), its RabbitMQ user and queue are deleted (so its AMQP
  login fails and an open AMQP connection is closed by the broker), and its upload in the open round is
  kept (default) or dropped. The open round then needs one leaf fewer, and is aggregated if that
  completes it;
- ``POST .../leaves/{leaf}/rotate``: a new session token (answered in the leaf's credentials); the old one
  is refused at once, the leaf's WebSocket closed, its RabbitMQ password set to the new token;
- ``POST /admin/v1/admin-token/rotate``: a new admin token (answered once, and written to
  ``<data_dir>/admin_token``); the old one is refused, dashboard sessions end;
- ``GET /admin/v1/audit?after=ID&limit=N``: the audit trail, oldest first (``?latest=N``: the latest N).

Leaves are added with ``POST .../branches/{branch_id}/leaves`` (:mod:`.admin`). Every admin action that
changes something is recorded with :func:`record_action` (time, action, target, the caller's address,
a detail without secrets: :mod:`.store_audit`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Awaitable, Callable, cast

from aiohttp import web

from ..core.errors import BrokerError, LocalServerError, RecordNotFoundError
from ..core.protocol import ADMIN_PREFIX
from .events import EVENTS
from .httpio import HttpProblem, is_decimal, ok, read_json_object
from .records import Leaf
from .state import Server, server_of
from .store_audit import MAX_AUDIT_PAGE

logger = logging.getLogger(__name__)

#: how long a revoked or rotated leaf's WebSocket gets to acknowledge the close before it is dropped
CLOSE_TIMEOUT_S = 0.5


def peer_of(request: web.Request) -> str:
    """Where a request came from: the peer address of its connection (a proxy's, behind one)."""
    return request.remote or "unknown"


async def record_action(request: web.Request, server: Server, action: str, target: str, **detail: Any) -> None:
    """Append an admin action to the audit trail (never fails the action: a failure is logged)."""
    try:
        await server.blocking(server.store.record_audit, action, target, peer_of(request), detail)
    except Exception:  # noqa: BLE001 - the action is done; losing its record must not turn it into a 500
        logger.exception("could not record admin action %s on %s in the audit trail", action, target)


def _admin(request: web.Request) -> Server:
    server = server_of(request)
    server.auth.authenticate_admin(request)
    return server


async def end_leaf_sessions(server: Server, leaf: Leaf, reason: str) -> int:
    """Refuse the leaf's unspent WebSocket tickets and close its open sockets; returns how many closed."""
    server.auth.forget_leaf(leaf.id)
    sockets = server.notifier.sockets_of(leaf)
    message = reason.encode()[:120]
    results = await asyncio.gather(*(asyncio.wait_for(ws.close(code=1008, message=message), CLOSE_TIMEOUT_S)
                                     for ws in sockets), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            logger.debug("closing a WebSocket of leaf %s: %s", leaf.id, result)
    return len(sockets)


async def revoke_leaf(request: web.Request) -> web.Response:
    server = _admin(request)
    body = await read_json_object(request)
    drop = body.get("drop_upload", False)
    if not isinstance(drop, bool):
        raise HttpProblem(400, f"Expected drop_upload to be true or false. Received: {drop!r:.80}")
    note = body.get("note") or ""
    if not isinstance(note, str):
        raise HttpProblem(400, f"Expected note to be a text for the leaves, or absent. Received: {note!r:.80}")
    branch_id = request.match_info["branch_id"]
    leaf = await server.blocking(server.store.revoke_leaf, branch_id, request.match_info["leaf"])
    closed = await end_leaf_sessions(server, leaf, "leaf revoked")
    broker = await _broker_step(server, lambda: server.notifier.remove_leaf(leaf), leaf, "remove")
    dropped: list[str] = []
    if drop:
        with contextlib.suppress(RecordNotFoundError):  # no upload in the open round: nothing to drop
            result = await server.rounds.drop_uploads(branch_id, leaf.id, note=note or "leaf revoked")
            dropped = [str(name) for name in cast(list, result["dropped"])]
        await server.analytics.drop_uploads(branch_id, leaf.id)  # its upload to an open analytics round too
    try:  # the round may need one leaf fewer now (of either kind)
        await server.analytics.aggregate_if_ready(branch_id)
        aggregated = await server.rounds.aggregate_if_ready(branch_id)
    except LocalServerError as exc:  # the revocation stands; the next upload or deadline tries again
        logger.error("branch %s: aggregating after revoking leaf %s failed: %s", branch_id, leaf.name, exc)
        aggregated = None
    await record_action(request, server, "leaf.revoke", leaf.id, branch_id=branch_id, leaf=leaf.name,
                        drop_upload=drop, dropped=dropped, note=note)
    return ok({"leaf": leaf.public(), "websockets_closed": closed, "amqp": broker, "dropped": dropped,
               "aggregated": aggregated})


async def rotate_leaf(request: web.Request) -> web.Response:
    server = _admin(request)
    branch_id = request.match_info["branch_id"]
    leaf = await server.blocking(server.store.rotate_leaf, branch_id, request.match_info["leaf"])
    closed = await end_leaf_sessions(server, leaf, "leaf credentials rotated")
    broker = await _broker_step(server, lambda: server.notifier.provision([leaf]), leaf, "update")
    await record_action(request, server, "leaf.rotate", leaf.id, branch_id=branch_id, leaf=leaf.name)
    return ok({"leaf": leaf.credentials(), "websockets_closed": closed, "amqp": broker})


async def _broker_step(server: Server, step: Callable[[], Awaitable[Any]], leaf: Leaf, what: str) -> str:
    """Run a broker step of a revocation or rotation: "done", "none" (no broker) or why it failed (the store
    already refuses the leaf; repeating the revocation is refused, so the message names the leaf to clean up)."""
    if not server.notifier.amqp_enabled:
        return "none"
    try:
        await step()
    except BrokerError as exc:
        logger.error("RabbitMQ: could not %s leaf %s (%s): %s", what, leaf.name, leaf.id, exc)
        return f"failed: {exc}"
    return "done"


async def rotate_admin_token(request: web.Request) -> web.Response:
    server = _admin(request)
    token = await server.blocking(server.store.rotate_admin_token)
    request.app[EVENTS].close()  # open dashboard streams end; the page asks for the new token
    await record_action(request, server, "admin_token.rotate", "admin")
    return ok({"token": token, "token_file": str(server.store.data_dir / "admin_token")})


async def list_audit(request: web.Request) -> web.Response:
    """One page of the audit trail, oldest first: ``?limit=N`` entries (default 100, at most
    :data:`~.store_audit.MAX_AUDIT_PAGE`) after entry ``?after=`` (the previous page's ``next``)."""
    server = _admin(request)
    if "latest" in request.query:  # the dashboard's view: the latest N, oldest first
        latest = request.query["latest"]
        if not is_decimal(latest) or not 1 <= int(latest) <= MAX_AUDIT_PAGE:
            raise HttpProblem(400, f"Expected ?latest= a count from 1 to {MAX_AUDIT_PAGE}. Received: {latest[:40]!r}")
        return ok({"entries": await server.blocking(server.store.latest_audit, int(latest)), "next": None})
    after, limit = request.query.get("after", "0"), request.query.get("limit", "100")
    if not is_decimal(after) or not is_decimal(limit) or not 1 <= int(limit) <= MAX_AUDIT_PAGE \
            or len(after) > 18:
        raise HttpProblem(400, f"Expected ?after= an entry id (0: from the start, at most 18 digits) and ?limit= a "
                               f"count from 1 to {MAX_AUDIT_PAGE}. Received: after={after[:40]!r}, limit={limit[:40]!r}")
    page = int(limit)
    entries = await server.blocking(server.store.list_audit, after=int(after), limit=page)
    return ok({"entries": entries, "next": entries[-1]["id"] if len(entries) == page else None})


def add_lifecycle_routes(app: web.Application) -> None:
    leaf = ADMIN_PREFIX + "/branches/{branch_id}/leaves/{leaf}"
    app.router.add_post(leaf + "/revoke", revoke_leaf)
    app.router.add_post(leaf + "/rotate", rotate_leaf)
    app.router.add_post(ADMIN_PREFIX + "/admin-token/rotate", rotate_admin_token)
    app.router.add_get(ADMIN_PREFIX + "/audit", list_audit)


__all__ = ["add_lifecycle_routes", "record_action", "peer_of", "end_leaf_sessions"]
