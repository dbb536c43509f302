"""The exception classes of branchkey-integrations: one tree, one meaning per name.

Every error the package raises on purpose derives from :class:`BranchKeyError`, so
``except BranchKeyError`` catches them all. Errors of lower layers (``requests``,
``pika``, ``websockets``) are translated into these at one boundary each (the HTTP
layer, the notification transports) and kept as ``__cause__`` (or, for :class:`TransportError`, as
``detail``: an unreachable server is one line).

The tree, by who raises what:

- a leaf's own input: :class:`CredentialsError`, :class:`WeightingError`, :class:`ArchiveError`
  (and :class:`ArchiveTooLargeError`, :class:`AggregateMismatchError`), :class:`AnalyticsError`;
- talking to the platform: :class:`TransportError` (unreachable; :class:`DownloadTimeoutError`, a
  download that did not arrive by its deadline), :class:`ApiError` and its
  status classes (an error answer), :class:`ProtocolError` (an answer or message that does not
  follow PROTOCOL.md), :class:`NotificationError` (the channel failed);
- the round: :class:`RunBlockedError`, :class:`RunStopped`, :class:`AggregationTimeoutError` (and
  :class:`AnalyticsRoundMissedError`);
- ``branchkey-local`` (:class:`LocalServerError`) and its simulation (:class:`SimulationError`).

The module imports nothing, so every layer (server and simulation included) can use it.
"""

from __future__ import annotations


class BranchKeyError(Exception):
    """Base class of every error raised by branchkey-integrations."""


# -- a leaf's own input ------------------------------------------------------------------------


class CredentialsError(BranchKeyError, ValueError):
    """Leaf credentials are missing a field or hold a malformed value."""


class WeightingError(BranchKeyError, ValueError):
    """A leaf's weighting is not a number in the accepted range (it is usually the local sample count)."""


class ArchiveError(BranchKeyError, ValueError):
    """An NPZ model archive is malformed, unsafe, or does not match what was expected."""


class ArchiveTooLargeError(ArchiveError):
    """An archive exceeds a size or member-count limit (it may be hostile).

    ``limit`` says which, where the raiser knows: ``"members"`` (their count), ``"bytes"`` (the size
    the zip directory declares, inflated) or ``"ratio"`` (compressed to inflated); else None.
    """

    def __init__(self, message: str, *, limit: str | None = None) -> None:
        super().__init__(message)
        self.limit = limit


class AggregateMismatchError(ArchiveError):
    """The aggregate does not fit the local model (layer count, shape, dtype kind, or non-finite values)."""


class AnalyticsError(BranchKeyError, ValueError):
    """A column or field given to federated analytics cannot be sent as it is (not numeric, not 1-D, empty,
    infinite, NaN under ``nan_policy="raise"``, a name two entries share), or an aggregate is not an analytics one."""


# -- talking to the platform ---------------------------------------------------------------------


class TransportError(BranchKeyError):
    """The platform could not be reached (connection refused, DNS, TLS, timeout, a cut connection).

    ``detail``: the lower-level error (``requests``'), or None. The HTTP layer keeps it here rather than as
    ``__cause__``, so that a server that is not running reads as one line naming its URL, not as a
    100-line urllib3 -> requests chain (the chain is logged at DEBUG).
    """

    def __init__(self, message: str, detail: BaseException | None = None) -> None:
        super().__init__(message)
        self.detail = detail


class DownloadTimeoutError(TransportError, TimeoutError):
    """A download did not arrive by its deadline (the server sent too slowly, or stopped sending)."""


class ProtocolError(BranchKeyError):
    """The platform answered, or sent a notification, that does not follow the protocol (PROTOCOL.md)."""


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


class InsufficientStorageError(ServerError):
    """507: the server is out of space; never retried (the body would be sent again for nothing)."""


class NotificationError(BranchKeyError):
    """The notification channel (AMQP or WebSocket) failed and could not reconnect."""


# -- the round -----------------------------------------------------------------------------------


class RunBlockedError(BranchKeyError):
    """An upload was attempted while the run is not in ``start`` and ``wait_for_run`` is off."""


class RunStopped(BranchKeyError):
    """The run was stopped on the platform; training should end gracefully, not fail."""


class AggregationTimeoutError(BranchKeyError, TimeoutError):
    """No aggregate arrived within the allowed time."""


class AnalyticsRoundMissedError(AggregationTimeoutError):
    """An analytics round's aggregate will not arrive: a later analytics round of the branch completed, and its
    own aggregate was never received (a later round's result holds other uploads, so it is not taken instead)."""


