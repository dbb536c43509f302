"""Notifications from the platform: one interface, two transports.

The platform tells a leaf that an aggregate is ready (``aggregation_status``) or that the
run changed (``run_status``). A 2.x platform carries these over AMQP (RabbitMQ: vhost =
tree id, user = leaf id, queue = leaf id, manual ack); a 3.x platform over a WebSocket
opened with a single-use ticket. Both transports run a daemon thread that reconnects with
exponential backoff. AMQP acknowledges a message only after the handler has taken it, so
a message that arrives while the client is away waits in the durable queue; a WebSocket
keeps nothing while disconnected.

pika and websockets errors are translated into :class:`NotificationError` here, the one
boundary for them; what a message means (parsing, the run status and aggregation ids it
updates) is :mod:`.protocol`'s and :class:`~.waiter.RoundWaiter`'s.
"""

from __future__ import annotations

import abc
import logging
import ssl as ssl_module
import threading
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import urlsplit

from .backoff import Backoff
from .errors import BranchKeyError, NotFoundError, NotificationError, ProtocolError, RequestRejectedError
from .protocol import AGGREGATION_STATUS, RUN_STATUS, RUN_STATUSES, WS_PATH, Notification, parse_notification

if TYPE_CHECKING:  # start_transport reads the options' fields only: the transport layer stays below them
    from .client_options import ClientOptions

logger = logging.getLogger(__name__)

Handler = Callable[[Notification], None]


def client_tls_context(verify: bool | str, cert: str | tuple[str, str] | None) -> ssl_module.SSLContext:
    """The TLS context of a leaf's WebSocket or AMQP connection, as ``requests`` does it for the HTTP calls:
    ``verify`` True (the system's CAs), a CA bundle's path, or False (no verification); ``cert`` the client
    certificate to present (mutual TLS): ``(certificate file, key file)`` or one PEM file holding both.

    Example:
        >>> client_tls_context(True, None).verify_mode == ssl_module.CERT_REQUIRED
        True
    """
    context = ssl_module.create_default_context(cafile=verify if isinstance(verify, str) else None)
    context.minimum_version = ssl_module.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl_module.CERT_NONE
    if cert is not None:
        certfile, keyfile = (cert, None) if isinstance(cert, str) else cert
        context.load_cert_chain(certfile, keyfile)
    return context


