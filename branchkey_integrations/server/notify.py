"""Notifications: fan-out of the two message types to every leaf of a branch.

Two transports, as in PROTOCOL.md: WebSocket clients connected to this server (always),
and RabbitMQ (when the server was started with an AMQP URL), through
:mod:`branchkey_integrations.server.rabbitmq`, imported only when used so the server runs
without a broker. A transport failure is logged, never raised: a notification that could
not be delivered must not undo an aggregate that was already committed.

WebSocket fan-out is immediate and reaches whoever is connected; a leaf that connects later is
sent what it missed by the WebSocket route (catch-up). AMQP messages go through the durable
:class:`~branchkey_integrations.server.outbox.Outbox` (when the notifier has a store), so one
published while RabbitMQ is down is retried until the broker confirms it, across restarts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, Callable, Iterable

from aiohttp import web

from ..core.errors import BrokerError

if TYPE_CHECKING:  # pragma: no cover
    from .outbox import Outbox
    from .rabbitmq import RabbitMQBroker
    from .store import Leaf, Store

logger = logging.getLogger(__name__)


class Notifier:
    """Delivers notification JSON to a branch's WebSocket clients and, optionally, to RabbitMQ.

    Args:
        executor: where blocking broker calls run (pika is synchronous).
        amqp_url: ``amqp://user:pass@host:5672/``; None disables the AMQP transport.
        amqp_management_url: the RabbitMQ management API (for provisioning vhosts, users, queues).
        amqp_ca: the CA bundle that verifies an ``amqps://`` broker and an ``https://`` management API.
        store: where the AMQP outbox lives; None publishes directly, once (no retry).
    """

    def __init__(
        self, executor: Executor, amqp_url: str | None = None, amqp_management_url: str | None = None,
        store: "Store | None" = None, amqp_ca: str | None = None,
    ) -> None:
        self._store = store
        self._outbox: Outbox | None = None
        self._executor = executor
        self._amqp_url = amqp_url
        self._amqp_management_url = amqp_management_url
        self._amqp_ca = amqp_ca
        self._broker: RabbitMQBroker | None = None
        self._sockets: dict[str, dict[str, set[web.WebSocketResponse]]] = {}
        #: called with (branch_id, message) for every publish (the dashboard's live feed)
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []

    # -- WebSocket registry ---------------------------------------------------------------

    def register(self, leaf: "Leaf", socket: web.WebSocketResponse) -> None:
        self._sockets.setdefault(leaf.branch_id, {}).setdefault(leaf.id, set()).add(socket)
        logger.info("leaf %s (%s) connected over WebSocket", leaf.name, leaf.id)

    def unregister(self, leaf: "Leaf", socket: web.WebSocketResponse) -> None:
        leaves = self._sockets.get(leaf.branch_id, {})
        sockets = leaves.get(leaf.id, set())
        sockets.discard(socket)
        if not sockets:
            leaves.pop(leaf.id, None)
        if not leaves:
            self._sockets.pop(leaf.branch_id, None)
        logger.info("leaf %s (%s) disconnected from WebSocket", leaf.name, leaf.id)

    def connected(self, branch_id: str) -> int:
        """How many sockets of the branch are connected (for tests and status)."""
        return sum(len(s) for s in self._sockets.get(branch_id, {}).values())

    def sockets_of(self, leaf: "Leaf") -> list[web.WebSocketResponse]:
        """The leaf's open WebSockets (a revocation or rotation closes them)."""
        return list(self._sockets.get(leaf.branch_id, {}).get(leaf.id, ()))

    def all_sockets(self) -> list[web.WebSocketResponse]:
        return [ws for leaves in self._sockets.values() for group in leaves.values() for ws in group]

    async def _send_all(self, sockets: Iterable[web.WebSocketResponse], text: str) -> None:
        sockets = [ws for ws in list(sockets) if not ws.closed]
        results = await asyncio.gather(*(ws.send_str(text) for ws in sockets), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                logger.debug("a WebSocket send failed (client gone): %s", result)

    # -- AMQP -----------------------------------------------------------------------------

    @property
    def amqp_enabled(self) -> bool:
        return self._amqp_url is not None

    async def start(self, leaves: Iterable["Leaf"], revoked: Iterable["Leaf"] = ()) -> None:
        """Connect to RabbitMQ (if configured), provision every existing leaf (idempotent) and remove the users of
        ``revoked`` leaves (revoked while no server with a broker ran; missing ones are fine)."""
        if self._amqp_url is None:
            return
        from .rabbitmq import RabbitMQBroker  # lazy: only servers with a broker need pika wiring

        loop = asyncio.get_running_loop()
        broker = await loop.run_in_executor(self._executor, RabbitMQBroker, self._amqp_url, self._amqp_management_url,
                                            self._amqp_ca)
        await loop.run_in_executor(self._executor, broker.check)  # a misconfigured broker fails the start, not a round
        self._broker = broker
        await self.provision(leaves)
        for leaf in revoked:
            await self.remove_leaf(leaf)
        if self._store is not None:
            from .outbox import Outbox
            from .workers import Workers

            self._outbox = Outbox(self._store, Workers(self._executor), broker.publish)  # type: ignore[arg-type]
            await self._outbox.requeue_unannounced()  # committed, then the server died before queuing it
            self._outbox.start()  # rows left by the last run go out now

    async def provision(self, leaves: Iterable["Leaf"]) -> None:
        """Create the vhost, user, exchange and queue of each leaf; a failure here is fatal for the caller."""
        if self._broker is None:
            return
        loop = asyncio.get_running_loop()
        for leaf in leaves:
            await loop.run_in_executor(
                self._executor, self._broker.provision_leaf, leaf.tree_id, leaf.branch_id, leaf.id, leaf.session_token
            )
            logger.info("provisioned AMQP queue for leaf %s (%s)", leaf.name, leaf.id)

    async def forget_tree(self, tree_id: str, leaves: Iterable["Leaf"]) -> bool:
        """Delete the tree's broker state: each leaf's user and queue, then the tree's vhost.

        Returns False when the server has no broker (nothing to delete). Raises BrokerError when
        RabbitMQ refuses; missing pieces are fine, so a repeat succeeds.
        """
        if self._broker is None:
            return False
        loop = asyncio.get_running_loop()
        for leaf in leaves:
            await loop.run_in_executor(self._executor, self._broker.remove_leaf, tree_id, leaf.id)
        await loop.run_in_executor(self._executor, self._broker.remove_tree, tree_id)
        logger.info("removed tree %s from RabbitMQ", tree_id)
        return True

    async def remove_leaf(self, leaf: "Leaf") -> None:
        """Delete the leaf's RabbitMQ user and queue (a revocation); RabbitMQ closes the user's connections."""
        if self._broker is None:
            return
        await asyncio.get_running_loop().run_in_executor(self._executor, self._broker.remove_leaf, leaf.tree_id, leaf.id)

    async def amqp_consumers(self, tree_id: str) -> dict[str, int]:
        """Consumers per leaf queue of a tree ({} without a broker); raises BrokerError when RabbitMQ fails."""
        if self._broker is None:
            return {}
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._broker.queue_consumers, tree_id)

    async def _publish_amqp(self, tree_id: str, branch_id: str, message: dict[str, Any]) -> None:
        if self._broker is None:
            return
        if self._outbox is not None:
            try:
                await self._outbox.add(tree_id, branch_id, message)
                return
            except (sqlite3.Error, OSError) as exc:  # e.g. a full disk: still try the broker once, directly
                logger.error("could not store the AMQP %s for branch %s in the outbox (%s); publishing once",
                             message["message_type"], branch_id, exc)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._broker.publish, tree_id, branch_id, message)
        except BrokerError as exc:
            logger.error("AMQP publish of %s to branch %s failed: %s", message["message_type"], branch_id, exc)

    async def close(self) -> None:
        if self._outbox is not None:
            outbox, self._outbox = self._outbox, None
            await outbox.close()
        if self._broker is not None:
            broker, self._broker = self._broker, None
            await asyncio.get_running_loop().run_in_executor(self._executor, broker.close)

    # -- fan-out --------------------------------------------------------------------------

    async def publish(self, tree_id: str, branch_id: str, message: dict[str, Any]) -> None:
        """Send ``message`` to every connected leaf of the branch and to its AMQP exchange."""
        sockets = [ws for group in self._sockets.get(branch_id, {}).values() for ws in group]
        logger.info("notify branch %s: %s to %d socket(s)%s", branch_id, message["message_type"], len(sockets),
                    " and AMQP" if self._broker is not None else "")
        for listen in self.listeners:
            listen(branch_id, message)
        await asyncio.gather(self._send_all(sockets, json.dumps(message)), self._publish_amqp(tree_id, branch_id, message))


__all__ = ["Notifier"]
