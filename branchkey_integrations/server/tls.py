"""TLS for branchkey-local: HTTPS and WSS on the server's one port, optional client certificates, reload.

Why a module of its own: serving TLS well is more than handing aiohttp an ``SSLContext``.

- :func:`server_context` builds the context (TLS 1.2 at least; with a client CA, a client without a
  certificate that CA signed is refused at the handshake: mutual TLS) after checking that the private
  key file is readable by its owner only, as PostgreSQL does with ``ssl_key_file``;
- :func:`reload_certificate` loads a new certificate and key into the *running* context (``serve``
  does it on SIGHUP): new handshakes use them, connections already open keep theirs, no round is lost.
  The new pair is checked in a fresh context first, so a bad file leaves the old pair serving;
- :class:`TlsAcceptor` does each handshake itself (``loop.start_tls``) instead of letting the
  listening socket do it. asyncio drops a failed handshake silently (or, in debug mode, with a
  traceback, once per attempt); here the peer is known, so the failure is logged at WARNING once per
  peer and :data:`HANDSHAKE_LOG_INTERVAL_S`, with OpenSSL's reason (a plain-HTTP request to the TLS
  port, no client certificate, an unknown CA), and the socket closed. Only a completed handshake
  reaches the connection guard (:mod:`.connections`) and aiohttp, which then see an ordinary
  transport whose ``sslcontext`` makes ``request.scheme`` ``https``;
- :func:`quiet_ssl_errors` is the loop's exception handler for what asyncio still reports itself
  (an SSL error after the handshake): one line, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import stat
import sys
import time
from pathlib import Path
from typing import Any, Callable, cast

from aiohttp import web

from ..core.errors import TlsConfigError
from .connections import GUARD, GuardedAppRunner

logger = logging.getLogger(__name__)

#: a peer whose handshakes keep failing is logged at most once per this many seconds
HANDSHAKE_LOG_INTERVAL_S = 60.0
#: peers remembered for that interval at most (a scan of many addresses costs this much memory, no more)
MAX_PEERS_REMEMBERED = 4096


def check_key_permissions(key_file: str | os.PathLike) -> None:
    """Refuse a private key that users other than its owner may read (on POSIX systems).

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "key.pem")
        >>> _ = open(path, "w").write("x")
        >>> os.chmod(path, 0o644)
        >>> try:
        ...     check_key_permissions(path)
        ... except TlsConfigError as exc:
        ...     print("chmod 600" in str(exc))
        True
        >>> os.chmod(path, 0o600); check_key_permissions(path)
    """
    path = Path(key_file)
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise TlsConfigError(f"cannot read the TLS key file {path}: {exc.strerror or exc}") from exc
    if sys.platform != "win32" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TlsConfigError(f"the TLS key file {path} is readable by group or others (mode "
                             f"{stat.S_IMODE(mode):o}); restrict it to its owner: chmod 600 {path}")


def server_context(cert_file: str | os.PathLike, key_file: str | os.PathLike,
                   client_ca_file: str | os.PathLike | None = None) -> ssl.SSLContext:
    """A server context for ``cert_file`` (the certificate, then any intermediates) and ``key_file``;
    with ``client_ca_file``, clients must present a certificate that CA signed (mutual TLS)."""
    check_key_permissions(key_file)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_pair(context, cert_file, key_file)
    if client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=os.fspath(client_ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise TlsConfigError(f"cannot load the client CA file {client_ca_file}: {exc}") from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _load_pair(context: ssl.SSLContext, cert_file: str | os.PathLike, key_file: str | os.PathLike) -> None:
    try:
        context.load_cert_chain(os.fspath(cert_file), os.fspath(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"cannot load the TLS certificate {cert_file} with key {key_file}: {exc} (expected PEM "
                             f"files, the key matching the certificate's)") from exc


def reload_certificate(context: ssl.SSLContext, cert_file: str | os.PathLike, key_file: str | os.PathLike) -> None:
    """Load a new certificate and key into the running ``context``; the next handshakes present them.

    The pair is checked first (permissions, then loaded into a scratch context), so a bad pair raises
    :class:`TlsConfigError` and leaves the one in service untouched.
    """
    check_key_permissions(key_file)
    _load_pair(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH), cert_file, key_file)
    _load_pair(context, cert_file, key_file)
    logger.info("TLS certificate reloaded from %s", cert_file)


class HandshakeLog:
    """Logs failed handshakes at most once per peer (host) and interval, with how many were not logged."""

    def __init__(self, interval_s: float = HANDSHAKE_LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._last: dict[str, tuple[float, int]] = {}  # host -> (when logged, failures since)
        self.failures = 0

    def failed(self, host: str, exc: BaseException) -> None:
        self.failures += 1
        now = time.monotonic()
        logged, since = self._last.get(host, (-self.interval_s, 0))
        if now - logged < self.interval_s:
            self._last[host] = (logged, since + 1)
            return
        if len(self._last) >= MAX_PEERS_REMEMBERED:
            self._last = {h: v for h, v in self._last.items() if now - v[0] < self.interval_s}
        self._last[host] = (now, 0)
        more = f" ({since} more from it since the last line)" if since else ""
        logger.warning("TLS handshake from %s failed: %s%s; next line for this peer in %g s at the earliest",
                       host, describe_failure(exc), more, self.interval_s)


def describe_failure(exc: BaseException) -> str:
    """One line on why a handshake failed, in an operator's words where OpenSSL's reason is a known one."""
    reason = getattr(exc, "reason", None) or ""
    if reason == "HTTP_REQUEST":
        return "a plain-HTTP request to the TLS port (the client should use https://)"
    if reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "NO_CERTIFICATE_RETURNED"):
        return "the client sent no certificate (this server requires one: --tls-client-ca)"
    if reason in ("CERTIFICATE_VERIFY_FAILED", "TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE"):
        return f"certificate refused ({reason}: {getattr(exc, 'verify_message', None) or exc})"
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "no handshake within the timeout"
    return f"{type(exc).__name__}: {reason or exc}"


class TlsAcceptor(asyncio.Protocol):
    """One accepted TCP socket: does the TLS handshake, then hands the TLS transport to ``inner``.

    It stays between the TLS transport and ``inner``: asyncio may pass on data that came with the
    handshake before ``start_tls`` returns, and that data is kept until ``inner`` has its transport.
    """

    def __init__(self, inner: asyncio.Protocol, context: ssl.SSLContext, log: HandshakeLog,
                 handshake_timeout_s: float) -> None:
        self.inner = inner
        self.context = context
        self.log = log
        self.handshake_timeout_s = handshake_timeout_s
        self.task: asyncio.Task[None] | None = None
        self.ready = False
        self.early: list[bytes] = []
        self.early_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).pause_reading()  # the ClientHello waits for start_tls, which resumes
        self.task = asyncio.ensure_future(self._handshake(transport))

    async def _handshake(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown peer"
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(cast(asyncio.Transport, transport), self, self.context, server_side=True,
                                       ssl_handshake_timeout=self.handshake_timeout_s)
        except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
            self.log.failed(host, exc)
            cast(asyncio.Transport, transport).abort()
            return
        if tls is None:  # closed meanwhile
            return
        self.inner.connection_made(tls)
        self.ready = True
        for data in self.early:
            self.inner.data_received(data)
        self.early.clear()
        if self.early_eof and not self.inner.eof_received():
            tls.close()

    def data_received(self, data: bytes) -> None:
        if self.ready:
            self.inner.data_received(data)
        else:
            self.early.append(data)

    def eof_received(self) -> bool | None:
        if self.ready:
            return self.inner.eof_received()
        self.early_eof = True
        return True  # keep the transport open until inner has seen the data

    def pause_writing(self) -> None:
        if self.ready:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.ready:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ready:
            self.inner.connection_lost(exc)
        elif self.task is not None and not self.task.done():
            self.task.cancel()


def tls_factory(factory: Callable[[], asyncio.Protocol], context: ssl.SSLContext, log: HandshakeLog,
                handshake_timeout_s: float) -> Callable[[], asyncio.Protocol]:
    """A protocol factory whose sockets speak TLS before ``factory``'s protocols see them."""
    return lambda: TlsAcceptor(factory(), context, log, handshake_timeout_s)


