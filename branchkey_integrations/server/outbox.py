"""The AMQP outbox: every notification for RabbitMQ is a row in the store until the broker confirms it.

A notification is written to the store's ``outbox`` table first; a publisher task sends the due
rows with publisher confirms (:meth:`RabbitMQBroker.publish` returns only once the broker has the
message) and deletes each row once confirmed. A row that fails (broker down, connection lost,
refused) is tried again after a backoff that doubles from ``RETRY_BASE_S`` up to ``RETRY_MAX_S``;
rows left when the server stops are sent after the next start. So a round that completes while
RabbitMQ is down reaches the leaves' durable queues once it is back: delivery is at least once (the
official clients keep the newest aggregation id, so a repeat is harmless). A row whose branch no
longer exists (its tree was deleted) is dropped, as no one could receive it, and so is one still
unconfirmed after ``MAX_AGE_S`` (a day). The aggregate a server committed but died before queuing
is found at the next start (:meth:`Outbox.requeue_unannounced`: the store records each branch's
last queued aggregate in the same transaction as the row).

Failures are logged once when a row first fails, then every ``LOG_EVERY`` attempts, and once when it
finally goes through; a long outage costs a few lines, not one per attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any, Callable

from ..core.errors import BrokerError
from ..core.protocol import AGGREGATION_STATUS, aggregation_message
from .store import Store
from .workers import Workers

logger = logging.getLogger(__name__)

RETRY_BASE_S = 0.5
RETRY_MAX_S = 10.0
#: a row not confirmed within this long is dropped (no leaf waits a day; a tree whose broker state was
#: removed while its branch stayed would otherwise be retried forever)
MAX_AGE_S = 24 * 3600.0
LOG_EVERY = 20

Publish = Callable[[str, str, dict[str, Any]], None]


def backoff_s(attempts: int, base_s: float = RETRY_BASE_S, max_s: float = RETRY_MAX_S) -> float:
    """Seconds before try ``attempts + 1`` of a row that failed ``attempts`` times (1 or more)."""
    return min(base_s * 2 ** max(attempts - 1, 0), max_s)


class Outbox:
    """Sends the store's outbox rows through ``publish`` (blocking, in a worker thread) until confirmed.

    Args:
        store: where the rows live.
        workers: the thread pool for the store and the blocking publish.
        publish: ``publish(tree_id, branch_id, message)``; returns once confirmed, raises BrokerError.
        max_backoff_s: the longest wait between two tries of a row.
    """

    def __init__(self, store: Store, workers: Workers, publish: Publish, *, max_backoff_s: float = RETRY_MAX_S) -> None:
        self.store = store
        self.workers = workers
        self.publish = publish
        self.max_backoff_s = max_backoff_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the publisher; rows left by an earlier run are due at once."""
        self._task = asyncio.ensure_future(self._run())

    async def add(self, tree_id: str, branch_id: str, message: dict[str, Any]) -> int:
        """Store ``message`` for the branch's exchange; the publisher sends it right away."""
        body = message.get("body") or {}
        aggregate_id = body.get("aggregation_id") if message.get("message_type") == AGGREGATION_STATUS else None
        row_id = await self.workers.blocking(self.store.add_outbox, tree_id, branch_id, json.dumps(message),
                                             aggregate_id=aggregate_id)
        self._wake.set()
        return row_id

    async def requeue_unannounced(self) -> int:
        """Queue the aggregates committed but never queued (the server died between the two); returns how many."""
        missed = await self.workers.blocking(self.store.unannounced_aggregates)
        for tree_id, branch_id, aggregate_id, run_number, round_index in missed:
            logger.info("aggregate %s of branch %s (run %d round %d) was never queued for RabbitMQ: queuing it now",
                        aggregate_id, branch_id, run_number, round_index)
            await self.add(tree_id, branch_id, aggregation_message(aggregate_id, run_number, round_index))
        return len(missed)

    async def close(self) -> None:
        """Stop the publisher; unsent rows stay in the store for the next start."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.send_due()
                next_try = await self.workers.blocking(self.store.next_outbox_try)
            except asyncio.CancelledError:
                raise
            except Exception:  # the publisher must outlive one bad row or a store hiccup
                logger.exception("the AMQP outbox publisher failed; trying again")
                next_try = time.time() + self.max_backoff_s
            timeout = None if next_try is None else max(next_try - time.time(), 0.0)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def send_due(self) -> int:
        """Publish every due row once; returns how many the broker confirmed."""
        sent = 0
        for row in await self.workers.blocking(self.store.due_outbox):
            message = json.loads(row["message"])
            try:
                await self.workers.blocking(self.publish, row["tree_id"], row["branch_id"], message)
            except BrokerError as exc:
                await self._failed(row, message, exc)
                continue
            await self.workers.blocking(self.store.outbox_sent, row["id"])
            sent += 1
            if row["attempts"]:
                logger.info("AMQP %s to branch %s confirmed after %d failed attempt(s) over %.1f s",
                            message.get("message_type"), row["branch_id"], row["attempts"], time.time() - row["created"])
        return sent

    async def _failed(self, row: dict[str, Any], message: dict[str, Any], exc: BrokerError) -> None:
        attempts = row["attempts"] + 1
        if await self.workers.blocking(self.store.get_branch, row["branch_id"]) is None:
            await self.workers.blocking(self.store.outbox_sent, row["id"])
            logger.info("dropped an AMQP %s to branch %s: the branch no longer exists",
                        message.get("message_type"), row["branch_id"])
            return
        if time.time() - row["created"] > MAX_AGE_S:
            await self.workers.blocking(self.store.outbox_sent, row["id"])
            logger.warning("dropped an AMQP %s to branch %s after %d attempts over %.0f h: %s",
                           message.get("message_type"), row["branch_id"], attempts, MAX_AGE_S / 3600, exc)
            return
        delay = backoff_s(attempts, max_s=self.max_backoff_s)
        await self.workers.blocking(self.store.outbox_failed, row["id"], time.time() + delay, str(exc))
        if attempts == 1 or attempts % LOG_EVERY == 0:
            logger.warning("AMQP publish of %s to branch %s failed (attempt %d; kept, next try in %.1f s): %s",
                           message.get("message_type"), row["branch_id"], attempts, delay, exc)


__all__ = ["Outbox", "backoff_s", "RETRY_BASE_S", "RETRY_MAX_S", "MAX_AGE_S"]
