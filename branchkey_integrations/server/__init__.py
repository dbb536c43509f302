"""branchkey-local: a local BranchKey-compatible server (``pip install branchkey-integrations[server]``).

Example:
    >>> import tempfile
    >>> from branchkey_integrations.server import Store
    >>> store = Store(tempfile.mkdtemp())
    >>> store.list_branches()
    []
    >>> store.close()

``create_app`` needs aiohttp and is imported on first use, so the store (and the CLI's
``init``) work without it. The server's errors (:class:`LocalServerError` and its subclasses) are
exported here; their classes live in ``core/errors.py`` with every other.
"""

from __future__ import annotations

from typing import Any

from ..core.errors import (
    AggregationError, BrokerArgumentError, BrokerError, DeltaBaseError, InvalidValueError, LeafRevokedError,
    LocalServerError,
    QuotaExceededError,
    RecordNotFoundError, RoundClosedError, RoundInProgressError, RunNotStartedError, StorageFullError,
    TlsConfigError, UploadInterruptedError,
)
from ..core.errors import SERVER_ERRORS
from .store import Store

__all__ = ["Store", "create_app", *SERVER_ERRORS]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
