"""The federation core: credentials, wire format, REST client, notifications. No framework imports."""

from .client import Client, DownloadBuffer
from .credentials import Credentials
from .errors import *  # noqa: F403 - the exception classes are part of the public surface
from .errors import __all__ as _error_names
from .protocol import Notification

__all__ = ["Client", "Credentials", "DownloadBuffer", "Notification", *_error_names]
