"""Federated learning with BranchKey as a one-line callback for PyTorch Lightning and Keras.

``import branchkey_integrations`` needs neither torch nor tensorflow: the framework
adapters (``branchkey_integrations.lightning``, ``branchkey_integrations.keras``) are
imported only when used. The top level holds what a leaf's code uses (:mod:`.core`'s names);
the errors of ``branchkey-local`` and of the simulation are exported by
``branchkey_integrations.server`` and ``branchkey_integrations.simulation``.
"""

from __future__ import annotations

import warnings
from typing import Any

from .core import (  # the core's public names are the package's
    AnalyticsResult, AggregateMismatchError, AggregationTimeoutError, AnalyticsError, AnalyticsRoundMissedError, ApiError, ArchiveError, ArchiveTooLargeError, AuthenticationError,
    BranchKeyError, Client, ClientOptions, Credentials, CredentialsError, DownloadBuffer, DownloadTimeoutError,
    Federation, InsufficientStorageError, LeafOptions, NotFoundError, Notification, NotificationError, Outcome,
    PermissionDeniedError, ProtocolError, RequestRejectedError, RoundInterrupted, RoundResult, RunBlockedError,
    RunStopped, ServerError, TransportError, UploadReceipt, WaitProgress, WeightingError,
)
from .core import errors as _errors
from .core.version import __version__

__all__ = [
    "__version__",
    "AnalyticsResult", "Client", "ClientOptions", "Credentials", "DownloadBuffer", "Federation", "LeafOptions", "Notification",
    "Outcome", "RoundResult", "UploadReceipt", "WaitProgress",
    "BranchKeyError", "CredentialsError", "WeightingError", "ArchiveError", "ArchiveTooLargeError",
    "AggregateMismatchError", "AnalyticsError", "AnalyticsRoundMissedError", "TransportError", "DownloadTimeoutError", "ProtocolError", "ApiError",
    "AuthenticationError", "PermissionDeniedError", "NotFoundError", "RequestRejectedError", "ServerError",
    "InsufficientStorageError", "NotificationError", "RunBlockedError", "RunStopped", "AggregationTimeoutError",
    "RoundInterrupted",
]


def __getattr__(name: str) -> Any:
    """The server's and the simulation's errors, which the top level exported before 0.2: still found, with a
    ``DeprecationWarning`` naming their home."""
    home = ("server" if name in _errors.SERVER_ERRORS else "simulation" if name in _errors.SIMULATION_ERRORS
            else None)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"branchkey_integrations.{name} moved: import it from branchkey_integrations.{home}",
                  DeprecationWarning, stacklevel=2)
    return getattr(_errors, name)
