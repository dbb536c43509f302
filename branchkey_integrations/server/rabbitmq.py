"""RabbitMQ provisioning and publishing for branchkey-local's AMQP notifications.

The official 2.x client connects on port 5672 to ``virtual_host = tree_id`` as user ``leaf_id``
(password ``session_token``) and consumes, with manual ack, from the queue named ``leaf_id``,
declaring nothing. So the server must create, per leaf, everything that client expects:

* a vhost per tree, on which the admin user has full permissions;
* a user per leaf (no tags) whose permissions are configure ``^$``, write ``^$`` and read
  ``^<leaf_id>$``: a leaf can read its own queue and nothing else, and can declare nothing;
* a durable fanout exchange per branch, and a durable queue per leaf bound to it, so one publish
  reaches every leaf of the branch, and a message waits for a leaf that is not connected.

Design choice: all provisioning goes through the management HTTP API (``requests``), and AMQP
(``pika``) is used only to publish. Users, vhosts and permissions can only be made over HTTP
anyway, so doing exchanges, queues and bindings there too keeps one transport and one error
path for provisioning: every call is an idempotent PUT (or a POST of a binding, which the broker
deduplicates), a mismatch such as an existing exchange of another type comes back as an HTTP 400
with the broker's reason instead of a closed AMQP channel, and provisioning a leaf never opens an
AMQP connection to a vhost that may never be published to.

Publishing keeps one ``pika.BlockingConnection`` per vhost, opened lazily and guarded by one lock
(pika's blocking adapter is not thread-safe). Publisher confirms make a returned ``publish`` mean
that the broker has the message. A dropped connection is reopened once and the message sent again,
so delivery is at least once (the official client keeps only the newest aggregation id, so a
duplicate is harmless). Heartbeats are off for these connections unless the URL asks for them:
a blocking connection only answers heartbeats while it is being called, so an idle publisher would
otherwise be cut by the broker between two rounds; TCP keepalive detects a dead peer instead.

Over TLS: an ``amqps://`` URL connects with TLS 1.2 or later, verifying the broker's certificate and name
against ``ca_file`` (or the system's CAs without one); the management API defaults to
``https://<host>:15671`` then (RabbitMQ's TLS port for it) and is verified against the same CA.

Errors of ``requests`` and ``pika`` become :class:`BrokerError` here, with the original kept as
``__cause__``. Passwords and session tokens never appear in a message, a log line or a repr.

Example::

    broker = RabbitMQBroker("amqp://guest:guest@127.0.0.1:5672/")
    broker.check()
    broker.provision_leaf(tree_id, branch_id, leaf_id, session_token)
    broker.publish(tree_id, branch_id, {"message_type": "aggregation_status",
                                        "body": {"aggregation_id": file_id}})
    broker.close()
"""

from __future__ import annotations

import copy
import json
import logging
import re
import ssl
import threading
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit, urlunsplit

import pika
import pika.exceptions
import requests

from ..core.errors import BrokerArgumentError, BrokerError

__all__ = ["RabbitMQBroker"]

log = logging.getLogger(__name__)
# pika logs every failed connection attempt at ERROR, four lines each, with tracebacks; the
# BrokerError raised here says the same in one line, and the outbox logs it at a bounded rate.
for _noisy in ("pika.adapters.utils.connection_workflow", "pika.adapters.blocking_connection"):
    logging.getLogger(_noisy).setLevel(logging.CRITICAL)

MANAGEMENT_PORT = 15672
MANAGEMENT_TLS_PORT = 15671
HTTP_TIMEOUT_S = 10.0
_ENABLE_MANAGEMENT = "enable it with: rabbitmq-plugins enable rabbitmq_management"
_START_SERVER = "start it with: rabbitmq-server -detached"
# Used only when the AMQP URL sets no heartbeat (see the module docstring).
_KEEPALIVE = {"TCP_KEEPIDLE": 60, "TCP_KEEPINTVL": 10, "TCP_KEEPCNT": 3, "TCP_USER_TIMEOUT": 60_000}
_MAX_NAME_BYTES = 255  # AMQP short string: the longest exchange or queue name
_PROPERTIES = pika.BasicProperties(content_type="application/json", delivery_mode=2)  # 2: persistent
# Failures the broker decided on purpose: a reconnection would end the same way.
_NOT_RETRIED = (
    pika.exceptions.ChannelClosedByBroker,
    pika.exceptions.NackError,
    pika.exceptions.ProbableAccessDeniedError,
    pika.exceptions.ProbableAuthenticationError,
)


