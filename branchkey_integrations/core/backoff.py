"""Exponential backoff: the delays between tries of anything that waits for the platform to come back.

One class, used by the notification transports (reconnecting), the HTTP session (a platform that is
away during a round, :meth:`~.http.HttpSession.patience`) and the round (an upload refused with 409).

Example:
    >>> backoff = Backoff(initial=0.5, factor=2.0, maximum=3.0)
    >>> [backoff.next() for _ in range(5)]
    [0.5, 1.0, 2.0, 3.0, 3.0]
"""

from __future__ import annotations


class Backoff:
    """Exponential backoff delays: initial, initial*factor, ... capped at maximum."""

    def __init__(self, initial: float = 0.5, factor: float = 2.0, maximum: float = 30.0) -> None:
        self.initial, self.factor, self.maximum = initial, factor, maximum
        self.current = initial

    def next(self) -> float:
        delay = self.current
        self.current = min(self.current * self.factor, self.maximum)
        return delay

    def reset(self) -> None:
        self.current = self.initial


__all__ = ["Backoff"]