class RoundInterrupted(BranchKeyError):
    """A wait of the round was interrupted (:meth:`RoundWaiter.interrupt`: SIGTERM, Ctrl-C, another thread).

    An upload in flight when the interrupt came has completed (it counts) or never reached the server;
    the leaf should stop as it would on a stopped run.
    """


# -- branchkey-local -----------------------------------------------------------------------------


class LocalServerError(BranchKeyError):
    """Base of what ``branchkey-local`` refuses or fails at, independent of HTTP."""


class RecordNotFoundError(LocalServerError, LookupError):
    """No tree, branch, leaf, round or file with that id in the server's store."""


class InvalidValueError(LocalServerError, ValueError):
    """A value given to the server (a name, a count, a run status, an upload) is out of range."""


class RunNotStartedError(LocalServerError):
    """The branch's run is paused or stopped, so the round accepts no upload."""


class RoundClosedError(LocalServerError):
    """The round the upload was meant for has been aggregated or left in the meantime."""


class RoundInProgressError(LocalServerError):
    """A change that must wait for a round boundary (a branch's strategy) while the open round holds uploads."""


class DeltaBaseError(LocalServerError):
    """A delta upload names a base that is not its branch's latest aggregate (stale, unknown, or another branch's)."""


class AggregationError(LocalServerError):
    """A round's uploads could not be aggregated (missing, unreadable or mismatched files)."""


class StorageFullError(LocalServerError):
    """The server's disk is full (or over quota): it cannot store an upload or an aggregate now."""


class UploadInterruptedError(LocalServerError):
    """An upload body stopped arriving: the client disconnected or sent nothing for the idle timeout."""


class QuotaExceededError(LocalServerError):
    """A leaf sent more of something than the server keeps per round (metrics reports)."""


class LeafRevokedError(LocalServerError):
    """A leaf's credentials were revoked or rotated while its request was under way (its upload does not count)."""


class TlsConfigError(LocalServerError):
    """A certificate, key or CA file that cannot serve TLS (missing, unreadable, readable by others, mismatched)."""


class BrokerError(LocalServerError):
    """RabbitMQ could not be provisioned or reached by ``branchkey-local``."""


class BrokerArgumentError(BrokerError, ValueError):
    """A RabbitMQ URL or setting given to ``branchkey-local`` is malformed."""


# -- the simulation ------------------------------------------------------------------------------


class SimulationError(BranchKeyError):
    """The simulation could not finish; the message says what failed and where its log is."""


class EmbeddedServerError(SimulationError):
    """The simulation's embedded server did not start, died, or refused an admin call."""


class PartitionError(SimulationError, ValueError):
    """The training set cannot be split as asked (too many leaves, or a minimum no draw could meet)."""


class LeafFailedError(SimulationError):
    """A leaf (or the centralized baseline) process exited before finishing its job."""


class SimulationTerminated(SimulationError):
    """The simulation received SIGTERM; raised in the main thread so cleanup runs."""


__all__ = [
    "BranchKeyError",
    "CredentialsError",
    "WeightingError",
    "ArchiveError",
    "ArchiveTooLargeError",
    "AggregateMismatchError",
    "AnalyticsError",
    "TransportError",
    "DownloadTimeoutError",
    "ProtocolError",
    "ApiError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "RequestRejectedError",
    "ServerError",
    "InsufficientStorageError",
    "NotificationError",
    "RunBlockedError",
    "RunStopped",
    "AggregationTimeoutError",
    "AnalyticsRoundMissedError",
    "RoundInterrupted",
    "LocalServerError",
    "RecordNotFoundError",
    "InvalidValueError",
    "RunNotStartedError",
    "RoundClosedError",
    "RoundInProgressError",
    "DeltaBaseError",
    "AggregationError",
    "StorageFullError",
    "UploadInterruptedError",
    "QuotaExceededError",
    "LeafRevokedError",
    "TlsConfigError",
    "BrokerError",
    "BrokerArgumentError",
    "SimulationError",
    "EmbeddedServerError",
    "PartitionError",
    "LeafFailedError",
    "SimulationTerminated",
]

#: which surface exports each error: ``branchkey_integrations.server`` those of ``branchkey-local``, and
#: ``branchkey_integrations.simulation`` the simulation's; the package's top level the rest, a leaf's
SERVER_ERRORS = tuple(name for name in __all__ if issubclass(globals()[name], LocalServerError))
SIMULATION_ERRORS = tuple(name for name in __all__ if issubclass(globals()[name], SimulationError))
LEAF_ERRORS = tuple(name for name in __all__ if name not in SERVER_ERRORS + SIMULATION_ERRORS)
