"""The dashboard's live feed: small events of one server, fanned out to whoever watches.

An :class:`EventHub` is fed by the server's own machinery, with one-line hooks: the notifier
(aggregations and run-status changes, the very messages leaves get), the leaf routes (an upload
accepted or refused, metrics sent) and :mod:`~branchkey_integrations.server.presence` (a leaf's
WebSocket connected or gone). The dashboard's event stream (``/admin/v1/events``) subscribes and
tells the page what changed, so the page refreshes one part when something happens instead of
polling everything.

Events are plain dicts: ``{"kind", "branch_id", "at", ...}``; they name leaves by name and carry no
token. A subscriber that falls behind loses its oldest events and gets one ``{"kind": "overflow"}``
(the page then reloads its data once). Emit only from the event loop's thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web

logger = logging.getLogger(__name__)

#: event kinds, for the page and for scripts that read the stream
KINDS = ("upload", "refused", "aggregation_status", "run_status", "metrics", "presence", "overflow")
_CLOSED: dict[str, Any] = {"kind": "closed"}


class EventHub:
    """In-process publish/subscribe of server events; each subscriber has a bounded queue."""

    def __init__(self, max_queue: int = 1000) -> None:
        self.max_queue = max_queue
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        #: branch id -> how many events it has had (a cache of its history is good while this holds)
        self.versions: dict[str | None, int] = {}

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(self.max_queue)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._subscribers.discard(queue)

    def emit(self, kind: str, branch_id: str | None, **data: Any) -> None:
        """Hand ``{"kind", "branch_id", "at", **data}`` to every subscriber (never blocks, never raises)."""
        self.versions[branch_id] = self.versions.get(branch_id, 0) + 1
        if not self._subscribers:
            return
        event = {"kind": kind, "branch_id": branch_id, "at": time.time(), **data}
        for queue in list(self._subscribers):
            if queue.full():  # a stalled reader: drop what it has not read, tell it to reload once
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait({"kind": "overflow", "branch_id": None, "at": event["at"]})
            queue.put_nowait(event)

    def notification(self, branch_id: str, message: dict[str, Any]) -> None:
        """The notifier's hook: a message sent to a branch's leaves (aggregation, run status)."""
        body = message.get("body")
        fields = {k: v for k, v in body.items() if isinstance(v, (str, int, float, bool)) or v is None} \
            if isinstance(body, dict) else {}
        if "kind" in fields:  # an analytics round's payload kind; "kind" is the event's own
            fields["payload_kind"] = fields.pop("kind")
        self.emit(str(message.get("message_type", "notification")), branch_id, **fields)

    def close(self) -> None:
        """End every stream (server shutdown)."""
        for queue in list(self._subscribers):
            while not queue.empty():
                queue.get_nowait()
            queue.put_nowait(_CLOSED)

    @staticmethod
    def is_closed(event: dict[str, Any]) -> bool:
        return event is _CLOSED


EVENTS = web.AppKey("events", EventHub)


def events_of(request: web.Request) -> EventHub:
    """The app's hub (the leaf routes emit into it)."""
    return request.app[EVENTS]


__all__ = ["EventHub", "EVENTS", "KINDS", "events_of"]