class NotificationTransport(abc.ABC):
    """A background consumer that hands each notification to a handler, and reconnects."""

    name: str = "abstract"

    def __init__(self, backoff: Backoff | None = None) -> None:
        self.backoff = backoff or Backoff()
        self.connected = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._handler: Handler | None = None
        self._connect_listeners: list[Callable[[], None]] = []
        self.reconnects = 0
        self._failures = 0  # failed attempts since the channel was last open

    def add_connect_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` (on the transport's thread) each time the channel opens, reconnects included.

        Why: a WebSocket keeps nothing while it is away, so a waiting leaf asks the platform for what it
        may have missed as soon as it is back (see :meth:`~.waiter.RoundWaiter.request_refresh`).
        """
        self._connect_listeners.append(listener)

    def _set_connected(self) -> None:
        self.connected.set()
        if self._failures:
            logger.info("%s notifications: connected again after %d failed attempt(s)", self.name, self._failures)
            self._failures = 0
        for listener in self._connect_listeners:
            try:
                listener()
            except Exception:  # a listener's bug must not kill the consumer thread
                logger.exception("%s notifications: a connect listener failed", self.name)

    def start(self, handler: Handler) -> None:
        """Start consuming in a daemon thread; returns at once."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name} transport already started")
        self._handler = handler
        self._thread = threading.Thread(target=self._run, name=f"branchkey-{self.name}", daemon=True)
        self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread and close the connection."""
        self._closing.set()
        self._interrupt()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("%s notification thread did not stop within %.1f s", self.name, timeout)

    @property
    def closed(self) -> bool:
        return self._closing.is_set()

    def _run(self) -> None:
        while not self._closing.is_set():
            try:
                self._consume()
            except NotificationError as exc:
                was_connected = self.connected.is_set()
                self.connected.clear()
                if self._closing.is_set():
                    break
                if was_connected:  # a connection that worked earns a quick first retry
                    self.backoff.reset()
                delay = self.backoff.next()
                self.reconnects += 1
                self._failures += 1
                # an outage is said once at WARNING (and every 10th attempt), each further attempt at INFO
                level = logging.WARNING if self._failures % 10 == 1 else logging.INFO
                logger.log(level, "%s notifications: %s; reconnecting in %.1f s", self.name, exc, delay)
                self._closing.wait(delay)
            finally:
                self.connected.clear()
        logger.debug("%s notification thread stopped", self.name)

    def _deliver(self, raw: bytes | str) -> None:
        try:
            notification = parse_notification(raw)
        except ProtocolError as exc:
            logger.error("Dropping a malformed notification: %s", exc)
            return
        assert self._handler is not None
        try:
            self._handler(notification)
        except Exception:  # a handler bug must not kill the consumer thread
            logger.exception("Notification handler failed on %s", notification.message_type)

    @abc.abstractmethod
    def _consume(self) -> None:
        """Connect and deliver messages until closed; raise NotificationError on a lost connection."""

    @abc.abstractmethod
    def _interrupt(self) -> None:
        """Make a running _consume return soon (called from another thread)."""


class AmqpTransport(NotificationTransport):
    """Consume the leaf's queue on the platform's RabbitMQ, as the official 2.7.1 client does."""

    name = "amqp"

    def __init__(
        self,
        host: str,
        port: int,
        leaf_id: str,
        session_token: str,
        tree_id: str,
        *,
        heartbeat: int = 30,
        backoff: Backoff | None = None,
        tls: ssl_module.SSLContext | None = None,
    ) -> None:
        super().__init__(backoff)
        self.host, self.port = host, port
        self.leaf_id, self.tree_id = leaf_id, tree_id
        self._token = session_token
        self.heartbeat = heartbeat
        self.tls = tls  # AMQP over TLS (amqps) with this context; the broker's name is checked against host
        self._connection: Any = None
        self._channel: Any = None

    def __repr__(self) -> str:
        scheme = "amqps" if self.tls is not None else "amqp"
        return (f"AmqpTransport(host={self.host!r}, port={self.port}, vhost={self.tree_id!r}, user={self.leaf_id!r}, "
                f"scheme={scheme!r})")

    def _consume(self) -> None:
        import pika
        import pika.exceptions

        parameters = pika.ConnectionParameters(
            host=self.host,
            port=self.port,
            virtual_host=self.tree_id,
            credentials=pika.PlainCredentials(self.leaf_id, self._token),
            heartbeat=self.heartbeat,
            connection_attempts=1,
            client_properties={"connection_name": f"leaf-{self.leaf_id}"},
            ssl_options=pika.SSLOptions(self.tls, server_hostname=self.host) if self.tls is not None else None,
        )
        try:
            self._connection = pika.BlockingConnection(parameters)
            if self._closing.is_set():
                return
            self._channel = channel = self._connection.channel()
            channel.basic_qos(prefetch_count=16)
            channel.basic_consume(queue=self.leaf_id, on_message_callback=self._on_message)
            self._set_connected()
            logger.info("AMQP notifications: consuming queue %s on %s:%s", self.leaf_id, self.host, self.port)
            if not self._closing.is_set():
                channel.start_consuming()
        except pika.exceptions.ProbableAuthenticationError as exc:
            raise NotificationError(
                f"RabbitMQ at {self.host}:{self.port} refused leaf {self.leaf_id} (vhost {self.tree_id}): "
                "check the credentials and that the broker has provisioned this leaf."
            ) from exc
        except pika.exceptions.AMQPError as exc:
            raise NotificationError(f"AMQP connection to {self.host}:{self.port} failed: {exc!r}") from exc
        except ssl_module.SSLError as exc:  # before OSError, its base: say which side of TLS to look at
            raise NotificationError(f"AMQP over TLS to {self.host}:{self.port} failed: {exc} (check the CA bundle "
                                    "in ssl= and, if the broker asks for one, the client certificate in cert=)") from exc
        except OSError as exc:
            raise NotificationError(f"AMQP connection to {self.host}:{self.port} failed: {exc}") from exc
        finally:
            self._close_connection()

    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        self._deliver(body)
        channel.basic_ack(delivery_tag=method.delivery_tag)

    def _interrupt(self) -> None:
        connection, channel = self._connection, self._channel
        if connection is None or channel is None:
            return
        try:
            connection.add_callback_threadsafe(channel.stop_consuming)
        except Exception:  # already closed: nothing to stop
            logger.debug("AMQP connection already closed", exc_info=True)

    def _close_connection(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except Exception:
                logger.debug("Error closing the AMQP connection", exc_info=True)


TicketProvider = Callable[[], "tuple[str, str]"]


class WebSocketTransport(NotificationTransport):
    """Receive notifications on ``/api/v1/ws``, as the official 3.x client does.

    ``ticket_provider`` returns a fresh ``(ticket_id, request_id)`` from
    ``POST /api/v1/ws/ticket``: every (re)connection needs a new single-use ticket.
    """

    name = "websocket"

    def __init__(
        self,
        host: str,
        ticket_provider: TicketProvider,
        *,
        verify_ssl: bool | str = True,
        cert: str | tuple[str, str] | None = None,
        open_timeout: float = 10.0,
        poll_interval: float = 0.5,
        backoff: Backoff | None = None,
    ) -> None:
        super().__init__(backoff)
        self.host = host.rstrip("/")
        self._ticket_provider = ticket_provider
        self.verify_ssl = verify_ssl
        self.cert = cert  # presented to a server that asks for a client certificate (mutual TLS)
        self.open_timeout = open_timeout
        self.poll_interval = poll_interval

    def __repr__(self) -> str:
        return f"WebSocketTransport(host={self.host!r})"

    def url(self, ticket_id: str, request_id: str) -> str:
        parts = urlsplit(self.host)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return f"{scheme}://{parts.netloc}{parts.path}{WS_PATH}?ticket={ticket_id}&request_id={request_id}"

    def _ssl_context(self) -> ssl_module.SSLContext | None:
        return client_tls_context(self.verify_ssl, self.cert) if self.host.startswith("https://") else None

    def _consume(self) -> None:
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
        from websockets.sync.client import connect

        try:
            ticket_id, request_id = self._ticket_provider()
        except BranchKeyError as exc:
            raise NotificationError(f"Could not get a WebSocket ticket: {exc}") from exc
        try:
            # The server pings every 30 s; the library answers them for us.
            with connect(
                self.url(ticket_id, request_id),
                ssl=self._ssl_context(),
                open_timeout=self.open_timeout,
                ping_interval=None,
                proxy=None,
                max_size=2**20,
            ) as websocket:
                self._set_connected()
                logger.info("WebSocket notifications: connected to %s", self.host)
                while not self._closing.is_set():
                    try:
                        raw = websocket.recv(timeout=self.poll_interval)
                    except TimeoutError:
                        continue
                    self._deliver(raw)
        except ConnectionClosed as exc:
            if not self._closing.is_set():
                raise NotificationError(f"WebSocket to {self.host} closed: {exc}") from exc
        except (InvalidHandshake, InvalidURI, OSError) as exc:
            raise NotificationError(f"WebSocket connection to {self.host} failed: {exc}") from exc

    def _interrupt(self) -> None:
        """The receive loop polls the closing flag every ``poll_interval`` seconds."""


def start_transport(kind: str, options: ClientOptions, ticket_provider: TicketProvider, *, verify_ssl: bool | str,
                    amqp_login: tuple[str, str, str], handler: Handler,
                    on_connect: Callable[[], None]) -> NotificationTransport | None:
    """Start the notification consumer of a leaf: ``kind`` is ``"websocket"``, ``"amqp"``, ``"none"`` or
    ``"auto"`` (WebSocket where the platform issues tickets, as 3.x and branchkey-local do; else AMQP, as 2.x).

    ``options`` say the API host, the broker (:meth:`~.client_options.ClientOptions.amqp_endpoint`) and the
    client certificate; ``verify_ssl`` how to verify the server (the client's current ``ssl``);
    ``amqp_login`` is the leaf's ``(id, session token, tree id)``; ``on_connect`` runs on every (re)connect.
    Returns the started transport, or None for ``"none"``.
    """
    api_host = options.host
    rbmq_host, rbmq_port, amqps = options.amqp_endpoint()
    rbmq = (rbmq_host, rbmq_port)
    if kind == "auto":
        try:
            ticket_provider()
            kind = "websocket"
            logger.info("transport=auto picked WebSocket: %s issues WebSocket tickets", api_host)
        except (NotFoundError, RequestRejectedError) as exc:
            kind = "amqp"
            logger.info("transport=auto picked AMQP (%s:%s): the platform offers no WebSocket tickets (%s)",
                        *rbmq, exc.status_code)
    if kind == "none":
        return None
    transport: NotificationTransport
    if kind == "websocket":
        transport = WebSocketTransport(api_host, ticket_provider, verify_ssl=verify_ssl, cert=options.cert)
    else:
        tls = client_tls_context(verify_ssl, options.cert) if amqps else None
        transport = AmqpTransport(*rbmq, *amqp_login, tls=tls)
    transport.add_connect_listener(on_connect)
    transport.start(handler)
    return transport


__all__ = [
    "client_tls_context",
    "start_transport",
    "Notification",
    "parse_notification",
    "NotificationTransport",
    "AmqpTransport",
    "WebSocketTransport",
    "Backoff",
    "AGGREGATION_STATUS",
    "RUN_STATUS",
    "RUN_STATUSES",
]
