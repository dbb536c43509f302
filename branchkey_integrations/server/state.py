"""What every handler of one branchkey-local app shares: its settings and its services.

:class:`ServerConfig` holds the limits, checked once when the app is created.
:class:`Server` builds one of each service over one store (worker threads, authentication,
the round state machine, notifications) and is stored in the app under :data:`SERVER`,
where the leaf routes, the admin routes and the lifecycle find it.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from aiohttp import web

from ..core import wire
from .analytics import DEFAULT_MAX_FIELDS
from .analytics_rounds import AnalyticsRounds
from .auth import Auth
from .notify import Notifier
from .rounds import Rounds
from .store import Store
from .uploads import UploadLimits
from .workers import Workers

T = TypeVar("T")

DEFAULT_MAX_UPLOAD_BYTES = 4 * 1024**3
DEFAULT_DOWNLOAD_TTL_S = 15 * 60
DEFAULT_TICKET_TTL_S = 60
#: an archive may inflate to at most this many times its compressed size (past wire's 64 MiB floor)
DEFAULT_MAX_COMPRESSION_RATIO = wire.DEFAULT_MAX_COMPRESSION_RATIO
#: members an upload may hold (``serve --max-members``): a real model has far fewer tensors (ResNet-152 ~930 with
#: its buffers, a 70B-parameter LLM ~720), and each costs the server ~0.1 ms however small (99,999 took 14 s)
DEFAULT_MAX_MEMBERS = 10_000
#: aggregates of this many latest rounds per branch stay on disk (0: all); the latest always does
DEFAULT_KEEP_ROUNDS = 5
#: the most bytes of one metrics report (a few KB of numbers: 100 named values take about 4 KB): 413 beyond
MAX_METRICS_BYTES = 16 * 1024
#: metrics reports kept per leaf and round (the callbacks send one or two): 429 beyond
MAX_METRICS_PER_ROUND = 32
#: metrics reports per page of the admin listing, by default and at most
METRICS_PAGE, MAX_METRICS_PAGE = 200, 1000


@dataclass(frozen=True)
class ServerConfig:
    """Limits and settings of one server; checked once, when the app is created."""

    public_url: str | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_members: int = DEFAULT_MAX_MEMBERS
    max_total_bytes: int = wire.DEFAULT_MAX_TOTAL_BYTES
    download_ttl_s: int = DEFAULT_DOWNLOAD_TTL_S
    ticket_ttl_s: int = DEFAULT_TICKET_TTL_S
    deadline_check_interval_s: float = 1.0
    max_compression_ratio: float = DEFAULT_MAX_COMPRESSION_RATIO
    keep_uploads: bool = False
    keep_rounds: int = DEFAULT_KEEP_ROUNDS
    max_fields: int = DEFAULT_MAX_FIELDS

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_members", "max_total_bytes", "download_ttl_s", "ticket_ttl_s",
                     "max_fields"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected {name} to be an integer >= 1. Received: {name}={value!r}")
        if not 0 < self.deadline_check_interval_s <= 60:
            raise ValueError(
                f"Expected deadline_check_interval_s in (0, 60]. Received: {self.deadline_check_interval_s!r}"
            )
        ratio = self.max_compression_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 1 <= ratio < float("inf"):
            raise ValueError(f"Expected max_compression_ratio to be a number >= 1. Received: {ratio!r}")
        if isinstance(self.keep_rounds, bool) or not isinstance(self.keep_rounds, int) or self.keep_rounds < 0:
            raise ValueError(f"Expected keep_rounds to be an integer >= 0 (0 keeps all). Received: {self.keep_rounds!r}")
        if self.public_url is not None and not re.match(r"https?://[^/]+", self.public_url):
            raise ValueError(f"Expected public_url like 'http://host:port'. Received: public_url={self.public_url!r}")

    @property
    def upload_limits(self) -> UploadLimits:
        return UploadLimits(self.max_upload_bytes, self.max_members, self.max_total_bytes,
                            float(self.max_compression_ratio))


class Server:
    """The services of one app: store, notifier, worker threads, authentication, learning and analytics rounds."""

    def __init__(self, store: Store, notifier: Notifier, executor: ThreadPoolExecutor, config: ServerConfig) -> None:
        self.store = store
        self.notifier = notifier
        self.config = config
        self.workers = Workers(executor)
        self.auth = Auth(store, self.workers, ticket_ttl_s=config.ticket_ttl_s)
        self.rounds = Rounds(store, notifier, self.workers, deadline_check_interval_s=config.deadline_check_interval_s,
                             keep_uploads=config.keep_uploads, keep_rounds=config.keep_rounds)
        self.analytics = AnalyticsRounds(store, notifier, self.workers,
                                         deadline_check_interval_s=config.deadline_check_interval_s,
                                         keep_uploads=config.keep_uploads, keep_rounds=config.keep_rounds,
                                         max_fields=config.max_fields)

    async def blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run blocking work (SQLite, archives, aggregation) in a worker thread."""
        return await self.workers.blocking(fn, *args, **kwargs)


SERVER = web.AppKey("server", Server)


def server_of(request: web.Request) -> Server:
    return request.app[SERVER]


__all__ = [
    "ServerConfig", "Server", "SERVER", "server_of", "DEFAULT_MAX_UPLOAD_BYTES", "DEFAULT_DOWNLOAD_TTL_S",
    "DEFAULT_TICKET_TTL_S", "DEFAULT_MAX_COMPRESSION_RATIO", "DEFAULT_KEEP_ROUNDS", "DEFAULT_MAX_MEMBERS",
]
