"""The options of a leaf's federation, written once: :class:`LeafOptions`.

This module owns every option that :class:`~.federation.Federation` and both training callbacks take about the
round and its client (the host, the round's ``timeout`` and ``on_timeout``, how often a waiting round reports and
asks the platform, the notification ``transport`` and how long :meth:`~.federation.Federation.connect` waits for
it, and further ``client_options``), its default, and its check. ``Federation``'s signature and the callbacks'
read their defaults from here (a test ties them), and the options are checked once, when the object is made:
the client that the federation connects later is made from the :class:`~.client_options.ClientOptions` built
here, without a second check.

Example:
    >>> options = LeafOptions("http://127.0.0.1:8080/", timeout=600, client_options={"max_retries": 1})
    >>> options.host, options.timeout, options.client.max_retries, options.client.wait_for_run
    ('http://127.0.0.1:8080', 600.0, 1, False)
    >>> LeafOptions(on_timeout="ignore")
    Traceback (most recent call last):
    ...
    ValueError: Expected on_timeout in ('raise', 'continue'). Received: on_timeout='ignore'
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .client_options import ClientOptions, check_seconds
from .protocol import DEFAULT_HOST

ON_TIMEOUT = ("raise", "continue")
#: client options that a federation sets itself: set them on LeafOptions (wait_for_run: a round waits its own way)
RESERVED_CLIENT_OPTIONS = ("credentials", "host", "transport", "wait_for_run")


@dataclass(frozen=True)
class LeafOptions:
    """How a leaf federates: every option of :class:`~.federation.Federation` but its credentials and listeners.

    Attributes:
        host: the API host (``https://app.branchkey.com`` or a ``branchkey-local`` URL).
        timeout: seconds a round may take (run paused, waiting for the aggregate, downloading it) before
            ``on_timeout`` applies; until then a server that is away (a restart) is asked again with
            backoff. None waits forever, and must be asked for explicitly.
        on_timeout: ``"raise"`` (:class:`~.errors.AggregationTimeoutError`) or ``"continue"`` (the round
            returns without an aggregate and the local model keeps training; so does a round whose
            platform cannot be reached or answers 5xx).
        log_every_s: while waiting, report progress at least this often.
        check_every_s: while waiting, ask the platform for the round's progress and a missed aggregate
            this often (and at once after the notification channel reconnects).
        transport: the notification transport (``"auto"``, ``"websocket"``, ``"amqp"``, ``"none"``).
        connect_timeout: seconds :meth:`~.federation.Federation.connect` waits for the notification channel.
        compression, quantize: how uploads are encoded (:class:`~.client.Client`'s options, here for their
            prominence: docs/guides/slow-links.md); None: the client's default (``"auto"``, no quantization).
        client_options: further settings of :class:`~.client.Client` (``ssl``, ``rbmq_host``,
            ``request_timeout``, ...); all of them, checked, are ``client``.

    Raises:
        ValueError: an option is out of range or unknown; the message names the value received.
    """

    host: str = DEFAULT_HOST
    timeout: float | None = 3600.0
    on_timeout: str = "raise"
    log_every_s: float = 60.0
    check_every_s: float = 5.0
    transport: str = "auto"
    connect_timeout: float = 30.0
    compression: str | None = None
    quantize: str | None = None
    client_options: dict[str, Any] | None = field(default=None, repr=False)
    client: ClientOptions = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: each value is settled once, here
        if self.timeout is not None:
            set_(self, "timeout", check_seconds("timeout", self.timeout, allow_none=True))
        if self.on_timeout not in ON_TIMEOUT:
            raise ValueError(f"Expected on_timeout in {ON_TIMEOUT}. Received: on_timeout={self.on_timeout!r}")
        for name in ("log_every_s", "check_every_s", "connect_timeout"):
            set_(self, name, check_seconds(name, getattr(self, name)))
        extra = dict(self.client_options or {})
        for reserved in RESERVED_CLIENT_OPTIONS:
            if reserved in extra:
                raise ValueError(f"Expected client_options without {reserved!r} (set it on the federation itself). "
                                 f"Received: client_options={extra!r}")
        encoding = {name: getattr(self, name) for name in ("compression", "quantize") if getattr(self, name) is not None}
        for name in set(encoding) & set(extra):
            raise ValueError(f"Expected {name} once: as an argument or in client_options, not both. "
                             f"Received: {name}={encoding[name]!r} and client_options={extra!r}")
        client = ClientOptions.checked({"host": self.host, "transport": self.transport, **extra, **encoding})
        set_(self, "host", client.host)
        set_(self, "client_options", extra)
        set_(self, "client", client)


def option_property(name: str) -> property:
    """A property for the option ``name`` of an object's ``options`` (a :class:`LeafOptions`); setting it
    replaces ``options`` with one checked again, as at construction."""
    def set_option(owner: Any, value: Any) -> None:
        owner.options = replace(owner.options, **{name: value})

    return property(lambda owner: getattr(owner.options, name), set_option, doc=f"``options.{name}``.")


__all__ = ["option_property", "LeafOptions", "ON_TIMEOUT", "RESERVED_CLIENT_OPTIONS"]
