"""The read-only properties of :class:`~.client.Client`: its identity, host, connection settings and run status.

Why a class of its own: they only read what the client set up (its credentials, HTTP session, waiter and
notification transport), and keeping them apart keeps :mod:`.client` to its protocol calls.
"""

from __future__ import annotations

from pathlib import Path

from .credentials import Credentials
from .http import HttpSession
from .notifications import NotificationTransport
from .waiter import RoundWaiter


class ClientProperties:
    """What a client is and where it stands, as the official client's properties name it (``proxies`` settable)."""

    _credentials: Credentials
    _api_host: str
    _http: HttpSession
    _output_dir: Path
    _authenticated: bool
    _waiter: RoundWaiter
    _transport: NotificationTransport | None

    @property
    def credentials(self) -> Credentials:
        return self._credentials

    @property
    def leaf_id(self) -> str:
        return self._credentials.id

    @property
    def name(self) -> str:
        return self._credentials.name

    @property
    def branch_id(self) -> str:
        return self._credentials.branch_id

    @property
    def tree_id(self) -> str:
        return self._credentials.tree_id

    @property
    def user_id(self) -> str:
        return self._credentials.owner_id

    @property
    def host(self) -> str:
        return self._api_host

    @property
    def ssl(self) -> bool | str:
        return self._http.verify

    @property
    def proxies(self) -> dict[str, str] | None:
        """The ``requests`` proxies dict; settable, as in the official client."""
        return self._http.proxies

    @proxies.setter
    def proxies(self, value: dict[str, str] | None) -> None:
        self._http.proxies = value

    @property
    def output_dir(self) -> str:
        return str(self._output_dir)

    @property
    def is_authenticated(self) -> bool:
        return self._authenticated

    @property
    def run_status(self) -> str | None:
        return self._waiter.run_status

    @property
    def run_number(self) -> int | None:
        return self._waiter.run_number

    @property
    def waiter(self) -> RoundWaiter:
        """The run status and aggregation ids this client's calls and notifications keep current."""
        return self._waiter

    @property
    def transport(self) -> str | None:
        """``"amqp"``, ``"websocket"``, or None when notifications are off."""
        return self._transport.name if self._transport else None

    @property
    def notifications(self) -> NotificationTransport | None:
        return self._transport


__all__ = ["ClientProperties"]
