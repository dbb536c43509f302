"""The federation core: what a leaf's code uses, framework-free (the package's top level exports the same names).

The client (:class:`Client`, its :class:`ClientOptions`, the :class:`UploadReceipt` of an upload), one
leaf's rounds (:class:`Federation`, its :class:`LeafOptions`, the :class:`RoundResult` and :class:`Outcome`
of a round, the :class:`WaitProgress` of a wait, the :class:`AnalyticsResult` of an analytics round), credentials, and the errors a leaf meets. The errors of
``branchkey-local`` and of the simulation are exported by ``branchkey_integrations.server`` and
``branchkey_integrations.simulation``. No framework imports.
"""

from .analytics_result import AnalyticsResult
from .client import Client, DownloadBuffer
from .client_options import ClientOptions
from .credentials import Credentials
from .errors import (
    AggregateMismatchError, AggregationTimeoutError, AnalyticsError, AnalyticsRoundMissedError, ApiError, ArchiveError, ArchiveTooLargeError, AuthenticationError,
    BranchKeyError, CredentialsError, DownloadTimeoutError, InsufficientStorageError, NotFoundError, NotificationError,
    PermissionDeniedError, ProtocolError, RequestRejectedError, RoundInterrupted, RunBlockedError, RunStopped,
    ServerError, TransportError, WeightingError,
)
from .federation import Federation
from .leaf_options import LeafOptions
from .outcome import Outcome, RoundResult
from .progress import UploadReceipt, WaitProgress
from .protocol import Notification

__all__ = [
    "AnalyticsResult", "Client", "ClientOptions", "Credentials", "DownloadBuffer", "Federation", "LeafOptions", "Notification",
    "Outcome", "RoundResult", "UploadReceipt", "WaitProgress",
    # the errors a leaf meets: errors.LEAF_ERRORS (a test ties the two)
    "BranchKeyError", "CredentialsError", "WeightingError", "ArchiveError", "ArchiveTooLargeError",
    "AggregateMismatchError", "AnalyticsError", "AnalyticsRoundMissedError", "TransportError", "DownloadTimeoutError", "ProtocolError", "ApiError",
    "AuthenticationError", "PermissionDeniedError", "NotFoundError", "RequestRejectedError", "ServerError",
    "InsufficientStorageError", "NotificationError", "RunBlockedError", "RunStopped", "AggregationTimeoutError",
    "RoundInterrupted",
]
