"""Who may call branchkey-local: leaf and admin bearer tokens, signed download URLs, WebSocket tickets.

- Leaves send ``Authorization: Bearer {leaf_id}:{session_token}`` (PROTOCOL.md); the admin API
  takes ``Bearer {admin_token}`` (the token in ``<data_dir>/admin_token``). Both are compared
  timing-safe, and an unknown leaf costs as much as a wrong token.
- A download hands out a URL signed with the store's secret that expires; the blob route then
  needs no credentials, as the official clients fetch it without any.
- A WebSocket connection needs a ticket (one use, short-lived), as the 3.x platform does.

Failures are HTTP's own business (401, 403), so they are raised as
:class:`~branchkey_integrations.server.httpio.HttpProblem`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Callable

from aiohttp import web

from .connections import claim_connection, trust_connection
from .httpio import HttpProblem, is_decimal
from .records import Leaf
from .store import Store
from .workers import Workers


@dataclass(frozen=True)
class Ticket:
    id: str
    leaf: Leaf
    request_id: str
    expires_at: float


class Auth:
    """Checks credentials, signs download URLs, and holds the WebSocket tickets of one server."""

    def __init__(self, store: Store, workers: Workers, *, ticket_ttl_s: int) -> None:
        self.store = store
        self.workers = workers
        self.ticket_ttl_s = ticket_ttl_s
        self.tickets: dict[str, Ticket] = {}
        self._dummy_token = secrets.token_urlsafe(32)
        self.on_leaf: Callable[[Leaf], None] | None = None  # the dashboard's last-seen hook

    # -- bearer tokens --------------------------------------------------------------------

    async def authenticate(self, request: web.Request) -> Leaf:
        """The leaf of ``Authorization: Bearer {leaf_id}:{session_token}``, compared timing-safe."""
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        leaf_id, sep, token = value.strip().partition(":")
        if scheme.lower() != "bearer" or not sep or not leaf_id or not token or not header.isascii():
            raise HttpProblem(401, "Missing or malformed Authorization header; expected 'Bearer <leaf_id>:<session_token>'.")
        leaf = await self.workers.blocking(self.store.get_leaf, leaf_id) if len(leaf_id) <= 128 else None
        expected = leaf.session_token if leaf is not None else self._dummy_token
        if not hmac.compare_digest(token.encode(), expected.encode()) or leaf is None:
            raise HttpProblem(401, "Unknown leaf id or wrong session token; use the leaf's credentials file.")
        claim_connection(request, leaf.id)  # 429 past the per-leaf connection cap
        if self.on_leaf is not None:
            self.on_leaf(leaf)
        return leaf

    def authenticate_admin(self, request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not header.isascii() \
                or not hmac.compare_digest(token.strip().encode(), self.store.admin_token.encode()):
            raise HttpProblem(401, "Admin API needs 'Authorization: Bearer <admin token>' (see <data_dir>/admin_token).")
        trust_connection(request)  # the admin's connection keeps its slot

    # -- signed download URLs -------------------------------------------------------------

    def sign(self, file_id: str, expires: int) -> str:
        return hmac.new(self.store.secret, f"{file_id}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def check_signature(self, file_id: str, expires: str, signature: str) -> None:
        if not is_decimal(expires) or not hmac.compare_digest(self.sign(file_id, int(expires)).encode(), signature.encode()):
            raise HttpProblem(403, "Download URL signature is invalid; ask /api/v1/file/download/{file_id} for a new URL.")
        if int(expires) < time.time():
            raise HttpProblem(403, "Download URL has expired; ask /api/v1/file/download/{file_id} for a new one.")

    # -- WebSocket tickets ----------------------------------------------------------------

    def issue_ticket(self, leaf: Leaf) -> Ticket:
        """A new single-use ticket for ``leaf``; expired ones are dropped on the way."""
        now = time.time()
        for ticket_id in [t for t, v in self.tickets.items() if v.expires_at < now]:
            del self.tickets[ticket_id]
        ticket_id, request_id = secrets.token_urlsafe(24), secrets.token_urlsafe(12)
        self.tickets[ticket_id] = ticket = Ticket(ticket_id, leaf, request_id, now + self.ticket_ttl_s)
        return ticket

    def forget_leaf(self, leaf_id: str) -> None:
        """Spend every unused ticket of the leaf (revoked or rotated: its tickets die with its token)."""
        for ticket_id in [t for t, v in self.tickets.items() if v.leaf.id == leaf_id]:
            del self.tickets[ticket_id]

    def redeem_ticket(self, ticket_id: str, request_id: str) -> Leaf:
        """The leaf of a valid, unused, unexpired ticket, which is spent.

        An attempt with the wrong ``request_id`` leaves the ticket to its holder: whoever saw only the
        ticket id (in a log, a proxy) cannot use up the real holder's ticket.
        """
        ticket = self.tickets.get(ticket_id)
        if ticket is not None and ticket.expires_at < time.time():
            del self.tickets[ticket_id]
            ticket = None
        if ticket is None or not hmac.compare_digest(request_id.encode(), ticket.request_id.encode()):
            raise HttpProblem(401, "WebSocket needs a valid, unused, unexpired ticket; get one from POST /api/v1/ws/ticket.")
        del self.tickets[ticket_id]
        return ticket.leaf


__all__ = ["Auth", "Ticket"]
