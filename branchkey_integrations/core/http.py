"""HTTP for the leaf client: one session with retries, and the one boundary where ``requests`` errors end.

This module owns the ``requests.Session`` (its connection pool and urllib3 ``Retry`` on 408, 429,
500, 502-504 and connection errors, with exponential backoff; never 507, out of space, whose body
would be sent again for nothing), timeouts, TLS verification, client certificates (mutual TLS) and proxies;
the translation of every ``requests`` (and ``urllib3``) failure and every error status into the core
error tree (:mod:`.errors`); the ``{"data": ...}`` envelope every JSON answer wears (a malformed or
absurdly nested one is a :class:`ProtocolError`); the streamed GET of a signed download URL, which
carries no credentials; and :meth:`HttpSession.patience`: while a round has time left, a platform
that is away (connection refused or reset, 502-504: a restart) is asked again with backoff until
that deadline, instead of only the few seconds of ``max_retries``. It knows no BranchKey call:
paths, bodies and their meaning belong to :mod:`.client`.

Why one boundary: a caller (the client, a callback, a user) can then rely on ``except
BranchKeyError`` alone, and the lower-level error is always kept: as ``__cause__``, or, for a
:class:`TransportError`, as its ``detail`` (:func:`transport_error`: a person reads one line that names the URL
and what to do, such as starting ``branchkey-local serve``; the whole chain is logged at DEBUG).

Example:
    >>> error_class(404).__name__, error_class(503).__name__, error_class(422).__name__, error_class(507).__name__
    ('NotFoundError', 'ServerError', 'RequestRejectedError', 'InsufficientStorageError')
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urlsplit

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from .backoff import Backoff
from .errors import (
    ApiError,
    AuthenticationError,
    BranchKeyError,
    InsufficientStorageError,
    NotFoundError,
    PermissionDeniedError,
    ProtocolError,
    RequestRejectedError,
    ServerError,
    TransportError,
)

logger = logging.getLogger(__name__)

RETRY_STATUSES = (408, 429, 500, 502, 503, 504)
#: answers of a platform that is away for a moment (restarting behind a proxy, or branchkey-local recovering)
AWAY_STATUSES = (502, 503, 504)
JSON = "application/json"
ONCE_TIMEOUT_S = 5.0  # the most a request sent ``once`` waits: it is asked again soon anyway
#: the delays between tries of a call under :meth:`HttpSession.patience` (after ``max_retries`` quick ones):
#: a refused connection costs nothing, so a restarted platform is found within about a second
PATIENCE_BACKOFF = (0.25, 2.0, 1.0)


def error_class(status: int) -> type[ApiError]:
    """The :class:`ApiError` subclass that stands for an HTTP error ``status``."""
    if status == HTTPStatus.UNAUTHORIZED:
        return AuthenticationError
    if status == HTTPStatus.FORBIDDEN:
        return PermissionDeniedError
    if status == HTTPStatus.NOT_FOUND:
        return NotFoundError
    if status == HTTPStatus.INSUFFICIENT_STORAGE:
        return InsufficientStorageError
    if status >= 500:
        return ServerError
    return RequestRejectedError


def error_text(response: requests.Response) -> str:
    """The platform's ``{"error": text}``, else the start of the body, else the reason phrase."""
    try:
        body = response.json()
    except (ValueError, RecursionError):
        return response.text[:300] or response.reason
    if isinstance(body, dict) and "error" in body:
        return str(body["error"])
    return str(body)[:300]