def mask_url(url: str) -> str:
    """Return ``url`` with the password of its userinfo replaced by ``***``.

    >>> mask_url("amqp://guest:secret@127.0.0.1:5672/")
    'amqp://guest:***@127.0.0.1:5672/'
    """
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    netloc = f"{user}:***@{hostport}" if colon else f"{user}@{hostport}"
    return urlunsplit(parts._replace(netloc=netloc))


def _check_name(what: str, value: object) -> str:
    """Refuse a name RabbitMQ would refuse, with a message that says which and why."""
    if not isinstance(value, str) or not value:
        raise BrokerArgumentError(f"Expected {what} to be a non-empty string. Received: {what}={value!r}")
    if len(value.encode("utf-8")) > _MAX_NAME_BYTES:
        raise BrokerArgumentError(
            f"Expected {what} to be at most {_MAX_NAME_BYTES} bytes (AMQP limit). Received: {what}={value!r}"
        )
    if what != "tree_id" and value.startswith("amq."):
        raise BrokerArgumentError(
            f"Expected {what} not to start with 'amq.' (reserved by AMQP). Received: {what}={value!r}"
        )
    return value


def _q(name: str) -> str:
    """Quote one path segment of the management API (a vhost may be '/')."""
    return quote(name, safe="")


class RabbitMQBroker:
    """Provision trees, branches and leaves on RabbitMQ, and publish notifications to branches.

    Args:
        amqp_url: AMQP URL with admin credentials, e.g. ``amqp://guest:guest@127.0.0.1:5672/``.
            Its path (vhost) is used only by :meth:`check`; every tree gets its own vhost.
        management_url: base URL of the management HTTP API; defaults to
            ``http://<amqp host>:15672`` (``https://<amqp host>:15671`` for ``amqps://``). Credentials
            in it, if any, are used for the API instead of the AMQP URL's.
        ca_file: the CA bundle that verifies the broker's certificate (``amqps://``) and the
            management API's (``https://``); None: the system's CAs.

    Raises:
        BrokerArgumentError: a URL is malformed, or ``ca_file`` is given for a broker without TLS.
            Nothing is contacted until :meth:`check`, :meth:`provision_leaf` or :meth:`publish`.
    """

    def __init__(self, amqp_url: str, management_url: str | None = None, ca_file: str | None = None) -> None:
        self._amqp_display = mask_url(amqp_url) if isinstance(amqp_url, str) else repr(amqp_url)
        self._params, host = self._parse_amqp_url(amqp_url)
        admin = self._params.credentials
        self._admin_user: str = admin.username
        tls = self._params.ssl_options is not None
        if management_url is None:
            bracketed = f"[{host}]" if ":" in host else host
            management_url = (f"https://{bracketed}:{MANAGEMENT_TLS_PORT}" if tls else
                              f"http://{bracketed}:{MANAGEMENT_PORT}")
        self._api, api_auth = self._parse_management_url(management_url)
        if ca_file is not None:
            self._use_ca(ca_file, host, tls)
        self._verify: bool | str = ca_file if ca_file is not None else True
        self._session = requests.Session()
        self._session.auth = api_auth or (admin.username, admin.password)
        self._lock = threading.Lock()
        self._channels: dict[str, tuple[pika.BlockingConnection, Any]] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"RabbitMQBroker(amqp_url={self._amqp_display!r}, management_url={self._api!r})"

    # -- URL validation ---------------------------------------------------------------------

    def _use_ca(self, ca_file: str, host: str, tls: bool) -> None:
        """Verify the broker (amqps) with ``ca_file``, TLS 1.2 at least; refuse a CA that would verify nothing."""
        if not tls and not self._api.startswith("https://"):
            raise BrokerArgumentError(
                f"A CA bundle (ca_file={ca_file!r}) verifies a broker reached over TLS, but amqp_url "
                f"{self._amqp_display} and management_url {self._api} use none: use amqps:// (port 5671).")
        if tls:
            try:
                context = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise BrokerArgumentError(f"Cannot read the CA bundle {ca_file!r}: {exc}") from exc
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            self._params.ssl_options = pika.SSLOptions(context, server_hostname=host)

    def _parse_amqp_url(self, url: object) -> tuple[pika.URLParameters, str]:
        if not isinstance(url, str):
            raise BrokerArgumentError(f"Expected amqp_url to be a string. Received: amqp_url={url!r}")
        parts = urlsplit(url)
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            raise BrokerArgumentError(
                "Expected amqp_url like 'amqp://user:password@host:5672/'. "
                f"Received: amqp_url={self._amqp_display!r}"
            )
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
            params = pika.URLParameters(url)
        except (ValueError, TypeError) as exc:
            raise BrokerArgumentError(
                f"Invalid amqp_url {self._amqp_display!r}: {exc}. "
                "Expected 'amqp://user:password@host:5672/'."
            ) from exc
        if "heartbeat" not in parse_qs(parts.query):
            params.heartbeat = 0
            params.tcp_options = dict(_KEEPALIVE)
        return params, parts.hostname

    def _parse_management_url(self, url: object) -> tuple[str, tuple[str, str] | None]:
        """Return the API base without credentials (safe to print) and the credentials, if any."""
        if not isinstance(url, str):
            raise BrokerArgumentError(f"Expected management_url to be a string. Received: {url!r}")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BrokerArgumentError(
                "Expected management_url like 'http://127.0.0.1:15672'. "
                f"Received: management_url={mask_url(url)!r}"
            )
        try:
            parts.port  # noqa: B018
        except ValueError as exc:
            raise BrokerArgumentError(f"Invalid management_url {mask_url(url)!r}: {exc}") from exc
        hostport = parts.netloc.rpartition("@")[2]
        base = urlunsplit((parts.scheme, hostport, parts.path.rstrip("/"), "", ""))
        auth = None
        if parts.username is not None:
            auth = (unquote(parts.username), unquote(parts.password or ""))
        return base, auth

    # -- management HTTP API ----------------------------------------------------------------

    def _api_call(self, method: str, path: str, body: dict | None = None, missing_ok: bool = False) -> Any:
        """One management API request; every ``requests`` failure becomes a BrokerError here."""
        url = f"{self._api}{path}"
        try:
            # verify per request: requests lets REQUESTS_CA_BUNDLE override a session's own CA bundle
            response = self._session.request(method, url, json=body, timeout=HTTP_TIMEOUT_S, verify=self._verify)
        except requests.RequestException as exc:
            raise BrokerError(
                f"Cannot reach the RabbitMQ management API at {self._api} ({type(exc).__name__}). "
                f"Is RabbitMQ running ({_START_SERVER}) and is the management plugin enabled "
                f"({_ENABLE_MANAGEMENT})?"
            ) from exc
        if response.status_code == 404 and missing_ok:
            return None
        if response.status_code == 401:
            raise BrokerError(
                f"The RabbitMQ management API at {self._api} refused the credentials of user "
                f"{self._session.auth[0]!r} (HTTP 401). Check the password in the AMQP URL "
                f"{self._amqp_display} (or in management_url)."
            )
        if response.status_code >= 400:
            raise BrokerError(
                f"{method} {url} failed: HTTP {response.status_code} {self._reason(response)}"
            )
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise BrokerError(
                f"{method} {url} answered HTTP {response.status_code} with non-JSON text: is "
                f"{self._api} the RabbitMQ management API? If it is off, {_ENABLE_MANAGEMENT}."
            ) from exc

    @staticmethod
    def _reason(response: requests.Response) -> str:
        try:
            body = response.json()
        except ValueError:
            return response.text[:200]
        if isinstance(body, dict):
            return str(body.get("reason") or body.get("error") or body)
        return str(body)[:200]

    # -- public API -------------------------------------------------------------------------

    def check(self) -> None:
        """Reach the management API and AMQP once, so a misconfiguration fails at startup.

        Raises:
            BrokerError: naming the unreachable URL (password masked) and the fix.
        """
        whoami = self._api_call("GET", "/api/whoami", missing_ok=True)
        if not isinstance(whoami, dict):
            raise BrokerError(
                f"{self._api} does not answer like the RabbitMQ management API (GET "
                f"/api/whoami gave no user). Point management_url at it; if it is off, {_ENABLE_MANAGEMENT}."
            )
        tags = whoami.get("tags", [])
        tags = tags.split(",") if isinstance(tags, str) else tags
        if "administrator" not in tags:
            raise BrokerError(
                f"RabbitMQ user {self._admin_user!r} cannot create vhosts and users (tags: {tags}). "
                f"Give it the tag with: rabbitmqctl set_user_tags {self._admin_user} administrator"
            )
        params = copy.copy(self._params)
        params.client_properties = {"connection_name": "branchkey-local-check"}
        try:
            pika.BlockingConnection(params).close()
        except (pika.exceptions.AMQPError, OSError) as exc:
            raise self._amqp_error(f"Cannot connect over AMQP to {self._amqp_display}", exc) from exc
        log.info("RabbitMQ reachable at %s (management API %s)", self._amqp_display, self._api)

    def provision_leaf(self, tree_id: str, branch_id: str, leaf_id: str, session_token: str) -> None:
        """Create, or bring up to date, everything a leaf's AMQP consumer needs. Idempotent.

        Running it again for a known leaf is harmless and sets the password to ``session_token``
        (so it also rotates a token).
        """
        tree_id = _check_name("tree_id", tree_id)
        branch_id = _check_name("branch_id", branch_id)
        leaf_id = _check_name("leaf_id", leaf_id)
        if not isinstance(session_token, str) or not session_token:
            raise BrokerArgumentError("Expected session_token to be a non-empty string.")
        vhost = _q(tree_id)
        self._api_call("PUT", f"/api/vhosts/{vhost}", {})
        full = {"configure": ".*", "write": ".*", "read": ".*"}
        self._api_call("PUT", f"/api/permissions/{vhost}/{_q(self._admin_user)}", full)
        self._api_call("PUT", f"/api/users/{_q(leaf_id)}", {"password": session_token, "tags": ""})
        own_queue_only = {"configure": "^$", "write": "^$", "read": f"^{re.escape(leaf_id)}$"}
        self._api_call("PUT", f"/api/permissions/{vhost}/{_q(leaf_id)}", own_queue_only)
        exchange = {"type": "fanout", "durable": True, "auto_delete": False, "internal": False, "arguments": {}}
        self._api_call("PUT", f"/api/exchanges/{vhost}/{_q(branch_id)}", exchange)
        queue = {"durable": True, "auto_delete": False, "arguments": {}}
        self._api_call("PUT", f"/api/queues/{vhost}/{_q(leaf_id)}", queue)
        binding = {"routing_key": "", "arguments": {}}
        self._api_call("POST", f"/api/bindings/{vhost}/e/{_q(branch_id)}/q/{_q(leaf_id)}", binding)
        log.info("Provisioned leaf %s in tree %s, branch %s", leaf_id, tree_id, branch_id)

    def remove_leaf(self, tree_id: str, leaf_id: str) -> None:
        """Delete a leaf's user and queue (and so its pending messages). Missing ones are fine."""
        tree_id = _check_name("tree_id", tree_id)
        leaf_id = _check_name("leaf_id", leaf_id)
        self._api_call("DELETE", f"/api/queues/{_q(tree_id)}/{_q(leaf_id)}", missing_ok=True)
        self._api_call("DELETE", f"/api/users/{_q(leaf_id)}", missing_ok=True)
        log.info("Removed leaf %s from tree %s", leaf_id, tree_id)

    def queue_consumers(self, tree_id: str) -> dict[str, int]:
        """Consumers per queue (leaf id) of a tree's vhost: who is listening right now (the dashboard asks)."""
        queues = self._api_call("GET", f"/api/queues/{_q(_check_name('tree_id', tree_id))}?columns=name,consumers",
                                missing_ok=True) or []
        return {str(q["name"]): int(q.get("consumers") or 0) for q in queues if isinstance(q, dict) and "name" in q}

    def remove_tree(self, tree_id: str) -> None:
        """Delete a tree's vhost, and with it its exchanges and queues. A missing one is fine.

        Leaf users are global in RabbitMQ and stay: remove them with :meth:`remove_leaf`.
        """
        tree_id = _check_name("tree_id", tree_id)
        with self._lock:
            self._drop(tree_id)  # the broker would close our publishing connection anyway
        self._api_call("DELETE", f"/api/vhosts/{_q(tree_id)}", missing_ok=True)
        log.info("Removed tree %s (its vhost)", tree_id)

    def publish(self, tree_id: str, branch_id: str, message: dict) -> None:
        """Send ``message`` as persistent JSON to every leaf of a branch; return once the broker has it.

        Raises:
            BrokerArgumentError: a name is invalid or ``message`` is not JSON-serializable.
            BrokerError: the branch was never provisioned, or the broker stayed unreachable
                after one reconnection.
        """
        tree_id = _check_name("tree_id", tree_id)
        branch_id = _check_name("branch_id", branch_id)
        try:
            body = json.dumps(message).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise BrokerArgumentError(f"Expected message to be JSON-serializable. Received: {message!r}") from exc
        with self._lock:
            if self._closed:
                raise BrokerError("This RabbitMQBroker is closed; create a new one to publish.")
            self._send(tree_id, branch_id, body)
        kind = message.get("message_type") if isinstance(message, dict) else type(message).__name__
        log.debug("Published %s to branch %s of tree %s", kind, branch_id, tree_id)

    def close(self) -> None:
        """Close every AMQP connection and the HTTP session. Safe to call twice."""
        with self._lock:
            self._closed = True
            for tree_id in list(self._channels):
                self._drop(tree_id)
        self._session.close()

    def __enter__(self) -> "RabbitMQBroker":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- AMQP connections (call with the lock held) -----------------------------------------

    def _channel(self, tree_id: str) -> Any:
        """The confirming channel of a vhost, opening the connection on first use."""
        if tree_id not in self._channels:
            params = copy.copy(self._params)
            params.virtual_host = tree_id
            params.client_properties = {"connection_name": f"branchkey-local-publisher-{tree_id}"}
            connection = pika.BlockingConnection(params)
            try:
                channel = connection.channel()
                channel.confirm_delivery()
            except BaseException:
                connection.close()
                raise
            self._channels[tree_id] = (connection, channel)
        return self._channels[tree_id][1]

    def _send(self, tree_id: str, branch_id: str, body: bytes) -> None:
        """Publish with confirms, reopening a dropped connection once."""
        for attempt in (1, 2):
            try:
                channel = self._channel(tree_id)
                channel.basic_publish(exchange=branch_id, routing_key="", body=body, properties=_PROPERTIES)
                return
            except _NOT_RETRIED as exc:  # retrying would fail the same way
                self._drop(tree_id)
                raise self._publish_error(tree_id, branch_id, exc) from exc
            except (pika.exceptions.AMQPError, OSError) as exc:
                self._drop(tree_id)
                if attempt == 2:
                    raise self._amqp_error(f"Publishing to branch {branch_id!r} failed", exc) from exc
                log.info("AMQP connection to vhost %s lost (%s); reconnecting once", tree_id, exc)

    def _publish_error(self, tree_id: str, branch_id: str, exc: BaseException) -> BrokerError:
        if isinstance(exc, pika.exceptions.ChannelClosedByBroker) and exc.reply_code == 404:
            return BrokerError(
                f"Exchange {branch_id!r} does not exist in vhost {tree_id!r}: "
                "provision a leaf of that branch before publishing to it."
            )
        if isinstance(exc, pika.exceptions.NackError):
            return BrokerError(f"The broker refused (nack) the message to branch {branch_id!r}.")
        if isinstance(exc, pika.exceptions.ProbableAccessDeniedError):
            return BrokerError(
                f"Cannot open vhost {tree_id!r} as {self._admin_user!r}: it does not exist or the "
                "user has no permissions on it. Provision a leaf of that tree first."
            )
        return self._amqp_error(f"Publishing to branch {branch_id!r} failed", exc)

    def _drop(self, tree_id: str) -> None:
        """Forget a vhost's connection, closing it if it is still open."""
        connection, _ = self._channels.pop(tree_id, (None, None))
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except (pika.exceptions.AMQPError, OSError) as exc:
                log.debug("Ignoring an error while closing the connection to vhost %s: %s", tree_id, exc)

    def _amqp_error(self, what: str, exc: BaseException) -> BrokerError:
        """Translate a pika failure into a BrokerError that says what to do."""
        if isinstance(exc, pika.exceptions.ProbableAuthenticationError):
            hint = f"RabbitMQ refused the credentials of user {self._admin_user!r}; check the AMQP URL."
            if self._admin_user == "guest":
                hint += " (The guest user may only connect from localhost.)"
        elif isinstance(exc, pika.exceptions.ProbableAccessDeniedError):
            hint = f"user {self._admin_user!r} may not open that vhost (or it does not exist)."
        elif isinstance(exc, pika.exceptions.ChannelClosedByBroker):
            hint = f"check that user {self._admin_user!r} may write to that exchange."
        else:
            hint = f"is RabbitMQ running and listening there? ({_START_SERVER})"
        return BrokerError(f"{what}: {type(exc).__name__}: {exc}. {hint}")