class TlsAppRunner(GuardedAppRunner):
    """A :class:`GuardedAppRunner` whose sites speak TLS with ``context`` (handshakes by :class:`TlsAcceptor`,
    within the guard's header timeout). Give its sites no ``ssl_context`` of their own.

    Example::

        runner = TlsAppRunner(create_app(data_dir), server_context("cert.pem", "key.pem"), handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "0.0.0.0", 8443).start()
    """

    def __init__(self, app: web.Application, context: ssl.SSLContext, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.context = context
        self.handshakes = HandshakeLog()

    @property
    def server(self) -> Any:
        inner = super().server
        if inner is None:
            return inner
        guard = self.app.get(GUARD)
        timeout = guard.limits.header_timeout_s if guard is not None else 10.0
        return tls_factory(inner, self.context, self.handshakes, timeout)


def quiet_ssl_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's exception handler: SSL errors as one line at INFO, anything else as before."""
    exc = context.get("exception")
    if isinstance(exc, ssl.SSLError):
        logger.info("TLS connection error: %s (%s)", context.get("message", ""), describe_failure(exc))
        return
    loop.default_exception_handler(context)


__all__ = ["TlsConfigError", "server_context", "reload_certificate", "check_key_permissions", "TlsAcceptor",
           "HandshakeLog", "tls_factory", "TlsAppRunner", "quiet_ssl_errors", "HANDSHAKE_LOG_INTERVAL_S"]
