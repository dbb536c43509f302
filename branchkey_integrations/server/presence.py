"""Who is connected: each leaf's notification channels and when the server last heard from it.

:class:`Presence` is fed by one-line hooks: the WebSocket route says when a leaf's socket opens
and closes, authentication says when a leaf made any call (its "last seen"), and the dashboard
reports, from the broker's management API, how many consumers each leaf's AMQP queue has. It
keeps this in memory only (a restart forgets it: leaves reconnect within seconds), and tells the
:class:`~branchkey_integrations.server.events.EventHub` when a leaf's connection state changes.
Leaves are keyed by id; no token is ever held here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable

from aiohttp import web

from .events import EventHub
from .records import Leaf


@dataclass
class LeafPresence:
    websockets: int = 0
    amqp_consumers: int | None = None  # None: no broker, or not asked yet
    last_seen: float | None = None


class Presence:
    """Connection state per leaf id, in memory; emits ``presence`` events on changes."""

    def __init__(self, events: EventHub | None = None) -> None:
        self._events = events
        self._leaves: dict[str, LeafPresence] = {}

    def _get(self, leaf_id: str) -> LeafPresence:
        return self._leaves.setdefault(leaf_id, LeafPresence())

    def seen(self, leaf: Leaf) -> None:
        """The leaf made an authenticated call just now."""
        self._get(leaf.id).last_seen = time.time()

    def websocket_opened(self, leaf: Leaf) -> None:
        state = self._get(leaf.id)
        state.websockets += 1
        state.last_seen = time.time()
        self._emit(leaf, "websocket", state.websockets)

    def websocket_closed(self, leaf: Leaf) -> None:
        state = self._get(leaf.id)
        state.websockets = max(0, state.websockets - 1)
        state.last_seen = time.time()
        self._emit(leaf, "websocket", state.websockets)

    def set_amqp_consumers(self, leaves: Iterable[Leaf], consumers: dict[str, int]) -> None:
        """Record the consumer count of each leaf's queue (queue name = leaf id); emit changes."""
        for leaf in leaves:
            state = self._get(leaf.id)
            count = consumers.get(leaf.id, 0)
            if state.amqp_consumers != count:
                state.amqp_consumers = count
                self._emit(leaf, "amqp", count)

    def of(self, leaf_id: str) -> dict[str, Any]:
        """``{"websocket": bool, "amqp": bool | None, "last_seen": epoch s | None}`` for one leaf."""
        state = self._leaves.get(leaf_id) or LeafPresence()
        amqp = None if state.amqp_consumers is None else state.amqp_consumers > 0
        return {"websocket": state.websockets > 0, "amqp": amqp, "last_seen": state.last_seen}

    def _emit(self, leaf: Leaf, transport: str, count: int) -> None:
        if self._events is not None:
            self._events.emit("presence", leaf.branch_id, leaf=leaf.name, transport=transport, connected=count > 0)


PRESENCE = web.AppKey("presence", Presence)


def presence_of(request: web.Request) -> Presence:
    """The app's tracker (the WebSocket route reports to it)."""
    return request.app[PRESENCE]


__all__ = ["Presence", "LeafPresence", "PRESENCE", "presence_of"]
