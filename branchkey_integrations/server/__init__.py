"""branchkey-local: a local BranchKey-compatible server (``pip install branchkey-integrations[server]``).

Example:
    >>> import tempfile
    >>> from branchkey_integrations.server import Store
    >>> store = Store(tempfile.mkdtemp())
    >>> store.list_branches()
    []
    >>> store.close()

``create_app`` needs aiohttp and is imported on first use, so the store (and the CLI's
``init``) work without it.
"""

from __future__ import annotations

from typing import Any

from .store import Store

__all__ = ["Store", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
