"""The package's version, written once: the top-level ``__version__``, the client's upload metadata
(``client_version``), the CLI's ``--version`` and the OpenAPI document all read it from here, so that the
client needs nothing from the package above it (no import cycle)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
