"""HTTP for the leaf client: one session with retries, and the one boundary where ``requests`` errors end.

This module owns the ``requests.Session`` (its connection pool and urllib3 ``Retry`` on 408, 429,
500, 502-504 and connection errors, with exponential backoff; never 507, out of space, whose body
would be sent again for nothing), timeouts, TLS verification and proxies;
the translation of every ``requests`` failure and every error status into the core error tree
(:mod:`.errors`); the ``{"data": ...}`` envelope every JSON answer wears (a malformed one is a
:class:`ProtocolError`); and the streamed GET of a signed download URL, which carries no
credentials. It knows no BranchKey call: paths, bodies and their meaning belong to
:mod:`.client`.

Why one boundary: a caller (the client, a callback, a user) can then rely on ``except
BranchKeyError`` alone, and the lower-level error is always kept as ``__cause__``.

Example:
    >>> error_class(404).__name__, error_class(503).__name__, error_class(422).__name__, error_class(507).__name__
    ('NotFoundError', 'ServerError', 'RequestRejectedError', 'InsufficientStorageError')
"""

from __future__ import annotations

import contextlib
import logging
from http import HTTPStatus
from typing import Any, Iterator, Mapping
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from .errors import (
    ApiError,
    AuthenticationError,
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
JSON = "application/json"
ONCE_TIMEOUT_S = 5.0  # the most a request sent ``once`` waits: it is asked again soon anyway


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
    except ValueError:
        return response.text[:300] or response.reason
    if isinstance(body, dict) and "error" in body:
        return str(body["error"])
    return str(body)[:300]


def json_data(response: requests.Response, context: str) -> dict[str, Any]:
    """Unwrap ``{"data": {...}}``; :class:`ProtocolError` naming ``context`` when the answer is not that."""
    try:
        data = response.json()["data"]
    except (ValueError, KeyError, TypeError) as exc:
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


class HttpSession:
    """Authenticated requests to one API host, every failure raised as a :class:`BranchKeyError`.

    Args:
        base_url: the API host, prefixed to every ``path``.
        headers: sent with every API request (credentials); never with :meth:`get_blob`.
        verify: verify TLS certificates (settable later, as ``disable_ssl_verification`` does).
        proxies: a ``requests`` proxies dict (settable later).
        timeout: seconds for each request (connect and read).
        max_retries, backoff_factor: see :func:`make_session`.

    Example:
        >>> http = HttpSession("http://127.0.0.1:8080", {"Authorization": "Bearer leaf:token"})
        >>> http.close()
    """

    def __init__(self, base_url: str, headers: Mapping[str, str], *, verify: bool = True,
                 proxies: dict[str, str] | None = None, timeout: float = 30.0, max_retries: int = 3,
                 backoff_factor: float = 0.5) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = dict(headers)
        self.verify = verify
        self.proxies = proxies
        self.timeout = timeout
        self.max_retries = max_retries
        self._session = make_session(max_retries, backoff_factor)
        self._single = make_session(0, 0.0)  # for requests sent once: a periodic look that is repeated anyway

    def request(self, method: str, path: str, *, expected: int = HTTPStatus.OK, accept: str = JSON,
                headers: Mapping[str, str] | None = None, once: bool = False, **kwargs: Any) -> requests.Response:
        """Send one request to ``base_url + path``; any status but ``expected`` raises its :class:`ApiError`.

        ``once``: no retries and at most :data:`ONCE_TIMEOUT_S` s, for a look its caller repeats anyway (a
        wait stays quick to interrupt while the platform is away).
        """
        url = self.base_url + path
        session, timeout = (self._single, min(self.timeout, ONCE_TIMEOUT_S)) if once else (self._session, self.timeout)
        try:
            response = session.request(method, url, headers={**self.headers, "accept": accept, **(headers or {})},
                                       verify=self.verify, proxies=self.proxies, timeout=timeout, **kwargs)
        except requests.exceptions.RetryError as exc:
            raise ServerError(f"{method} {path} kept failing after retries: {exc}", 503) from exc
        except requests.exceptions.RequestException as exc:
            raise TransportError(f"{method} {url} failed: {exc}") from exc
        if response.status_code != expected:
            text = error_text(response)
            if response.status_code in RETRY_STATUSES and not once:
                text += f" (still failing after {self.max_retries} retries)"
            raise error_class(response.status_code)(f"{method} {path}: {text}", response.status_code)
        return response

    def request_data(self, method: str, path: str, context: str, **kwargs: Any) -> dict[str, Any]:
        """:meth:`request`, then the ``data`` object of its JSON answer (see :func:`json_data`)."""
        return json_data(self.request(method, path, **kwargs), context)

    @contextlib.contextmanager
    def get_blob(self, url: str) -> Iterator[requests.Response]:
        """GET a signed URL, streamed and without credentials; errors while reading it are translated too."""
        try:
            with self._session.get(url, stream=True, verify=self.verify, proxies=self.proxies,
                                   timeout=self.timeout) as response:
                if response.status_code != HTTPStatus.OK:
                    raise error_class(response.status_code)(f"GET download_url: {error_text(response)}",
                                                            response.status_code)
                yield response
        except requests.exceptions.RequestException as exc:
            raise TransportError(f"Downloading {urlsplit(url).path} failed: {exc}") from exc

    def close(self) -> None:
        self._session.close()
        self._single.close()


__all__ = ["HttpSession", "RETRY_STATUSES", "error_class", "error_text", "json_data", "make_session"]
