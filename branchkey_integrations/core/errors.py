"""The exception classes of branchkey-integrations.

Every error the package raises on purpose derives from :class:`BranchKeyError`, so
``except BranchKeyError`` catches them all. Errors of lower layers (``requests``,
``pika``, ``websockets``) are translated into these at one boundary each (the REST
client, the notification transports) and kept as ``__cause__``.
"""

from __future__ import annotations


class BranchKeyError(Exception):
    """Base class of every error raised by branchkey-integrations."""


class CredentialsError(BranchKeyError, ValueError):
    """Leaf credentials are missing a field or hold a malformed value."""


class ArchiveError(BranchKeyError, ValueError):
    """An NPZ model archive is malformed, unsafe, or does not match what was expected."""


class ArchiveTooLargeError(ArchiveError):
    """An archive exceeds a size or member-count limit (it may be hostile)."""


class TransportError(BranchKeyError):
    """The platform could not be reached (connection refused, DNS, TLS, timeout)."""


class ApiError(BranchKeyError):
    """The platform answered with an error status.

    Attributes:
        status_code: the HTTP status of the answer.
        message: the platform's ``error`` text (or the body when it had none).
    """

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(f"{message} (HTTP {status_code})")
        self.message = message
        self.status_code = status_code

    def __reduce__(self) -> tuple:
        # keeps the error picklable (DDP broadcast, multiprocessing) despite the two-argument __init__
        return (type(self), (self.message, self.status_code))


class AuthenticationError(ApiError):
    """401: the leaf id or session token was not accepted."""


class PermissionDeniedError(ApiError):
    """403: the credentials are valid but may not do this (another branch's file, say)."""


class NotFoundError(ApiError):
    """404: no such branch, file or route."""


class RequestRejectedError(ApiError):
    """Another 4xx: the platform refused the request as sent (a bad upload, say)."""


class ServerError(ApiError):
    """5xx that persisted after every retry."""


class RunBlockedError(BranchKeyError):
    """An upload was attempted while the run is not in ``start`` and ``wait_for_run`` is off."""


class NotificationError(BranchKeyError):
    """The notification channel (AMQP or WebSocket) failed and could not reconnect."""


class AggregationTimeoutError(BranchKeyError, TimeoutError):
    """No aggregate arrived within the allowed time."""


__all__ = [
    "BranchKeyError",
    "CredentialsError",
    "ArchiveError",
    "ArchiveTooLargeError",
    "TransportError",
    "ApiError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "RequestRejectedError",
    "ServerError",
    "RunBlockedError",
    "NotificationError",
    "AggregationTimeoutError",
]
