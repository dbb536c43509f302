"""How branchkey-local answers over HTTP: the bodies, the error signal, and the one error middleware.

Every answer is ``{"data": ...}`` or, on failure, ``{"error": text}`` with a status
(PROTOCOL.md). Handlers raise :class:`HttpProblem` for what is HTTP's own business
(authentication, access, malformed requests); the round logic, the upload receiver and the
store raise the domain errors of :mod:`branchkey_integrations.core.errors`, and
:data:`DOMAIN_STATUSES` is the single table that turns those into statuses. Leaf routes and
admin routes both rely on it, which is why it lives here rather than in either of them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any, Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..core.errors import (
    ArchiveError,
    ArchiveTooLargeError,
    DeltaBaseError,
    InvalidValueError,
    LeafRevokedError,
    QuotaExceededError,
    RecordNotFoundError,
    RoundClosedError,
    RoundInProgressError,
    RunNotStartedError,
    StorageFullError,
    UploadInterruptedError,
)
from ..core.protocol import is_file_id

logger = logging.getLogger(__name__)

#: how long a JSON body (metrics, admin calls: at most 16 MiB) may take to arrive
JSON_BODY_TIMEOUT_S = 60.0

_UNSAFE_PATH = re.compile(r"(^|/)\.\.?(/|$)|%2f|%5c|%2e|\\", re.IGNORECASE)

#: domain error -> HTTP status, most specific class first; the error's text becomes ``{"error": ...}``.
#: Anything not listed (a BrokerError, a bug) is logged and answered 500.
DOMAIN_STATUSES: tuple[tuple[type[Exception], int], ...] = (
    (RecordNotFoundError, 404),
    (ArchiveTooLargeError, 413),
    (ArchiveError, 400),
    (InvalidValueError, 400),
    (RunNotStartedError, 409),
    (RoundClosedError, 409),
    (RoundInProgressError, 409),
    (DeltaBaseError, 409),
    (StorageFullError, 507),
    (UploadInterruptedError, 408),
    (QuotaExceededError, 429),
    (LeafRevokedError, 401),
)
_DOMAIN_ERRORS = tuple(cls for cls, _ in DOMAIN_STATUSES)


class HttpProblem(Exception):
    """An error answer: the status and the text for ``{"error": ...}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def ok(data: Any, status: int = 200) -> web.Response:
    return web.json_response({"data": data}, status=status)


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def domain_status(exc: Exception) -> int:
    """The status :data:`DOMAIN_STATUSES` gives ``exc`` (which must be one of its classes)."""
    return next(status for cls, status in DOMAIN_STATUSES if isinstance(exc, cls))


def is_decimal(text: str) -> bool:
    """1 to 18 ASCII digits: ``int(text)`` then fits SQLite's 64-bit integers and never meets Python's
    4300-digit limit (``str.isdigit`` alone accepts '²', which ``int`` refuses)."""
    return text.isascii() and text.isdigit() and len(text) <= 18


def check_file_id(file_id: str) -> str:
    if not is_file_id(file_id):
        raise HttpProblem(400, f"Invalid file id {file_id[:80]!r}; expected a plain token such as a UUID.")
    return file_id


async def read_json_object(request: web.Request, max_bytes: int | None = None) -> dict[str, Any]:
    """The raw body as a JSON object, whatever the Content-Type (the metrics call sends none).

    A body that has not arrived within :data:`JSON_BODY_TIMEOUT_S` is answered 408 (a stalled client
    must not hold its connection and handler forever); one over ``max_bytes`` (None: the app's
    ``client_max_size``) 413, as soon as its Content-Length or its bytes so far say so.
    """
    try:
        raw = await asyncio.wait_for(read_body(request, max_bytes), JSON_BODY_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise HttpProblem(408, f"The request body did not arrive within {JSON_BODY_TIMEOUT_S:g} s; send it again.") from None
    try:
        body = json.loads(raw.decode("utf-8")) if raw else {}
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise HttpProblem(400, f"Body is not JSON ({exc}); expected a JSON object.") from exc
    if not isinstance(body, dict):
        raise HttpProblem(400, f"Body is JSON {type(body).__name__}; expected a JSON object.")
    check_unicode(body, "Body")
    return body


async def read_body(request: web.Request, max_bytes: int | None) -> bytes:
    """The whole body, refused with 413 past ``max_bytes`` before more than that is held in memory."""
    if max_bytes is None:
        return await request.read()
    if request.content_length is not None and request.content_length > max_bytes:
        raise HttpProblem(413, f"The body of {request.content_length} bytes is larger than this call accepts "
                               f"({max_bytes} bytes).")
    chunks, size = [], 0
    while chunk := await request.content.read(max_bytes + 1 - size):
        chunks.append(chunk)
        size += len(chunk)
        if size > max_bytes:
            raise HttpProblem(413, f"The body is larger than this call accepts ({max_bytes} bytes).")
    return b"".join(chunks)


def check_unicode(value: Any, where: str) -> None:
    """Refuse parsed JSON holding a lone UTF-16 surrogate (the escape ``\\ud800`` decodes to one): valid
    JSON, yet no UTF-8 text, so neither the store nor an answer could carry it."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start:exc.end] if isinstance(exc.object, str) else "?"
        raise InvalidValueError(f"{where} holds a lone UTF-16 surrogate ({bad!r}); expected valid Unicode text.") from None


@web.middleware
async def error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every failure becomes ``{"error": text}`` with its status; unexpected ones are logged as 500."""
    try:
        if _UNSAFE_PATH.search(request.raw_path.split("?", 1)[0]):
            raise HttpProblem(400, "Request path holds '.', '..' or an encoded separator; ids are plain tokens.")
        return await handler(request)
    except HttpProblem as exc:
        return error_response(exc.status, exc.message)
    except _DOMAIN_ERRORS as exc:
        return error_response(domain_status(exc), str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        answer = error_response(exc.status, f"{exc.reason}: {request.method} {request.path}. {_route_hint(exc.status)}")
        if "Allow" in exc.headers:  # a 405 says which methods the route has (RFC 9110)
            answer.headers["Allow"] = exc.headers["Allow"]
        return answer
    except (HttpProcessingError, web.RequestPayloadError) as exc:  # a body aiohttp could not parse: chunks, encoding
        return error_response(400, f"Malformed request body ({body_error_text(exc)}); send it as plain bytes, "
                                   "without a Content-Encoding.")
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "Internal server error; the server log has the details.")


def body_error_text(exc: Exception) -> str:
    """What aiohttp's parser said of a body, on one line (its header errors quote the bad line on the next)."""
    cause = exc.__cause__ if isinstance(exc, web.RequestPayloadError) else exc  # it wraps the parser's error
    text = cause.message if isinstance(cause, HttpProcessingError) else str(exc)
    return " ".join(str(text).split())[:200]


def _route_hint(status: int) -> str:
    if status == 404:
        return "Expected a route of PROTOCOL.md under /api/v1 or the admin API under /admin/v1."
    if status == 405:
        return "The route exists but not for this method."
    if status == 413:
        return "The body is larger than the server accepts."
    return ""


__all__ = [
    "HttpProblem", "DOMAIN_STATUSES", "ok", "error_response", "domain_status", "is_decimal", "check_file_id",
    "read_json_object", "read_body", "check_unicode", "body_error_text", "error_middleware",
]
