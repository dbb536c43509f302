"""The one budget that keeps a server's receipt in step with its memory and its aggregation.

Uploads arrive faster than a server can check and fold them when many leaves finish at once.
Buffering them (or letting their checks and folds queue) would make memory and the wait after
the last upload grow with the number of leaves; instead, every upload body being received and
every received upload not yet refused or folded into its round's running sum draws on one
:class:`ByteBudget`, and receipt stops reading sockets while it is spent: TCP backpressure on
the clients, however many there are.
"""

from __future__ import annotations

import asyncio
import weakref

#: bytes one server takes on at most before receipt waits: upload bodies held in memory, all
#: connections together, plus received uploads not yet refused or folded (see :class:`ByteBudget`)
MAX_BYTES_IN_FLIGHT = 16 << 20


class ByteBudget:
    """Bytes that one event loop's (one server's) uploads hold or owe.

    ``used``: bytes of bodies read and not yet written; an upload counts what it read until a worker
    has written it. ``owed``: bytes of uploads received in full and not yet refused or folded into
    their round's running sum: the upload handler owes them while the upload is checked (a
    :class:`Debt`, settled before it waits for its branch's lock, so an aggregation holding that
    lock never stops the server's receipt), :meth:`Rounds.accept_upload` again from its commit,
    and the branch's fold task repays those after the pass that folds them.
    When the two together reach the capacity, an upload first writes what it holds and then waits
    for room before reading again, so waiting uploads hold nothing, the bytes in memory stay near
    :data:`MAX_BYTES_IN_FLIGHT` (plus one read per reading upload, which aiohttp caps at its buffer
    size), and folds never pile up behind receipt: after the last upload of a round, what is left
    is its own fold and the mean (O(model)), not one fold per leaf that finished at the same time.
    A stalled client holds no share of the budget.
    """

    _instances: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ByteBudget]" = weakref.WeakKeyDictionary()

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.owed = 0
        self.uploads = 0  # bodies being received now
        self._changed = asyncio.Event()

    @classmethod
    def of_running_loop(cls) -> "ByteBudget":
        loop = asyncio.get_running_loop()
        if loop not in cls._instances:
            cls._instances[loop] = cls(MAX_BYTES_IN_FLIGHT)
        return cls._instances[loop]

    def spent(self) -> bool:
        return self.used + self.owed >= self.capacity

    async def room(self) -> None:
        """Wait until half the capacity is free again: a hundred waiting uploads then resume together
        for a while, instead of stopping and starting at every byte repaid."""
        while self.used + self.owed >= self.capacity // 2:
            self._changed.clear()
            await self._changed.wait()

    def take(self, count: int) -> None:
        self.used += count

    def release(self, count: int) -> None:
        self.used -= count
        self._changed.set()

    def owe(self, count: int) -> None:
        self.owed += count

    def repay(self, count: int) -> None:
        self.owed -= count
        self._changed.set()

    def debt(self, count: int) -> "Debt":
        """Owe ``count`` bytes until the returned :class:`Debt` is settled."""
        self.owe(count)
        return Debt(self, count)


class Debt:
    """What one received upload owes a :class:`ByteBudget`: repaid once, however often it is settled
    (the round logic settles it before the upload waits for its branch's lock, the handler always)."""

    def __init__(self, budget: ByteBudget, count: int) -> None:
        self._budget = budget
        self._count = count

    def settle(self) -> None:
        if self._count:
            self._budget.repay(self._count)
            self._count = 0


__all__ = ["ByteBudget", "Debt", "MAX_BYTES_IN_FLIGHT"]
