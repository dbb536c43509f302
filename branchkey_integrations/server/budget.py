"""The one budget that bounds the upload bytes a server holds in memory, all connections together.

Many leaves may upload at once; buffering their bodies would make memory grow with the number
of leaves. Every body being received draws on one :class:`ByteBudget`, and receipt stops reading
sockets while it is spent: TCP backpressure on the clients, however many there are. What those
buffers cost once freed depends on the C allocator too, which ``serve`` tunes before any thread
starts (:func:`limit_allocator_retention`).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import weakref

logger = logging.getLogger(__name__)

#: upload bytes one server holds in memory at most, all connections together (see :class:`ByteBudget`)
MAX_BYTES_IN_FLIGHT = 16 << 20
#: bytes of room that wake one waiting upload (about what it reads before it next checks the budget)
WAKE_UNIT = 16 << 10


class ByteBudget:
    """Bytes of upload bodies held in memory by all the uploads of one event loop (one server).

    An upload counts what it read until a worker has written it. When the budget is spent, an
    upload first writes what it holds and then waits for room before reading again, so waiting
    uploads hold nothing and the bytes in flight stay near :data:`MAX_BYTES_IN_FLIGHT` (plus one
    read per reading upload, which aiohttp caps at its buffer size). Its socket is then not read,
    which is TCP backpressure on the client: memory stays bounded however many leaves upload at
    once, and a stalled client holds no share of the budget.

    Receipt does not wait for checks and folds: counting received uploads here until they were
    folded kept the work after a round's last upload O(model) when K uploads finish together, but
    only by moving it between the uploads, and whole rounds took 2-17% longer (docs/results/performance.md, issue 12).
    An upload's answer waits for its fold instead (``AcceptedUpload.folded``), which stops no socket.
    """

    _instances: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ByteBudget]" = weakref.WeakKeyDictionary()

    def __init__(self, capacity: int, wake_unit: int = WAKE_UNIT) -> None:
        self.capacity = capacity
        self.wake_unit = wake_unit
        self.used = 0
        self.uploads = 0  # bodies being received now
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()

    @classmethod
    def of_running_loop(cls) -> "ByteBudget":
        loop = asyncio.get_running_loop()
        if loop not in cls._instances:
            cls._instances[loop] = cls(MAX_BYTES_IN_FLIGHT)
        return cls._instances[loop]

    def spent(self) -> bool:
        return self.used >= self.capacity

    async def room(self) -> None:
        """Wait, first come first served, until released bytes make room for this upload's next read.

        Why a queue: with one shared event, every release woke every waiting upload (a thousand at
        once), each to find the budget spent again and wait anew: 1,000 leaves x 1 MB kept the event
        loop busy with wakeups for most of the round.
        """
        if not self.spent() and not self._waiting:
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # woken, then cancelled: pass the turn on
                self._wake()
            raise

    def take(self, count: int) -> None:
        self.used += count

    def release(self, count: int) -> None:
        self.used -= count
        self._wake()

    def _wake(self) -> None:
        """Wake waiting uploads in order, one per ``wake_unit`` of room (at least one): each will read about
        that much, so the bytes in flight overshoot the capacity by one read at most."""
        room = self.capacity - self.used
        while self._waiting and room > 0:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                room -= self.wake_unit


_M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def limit_allocator_retention() -> bool:
    """Have glibc's malloc keep one arena for all threads (it makes up to 8 per core), so memory one
    thread frees is what the next allocation reuses, whichever thread makes it. Call before the
    server's threads start.

    Why: upload buffers are allocated and freed by the event loop and eight worker threads. With an
    arena each, a fresh server's round of 100 uploads at once peaked 74-79 MB above its idle RSS; with
    one, 62-65 MB, and rounds took no longer (docs/results/performance.md, issue 12). Returns whether the C library took
    it (False off glibc, where nothing changes).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    taken = mallopt(_M_ARENA_MAX, 1) == 1
    logger.debug("malloc arenas limited to one: %s", taken)
    return taken


__all__ = ["ByteBudget", "MAX_BYTES_IN_FLIGHT", "limit_allocator_retention"]