def json_data(response: requests.Response, context: str) -> dict[str, Any]:
    """Unwrap ``{"data": {...}}``; :class:`ProtocolError` naming ``context`` when the answer is not that."""
    try:
        data = response.json()["data"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:  # RecursionError: JSON nested too deep
        raise ProtocolError(f"{context}: expected JSON {{'data': {{...}}}}, got {response.text[:200]!r}") from exc
    if not isinstance(data, dict):
        raise ProtocolError(f"{context}: 'data' is not an object: {data!r}")
    return data


def make_session(max_retries: int, backoff_factor: float) -> requests.Session:
    """A session that retries idempotent-enough calls on :data:`RETRY_STATUSES` and connection errors.

    POST is retried too: the upload body is re-readable (``transfer.MultipartBody``), so a retried
    upload sends the whole body again.
    """
    retry = Retry(
        total=max_retries,
        connect=max_retries,
        read=max_retries,
        status=max_retries,
        backoff_factor=backoff_factor,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=frozenset({"GET", "POST", "PUT"}),
        raise_on_status=False,
        respect_retry_after_header=True,
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def away_reason(exc: BaseException) -> str | None:
    """A few words on why a failed request never reached a listening platform ("connection refused"), or
    None when ``exc`` is not that (a read timeout: the platform is there but slow; a TLS failure; a bug).

    Example:
        >>> away_reason(requests.exceptions.ConnectionError(ConnectionRefusedError(111, "Connection refused")))
        'connection refused'
        >>> away_reason(requests.exceptions.ConnectionError(urllib3.exceptions.ReadTimeoutError(None, "/", "")))
        >>> away_reason(requests.exceptions.ReadTimeout()) is None
        True
    """
    if not isinstance(exc, requests.exceptions.ConnectionError) or isinstance(exc, requests.exceptions.SSLError):
        return None
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    while pending:  # the cause sits a few wrappers down: MaxRetryError.reason, NewConnectionError.__cause__, args
        error = pending.pop()
        if id(error) in seen or len(seen) > 32:
            continue
        seen.add(id(error))
        if isinstance(error, urllib3.exceptions.ReadTimeoutError):
            return None  # it listens, but has not answered in time: sending again would not help
        if isinstance(error, ConnectionRefusedError):
            return "connection refused"
        if isinstance(error, http.client.RemoteDisconnected):  # before its base class, ConnectionResetError
            return "connection closed without an answer"
        if isinstance(error, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
            return "connection reset"
        if isinstance(error, TimeoutError):
            return "connect timed out"
        pending += [e for e in (error.__cause__, error.__context__, getattr(error, "reason", None), *error.args)
                    if isinstance(e, BaseException)]
    return "connection failed"


#: what OpenSSL says when a server that wants a client certificate got none (or one it does not trust)
_CERT_REFUSALS = ("CERTIFICATE_REQUIRED", "certificate required", "UNKNOWN_CA", "BAD_CERTIFICATE",
                  "HANDSHAKE_FAILURE")
PROBE_TIMEOUT_S = 2.0
_CLOSED = ("connection closed without an answer", "connection reset")


def closes_after_handshake(url: str, verify: bool | str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the https server of ``url`` ends a connection at (or right after) the TLS handshake, before any
    request: what a server that requires client certificates does to a client that has none.

    Why a probe: under TLS 1.3 the server judges the client's certificate after the client's side of the
    handshake is done, and an asyncio server (branchkey-local's) drops its alert, so ``requests`` sees only
    "connection closed without an answer", which a restarting server gives too. A server that serves waits
    for the request instead (False after ``timeout``), one that is away refuses the connection (False).
    """
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        return False
    context = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
    if not verify:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((parts.hostname, parts.port or 443), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=parts.hostname) as tls:
            return tls.recv(1) == b""
    except ssl.SSLCertVerificationError:
        return False  # the server's own certificate: requests says so itself
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True
    except OSError:  # refused, unreachable, or a timeout: a server that waits for the request
        return False


def tls_hint(exc: BaseException, cert: object) -> str:
    """A sentence to add to the message of a request that failed because the server refused our TLS client
    (mutual TLS): which option to set or check. Empty for any other failure.

    Example:
        >>> import ssl
        >>> tls_hint(requests.exceptions.SSLError(ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED]")), None)[:60]
        ' (the server refused the TLS handshake: it asks leaves for a'
        >>> tls_hint(requests.exceptions.ConnectionError(ConnectionRefusedError(111, "refused")), None)
        ''
    """
    text = f"{exc} {exc.__cause__ or ''} {exc.__context__ or ''}"
    if not any(word in text for word in _CERT_REFUSALS) or "SSL" not in text:
        return ""
    return certificate_hint(cert)


def certificate_hint(cert: object) -> str:
    """What to do about a TLS handshake the server refused for want of a client certificate (or ``cert``)."""
    if cert is None:
        return (" (the server refused the TLS handshake: it asks leaves for a client certificate, mutual TLS; "
                "pass cert=(certificate file, key file) in the client options)")
    return (f" (the server refused the TLS handshake with the client certificate {cert!r}: check that it is "
            "signed by a CA the server trusts and has not expired)")


@dataclass(frozen=True)
class Away:
    """What :meth:`HttpSession.patience` reports while a call waits for the platform to come back.

    Attributes:
        call: the request, such as ``"POST /api/v1/file/upload"``.
        reason: why it did not get through, such as ``"connection refused"`` or ``"HTTP 503"``.
        waited_s: seconds since its first failure.
        deadline: ``time.monotonic()`` at which trying ends, or None (no deadline).
        back: True in the last report, once the call got through.
    """

    call: str
    reason: str
    waited_s: float
    deadline: float | None
    back: bool = False

    @property
    def left_s(self) -> float | None:
        """Seconds until trying ends, or None without a deadline."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())


@dataclass(frozen=True)
class _Patience:
    deadline: float | None
    sleep: Callable[[float], None]
    on_away: Callable[[Away], None] | None


class HttpSession:
    """Authenticated requests to one API host, every failure raised as a :class:`BranchKeyError`.

    Args:
        base_url: the API host, prefixed to every ``path``.
        headers: sent with every API request (credentials); never with :meth:`get_blob`.
        verify: verify TLS certificates (settable later, as ``disable_ssl_verification`` does).
        cert: a client certificate for a server that asks for one (mutual TLS), as ``requests`` takes it:
            ``(certificate file, key file)`` or one PEM file holding both; sent on downloads too.
        proxies: a ``requests`` proxies dict (settable later).
        timeout: seconds for each request (connect and read).
        max_retries, backoff_factor: see :func:`make_session`.

    Example:
        >>> http = HttpSession("http://127.0.0.1:8080", {"Authorization": "Bearer leaf:token"})
        >>> http.close()
    """

    def __init__(self, base_url: str, headers: Mapping[str, str], *, verify: bool | str = True,
                 cert: str | tuple[str, str] | None = None, proxies: dict[str, str] | None = None,
                 timeout: float = 30.0, max_retries: int = 3, backoff_factor: float = 0.5) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = dict(headers)
        self.verify = verify
        self.cert = cert
        self.proxies = proxies
        self.timeout = timeout
        self.max_retries = max_retries
        self._session = make_session(max_retries, backoff_factor)
        self._single = make_session(0, 0.0)  # for requests sent once: a periodic look that is repeated anyway
        self._local = threading.local()  # the patience of the thread that runs a round (never the notifications')

    @contextlib.contextmanager
    def patience(self, deadline: float | None, *, sleep: Callable[[float], None] = time.sleep,
                 on_away: Callable[[Away], None] | None = None) -> Iterator[None]:
        """Within this block, on this thread, a request that finds the platform away tries again until ``deadline``.

        Away means: the connection was refused, reset or closed without an answer, or the answer was
        502, 503 or 504, after the quick ``max_retries``. Each further try waits :data:`PATIENCE_BACKOFF`
        (through ``sleep``: a round passes an interruptible one); ``on_away`` hears of each failure and of
        the call getting through (:class:`Away`). ``deadline`` is a ``time.monotonic()`` value; None tries
        until the platform answers. Requests sent ``once`` are not affected; nor are other threads.
        """
        previous = getattr(self._local, "patience", None)
        self._local.patience = _Patience(deadline, sleep, on_away)
        try:
            yield
        finally:
            self._local.patience = previous

    def request(self, method: str, path: str, *, expected: int = HTTPStatus.OK, accept: str = JSON,
                headers: Mapping[str, str] | None = None, once: bool = False, **kwargs: Any) -> requests.Response:
        """Send one request to ``base_url + path``; any status but ``expected`` raises its :class:`ApiError`.

        ``once``: no retries and at most :data:`ONCE_TIMEOUT_S` s, for a look its caller repeats anyway (a
        wait stays quick to interrupt while the platform is away).
        """
        url = self.base_url + path
        timeout = min(self.timeout, ONCE_TIMEOUT_S) if once else self.timeout

        def send(session: requests.Session) -> requests.Response:
            try:
                response = session.request(method, url, headers={**self.headers, "accept": accept, **(headers or {})},
                                           verify=self.verify, cert=self.cert, proxies=self.proxies, timeout=timeout,
                                           **kwargs)
            except requests.exceptions.RetryError as exc:
                raise ServerError(f"{method} {path} kept failing after retries: {exc}", 503) from exc
            except requests.exceptions.RequestException as exc:
                if not tls_hint(exc, self.cert) and away_reason(exc) in _CLOSED and not self.proxies \
                        and closes_after_handshake(url, self.verify, min(timeout, PROBE_TIMEOUT_S)):
                    refused = requests.exceptions.SSLError(f"TLS handshake refused: {exc}")
                    refused.__cause__ = exc  # an SSLError: a refusal the platform repeats, never "away" (retried)
                    raise TransportError(f"{method} {url} failed: {exc}{certificate_hint(self.cert)}", refused) \
                        from None
                raise transport_error(f"{method} {path}", url, exc, self.cert) from None
            if response.status_code != expected:
                text = error_text(response)
                if response.status_code in RETRY_STATUSES and session is self._session:
                    text += f" (still failing after {self.max_retries} retries)"
                raise error_class(response.status_code)(f"{method} {path}: {text}", response.status_code)
            return response

        return send(self._single) if once else self._patiently(f"{method} {path}", send)

    def _patiently(self, call: str, send: Callable[[requests.Session], requests.Response]) -> requests.Response:
        """``send(session)``, tried again while the platform is away and this thread's :meth:`patience` lasts.

        The first try has the session's quick retries; each later one is a single request after a
        :data:`PATIENCE_BACKOFF` delay.
        """
        patience: _Patience | None = getattr(self._local, "patience", None)
        first: float | None = None
        backoff = Backoff(*PATIENCE_BACKOFF)
        while True:
            try:
                response = send(self._session if first is None else self._single)
            except (TransportError, ServerError) as exc:
                reason = (away_reason(exc.detail) if isinstance(exc, TransportError) and exc.detail else
                          f"HTTP {exc.status_code}" if isinstance(exc, ServerError) and exc.status_code in AWAY_STATUSES
                          else None)
                if patience is None or reason is None:
                    raise
                now = time.monotonic()
                first = now if first is None else first
                if patience.deadline is not None and now >= patience.deadline:
                    raise _gave_up(exc, now - first) from None
                if patience.on_away is not None:
                    patience.on_away(Away(call, reason, now - first, patience.deadline))
                delay = backoff.next()
                patience.sleep(delay if patience.deadline is None else min(delay, patience.deadline - now))
                continue
            if first is not None:
                logger.info("%s got through after %.1f s of the platform being away", call, time.monotonic() - first)
                if patience is not None and patience.on_away is not None:
                    patience.on_away(Away(call, "", time.monotonic() - first, patience.deadline, back=True))
            return response

    def request_data(self, method: str, path: str, context: str, **kwargs: Any) -> dict[str, Any]:
        """:meth:`request`, then the ``data`` object of its JSON answer (see :func:`json_data`)."""
        return json_data(self.request(method, path, **kwargs), context)

    @contextlib.contextmanager
    def get_blob(self, url: str, *, deadline: float | None = None) -> Iterator[requests.Response]:
        """GET a signed URL, streamed and without credentials; errors while reading it are translated too.

        Asks for the body as it is stored (``Accept-Encoding: identity``). With ``deadline`` (a
        ``time.monotonic()`` value), no single read waits past it; the reader checks the whole body's time.
        """
        def send(session: requests.Session) -> requests.Response:
            read = self.timeout if deadline is None else max(0.1, min(self.timeout, deadline - time.monotonic()))
            try:
                response = session.get(url, stream=True, verify=self.verify, cert=self.cert, proxies=self.proxies,
                                       headers={"Accept-Encoding": "identity"}, timeout=(self.timeout, read))
            except requests.exceptions.RequestException as exc:
                raise transport_error(f"Downloading {urlsplit(url).path}", url, exc, self.cert) from None
            if response.status_code != HTTPStatus.OK:
                with response:
                    raise error_class(response.status_code)(f"GET download_url: {error_text(response)}",
                                                            response.status_code)
            return response

        with self._patiently(f"GET {urlsplit(url).path}", send) as response:
            try:
                yield response
            except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError) as exc:
                raise TransportError(f"Downloading {urlsplit(url).path} failed: {exc}", exc) from None

    def close(self) -> None:
        self._session.close()
        self._single.close()


def _gave_up(exc: TransportError | ServerError, waited_s: float) -> BranchKeyError:
    """``exc`` again, saying that the call was tried for ``waited_s`` s, until its deadline."""
    note = f" (tried again for {waited_s:.0f} s, until the round's deadline)"
    if isinstance(exc, ServerError):
        return type(exc)(exc.message + note, exc.status_code)
    return type(exc)(f"{exc}{note}", exc.detail)


#: what OpenSSL says when the other end answers a TLS handshake in plain HTTP
_PLAIN_HTTP_ANSWER = ("WRONG_VERSION_NUMBER", "wrong version number", "record layer failure", "RECORD_LAYER_FAILURE")


def transport_error(call: str, url: str, exc: BaseException, cert: object = None) -> TransportError:
    """The :class:`TransportError` a person can act on, for ``call`` (``"GET /api/v1/run/b"``) to ``url`` that
    failed with ``exc``: a server that is not there names its URL and ``branchkey-local serve``; https to a
    plain-HTTP server says so; a refused client certificate says what to pass (:func:`tls_hint`, ``cert``:
    the client's); anything else keeps ``requests``' words. ``exc`` is kept as ``detail``, and
    logged at DEBUG with its chain.

    Example:
        >>> refused = requests.exceptions.ConnectionError(ConnectionRefusedError(111, "Connection refused"))
        >>> print(transport_error("GET /api/v1/run/b", "http://127.0.0.1:8080/api/v1/run/b", refused))
        GET /api/v1/run/b: cannot reach a BranchKey server at http://127.0.0.1:8080 (connection refused). Is 'branchkey-local serve' running there? Start it, or give the client the host that serves your branch.
        >>> wrong = requests.exceptions.SSLError("[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1000)")
        >>> print(transport_error("GET /api/v1/run/b", "https://127.0.0.1:8080/api/v1/run/b", wrong))
        GET /api/v1/run/b: https://127.0.0.1:8080 answered in plain HTTP, not TLS: use http://127.0.0.1:8080 (as 'branchkey-local serve' prints it), or serve with --tls-cert and --tls-key.
    """
    logger.debug("%s to %s failed", call, url, exc_info=exc)
    parts = urlsplit(url)
    base = f"{parts.scheme}://{parts.netloc}"
    if isinstance(exc, requests.exceptions.SSLError) and any(text in str(exc) for text in _PLAIN_HTTP_ANSWER):
        return TransportError(f"{call}: {base} answered in plain HTTP, not TLS: use http://{parts.netloc} (as "
                              f"'branchkey-local serve' prints it), or serve with --tls-cert and --tls-key.", exc)
    reason = away_reason(exc)
    if reason is not None:
        return TransportError(f"{call}: cannot reach a BranchKey server at {base} ({reason}). Is 'branchkey-local "
                              f"serve' running there? Start it, or give the client the host that serves your branch.",
                              exc)
    return TransportError(f"{call} to {base} failed: {exc}{tls_hint(exc, cert)}", exc)


__all__ = ["AWAY_STATUSES", "Away", "HttpSession", "RETRY_STATUSES", "away_reason", "error_class", "error_text",
           "json_data", "make_session", "tls_hint", "certificate_hint", "closes_after_handshake", "transport_error"]
