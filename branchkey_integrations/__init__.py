"""Federated learning with BranchKey as a one-line callback for PyTorch Lightning and Keras.

``import branchkey_integrations`` needs neither torch nor tensorflow: the framework
adapters (``branchkey_integrations.lightning``, ``branchkey_integrations.keras``) are
imported only when used.
"""

from __future__ import annotations

from .core.version import __version__

from .core import *  # noqa: F403,E402 - the core's public names are the package's
from .core.errors import *  # noqa: F403,E402 - again, for type checkers: they do not follow core's computed __all__
from .core import __all__ as _core_names  # noqa: E402

__all__ = ["__version__", *_core_names]
