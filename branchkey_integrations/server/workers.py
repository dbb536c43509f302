"""Where branchkey-local's blocking work runs, and the background tasks shutdown waits for.

SQLite, archive decoding, hashing and aggregation block; they run on one thread pool so the
event loop keeps serving. Work started after an answer has gone out (aggregation, removing
replaced files) is kept referenced here, so it is neither garbage-collected mid-flight nor cut
off by a shutdown that did not wait for it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Workers:
    """A thread pool for blocking calls plus the set of running background tasks."""

    def __init__(self, executor: ThreadPoolExecutor) -> None:
        self.executor = executor
        self._tasks: set[asyncio.Task[Any]] = set()

    async def blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run blocking work (SQLite, archives, aggregation) in a worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    def spawn(self, coro: Awaitable[T]) -> "asyncio.Future[T]":
        """Run ``coro`` in the background; kept referenced so shutdown can wait for it. Returns its task."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("background task failed", exc_info=task.exception())

    async def wait_for_tasks(self, timeout: float = 60.0) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True)


__all__ = ["Workers"]
