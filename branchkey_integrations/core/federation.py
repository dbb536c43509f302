"""One federated round, framework-free: submit arrays, wait for the aggregate, check it.

The Lightning and Keras callbacks turn a model into a list of NumPy arrays and back;
everything in between lives here, once: run status (pause waits, stop ends training),
draining stale notifications, the bounded wait with progress logs, and the complete check
of the aggregate before a single parameter may change. The waits themselves are the
client's :class:`~.waiter.RoundWaiter`: they wake on the notification, not on a poll.

Why drain before uploading: the client keeps only the newest aggregation id (as the
official client does). An id that arrived before this leaf's upload belongs to an earlier
round; accepting it would load a model that does not contain this leaf's contribution.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import wire
from .client import Client, DownloadBuffer
from .client_options import check_client_options
from .notifications import Backoff
from .protocol import DEFAULT_HOST, METRIC_MODES
from .credentials import Credentials, CredentialsLike
from .errors import (
    AggregateMismatchError,
    AggregationTimeoutError,
    ApiError,
    BranchKeyError,
    RunBlockedError,
    RunStopped,
)
from .outcome import Layers, Outcome, Weighting, exchange as _exchange
from .waiter import Every
from .wire import LayerSpec

logger = logging.getLogger(__name__)

ON_TIMEOUT = ("raise", "continue")
_REFRESH_S = 5.0  # how often a paused round re-reads the run status over REST, in case a notification was lost
_CONFLICT_BACKOFF = (0.1, 2.0, 2.0)  # initial, factor, maximum seconds between retries of an upload refused with 409


@dataclass(frozen=True)
class RoundResult:
    """The outcome of one round.

    Attributes:
        aggregation_id: the aggregate's id, or None when the wait timed out with ``on_timeout="continue"``.
        layers: the checked aggregate in the dtypes of the upload, or None after such a timeout.
            Mostly views of a download buffer that the next round reuses: load them, or copy them.
        wait_s: seconds from the end of the upload until the aggregate's id arrived (or the timeout).
        upload_mb: size of the uploaded layers in MB (10**6 bytes), before compression.
        round: rounds completed by this leaf, this one included.
    """

    aggregation_id: str | None
    layers: list[np.ndarray] | None
    wait_s: float
    upload_mb: float
    round: int

    @property
    def timed_out(self) -> bool:
        return self.layers is None


def _checked_timeout(name: str, value: float | None, allow_none: bool) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        allowed = "a number of seconds > 0" + (" or None (wait forever)" if allow_none else "")
        raise ValueError(f"Expected {name} to be {allowed}. Received: {name}={value!r}")
    return float(value)


class Federation:
    """A leaf's side of federated rounds, independent of any deep-learning framework.

    Args:
        credentials: :class:`Credentials`, a dict, a JSON file path, or None for ``BRANCHKEY_*``
            environment variables. Checked here; the platform is contacted only by :meth:`connect`.
        host: the API host (``https://app.branchkey.com`` or a ``branchkey-local`` URL).
        timeout: seconds a round may wait (run paused plus waiting for the aggregate) before
            ``on_timeout`` applies. None waits forever, and must be asked for explicitly.
        on_timeout: ``"raise"`` (:class:`AggregationTimeoutError`) or ``"continue"`` (the round
            returns without an aggregate and the local model keeps training).
        log_every_s: while waiting, log which round is awaited and for how long this often.
        transport: notification transport for :class:`Client` (``"auto"``, ``"websocket"``, ``"amqp"``).
        connect_timeout: seconds :meth:`connect` waits for the notification channel to open.
        client_options: further keyword arguments for :class:`Client` (``ssl``, ``rbmq_host``, ...),
            checked here with :func:`~.client_options.check_client_options`.

    Raises:
        CredentialsError: a credential field is missing or malformed.
        ValueError: another argument (``transport`` and ``client_options`` included) is out of range,
            or a client option is unknown.

    Example:
        >>> import numpy as np
        >>> federation = Federation("leaf_1.json", host="http://127.0.0.1:8080")  # doctest: +SKIP
        >>> federation.connect()  # doctest: +SKIP
        >>> result = federation.run_round([np.zeros((2, 2), np.float32)], weighting=100)  # doctest: +SKIP
        >>> result.round, result.layers[0].shape  # doctest: +SKIP
        (1, (2, 2))
    """

    def __init__(
        self,
        credentials: CredentialsLike | None,
        host: str = DEFAULT_HOST,
        *,
        timeout: float | None = 3600.0,
        on_timeout: str = "raise",
        log_every_s: float = 60.0,
        transport: str = "auto",
        connect_timeout: float = 30.0,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        self._credentials = Credentials.load(credentials)
        self.host = check_client_options({"host": host, "transport": transport})["host"]
        self.timeout = _checked_timeout("timeout", timeout, allow_none=True)
        if on_timeout not in ON_TIMEOUT:
            raise ValueError(f"Expected on_timeout in {ON_TIMEOUT}. Received: on_timeout={on_timeout!r}")
        self.on_timeout = on_timeout
        self.log_every_s = _checked_timeout("log_every_s", log_every_s, allow_none=False)
        self.connect_timeout = _checked_timeout("connect_timeout", connect_timeout, allow_none=False)
        self.transport = transport
        self.client_options = dict(client_options or {})
        for reserved in ("credentials", "host", "transport", "wait_for_run"):
            if reserved in self.client_options:
                raise ValueError(f"Expected client_options without {reserved!r} (set it on Federation itself). "
                                 f"Received: client_options={self.client_options!r}")
        check_client_options(self.client_options)  # a bad option fails here, not when the first round connects
        self.round = 0
        self.last_aggregation_id: str | None = None
        self._client: Client | None = None
        self._download_buffer = DownloadBuffer()  # reused round after round: see DownloadBuffer

    # ------------------------------------------------------------ connection
    def connect(self, client_factory: Callable[..., Client] = Client) -> Client:
        """Create the client (once) and wait for its notification channel; return it."""
        if self._client is None:
            client = client_factory(self._credentials, host=self.host, transport=self.transport,
                                    wait_for_run=False, **self.client_options)
            channel = client.notifications
            if channel is not None and not channel.wait_connected(self.connect_timeout):
                logger.warning("The %s notification channel is not open after %.0f s; an aggregate published "
                               "before it opens can be missed.", client.transport, self.connect_timeout)
            self._client = client
        return self._client

    @property
    def client(self) -> Client:
        if self._client is None:
            raise RuntimeError("Federation is not connected; call connect() first.")
        return self._client

    @property
    def credentials(self) -> Credentials:
        return self._credentials

    @property
    def connected(self) -> bool:
        return self._client is not None

    def close(self) -> None:
        """Close the client (safe to call twice); :meth:`connect` makes a new one."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def __getstate__(self) -> dict[str, Any]:
        # a client holds sockets and threads: never pickle it (DDP spawn, checkpoints), nor the buffer
        return {**self.__dict__, "_client": None, "_download_buffer": DownloadBuffer()}

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "last_aggregation_id": self.last_aggregation_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round = int(state.get("round", 0))
        self.last_aggregation_id = state.get("last_aggregation_id")

    # ----------------------------------------------------------------- round
    def run_round(
        self,
        layers: Sequence[np.ndarray],
        weighting: float,
        expected: Sequence[LayerSpec] | None = None,
        names: Sequence[str] | None = None,
    ) -> RoundResult:
        """Upload ``layers``, wait for the round's aggregate, check it against ``expected``.

        ``expected`` defaults to the specs of ``layers``; ``names`` (the parameters' real names)
        make error messages useful. Raises :class:`RunStopped` when the run is stopped,
        :class:`AggregateMismatchError` when the aggregate does not fit, and
        :class:`AggregationTimeoutError` on timeout with ``on_timeout="raise"``.
        """
        layers = [np.asarray(a) for a in layers]
        expected = list(expected) if expected is not None else [LayerSpec.of(a) for a in layers]
        if names is not None and len(names) != len(layers):
            raise ValueError(f"Expected one name per layer ({len(layers)}). Received: {len(names)} names")
        wire.check_weighting(weighting)
        wire.check_finite(layers, names)
        number = self.round + 1
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        mark = self._upload(layers, float(weighting), number, deadline)
        upload_mb = sum(a.nbytes for a in layers) / 1e6
        started = time.monotonic()
        logger.info("Round %d: uploaded %.1f MB; waiting for the aggregate (timeout %s)", number, upload_mb,
                    "none" if self.timeout is None else f"{self.timeout:.0f} s")
        aggregation_id = self._wait_for_aggregate(number, deadline, mark)
        wait_s = time.monotonic() - started
        if aggregation_id is None:
            return RoundResult(None, None, wait_s, upload_mb, self.round)
        archive = self.client.download_aggregate(aggregation_id, buffer=self._download_buffer)
        aggregate = self.check_aggregate(archive.layers, expected, names)
        self.round, self.last_aggregation_id = number, aggregation_id
        logger.info("Round %d done: aggregate %s after %.1f s", number, aggregation_id, wait_s)
        return RoundResult(aggregation_id, aggregate, wait_s, upload_mb, number)

    def _drain_stale(self) -> int:
        """Drop the unread aggregation id (an earlier round's); return the mark the round's aggregate must pass."""
        mark, stale = self.client.waiter.drain()
        if stale is not None:
            logger.info("Ignoring aggregate %s: it arrived before this leaf's upload", stale)
        return mark

    def _upload(self, layers: list[np.ndarray], weighting: float, number: int, deadline: float | None) -> int:
        """Upload once the run is in ``start``; a pause (even one that races the upload) is waited out.

        Returns the mark taken just before the upload (see :meth:`RoundWaiter.drain`).
        """
        conflicts = Backoff(*_CONFLICT_BACKOFF)
        while True:
            self._wait_for_start(number, deadline)
            mark = self._drain_stale()
            try:
                # run_round checked the weighting and every value already: the client does not check again
                self.client._upload_arrays(weighting, layers, finite_checked=True)
                return mark
            except RunBlockedError:
                continue  # the status changed between the check and the call
            except ApiError as exc:
                if exc.status_code != 409:
                    raise
                logger.info("Upload for round %d refused (%s); trying again once the run is started", number, exc)
                self._refresh_run_status()
                self._check_deadline(number, deadline, "the upload to be accepted")
                delay = conflicts.next()  # a 409 that persists while the run is 'start' must not spin
                time.sleep(delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic())))

    def _refresh_run_status(self) -> None:
        try:
            self.client.get_run_details()
        except BranchKeyError as exc:
            logger.warning("Could not re-read the run status: %s", exc)

    def _wait_for_start(self, number: int, deadline: float | None) -> None:
        """Return once the run is in ``start``; re-read it every few seconds, in case a notification was lost."""
        client = self.client

        def log(waited: float) -> None:
            logger.info("Run is %r: round %d waits for 'start' (waited %.0f s)", client.run_status, number, waited)

        periodic = [Every(self.log_every_s, log, first=0.0), Every(_REFRESH_S, lambda _: self._refresh_run_status())]
        if not client.waiter.wait_for_start(deadline, periodic, stopped=f"before round {number}"):
            raise self._timeout_error(number, "the run to start")

    def _wait_for_aggregate(self, number: int, deadline: float | None, mark: int) -> str | None:
        """The id of the first aggregate after the upload; None on timeout with ``on_timeout="continue"``."""
        client = self.client

        def log(waited: float) -> None:
            logger.info("Waiting for the aggregate of round %d for %.0f s (run %r)", number, waited, client.run_status)

        aggregation_id = client.waiter.wait_for_aggregate_after(mark, deadline, [Every(self.log_every_s, log)],
                                                                stopped=f"during round {number}")
        if aggregation_id is not None:
            return aggregation_id
        error = self._timeout_error(number, "the aggregate")
        if self.on_timeout == "raise":
            raise error
        logger.warning("%s Continuing with the local model (on_timeout='continue').", error)
        return None

    def _check_deadline(self, number: int, deadline: float | None, what: str) -> None:
        if deadline is not None and time.monotonic() >= deadline:
            raise self._timeout_error(number, what)

    def _timeout_error(self, number: int, what: str) -> AggregationTimeoutError:
        return AggregationTimeoutError(
            f"Round {number} of branch {self.client.branch_id}: still waiting for {what} after timeout={self.timeout} s. "
            "Raise timeout, or pass on_timeout='continue' to keep training locally."
        )

    # ------------------------------------------------------------ validation
    @staticmethod
    def check_aggregate(
        received: Sequence[np.ndarray], expected: Sequence[LayerSpec], names: Sequence[str] | None = None
    ) -> list[np.ndarray]:
        """Check every layer of an aggregate before any is used; return them cast to the expected dtypes."""
        if len(received) != len(expected):
            raise AggregateMismatchError(
                f"The aggregate has {len(received)} layers but the local model has {len(expected)}: "
                "every leaf of the branch must federate the same parameters."
            )
        checked = []
        for index, (array, spec) in enumerate(zip(received, expected)):
            name = names[index] if names is not None else wire.layer_key(index)
            if tuple(array.shape) != spec.shape:
                raise AggregateMismatchError(
                    f"{name}: the aggregate has shape {tuple(array.shape)}, the local model {spec.shape}.")
            if array.dtype.kind != spec.dtype.kind:
                raise AggregateMismatchError(
                    f"{name}: the aggregate has dtype {array.dtype}, the local model {spec.dtype}.")
            if not wire.all_finite(array):
                raise AggregateMismatchError(f"{name}: the aggregate holds NaN or infinity.")
            checked.append(array.astype(spec.dtype, copy=False))
        return checked

    # --------------------------------------------------------------- metrics
    def send_metrics(self, data: dict[str, Any] | str, mode: str = "train",
                     aggregation_id: str | None = None) -> bool:
        """Send metrics for ``aggregation_id`` (default: the last aggregate); False when refused or none yet."""
        if mode not in METRIC_MODES:
            raise ValueError(f"Expected mode in {METRIC_MODES}. Received: mode={mode!r}")
        aggregation_id = aggregation_id or self.last_aggregation_id
        if aggregation_id is None:
            logger.debug("No aggregate yet: metrics not sent")
            return False
        return self.client.send_performance_metrics(aggregation_id, data, mode)

    # -------------------------------------------------------- for callbacks
    def exchange(self, layers: Layers, weighting: Weighting, names: Sequence[str] | None = None, *,
                 snapshot_dir: Path | None = None) -> Outcome:
        """One :meth:`run_round` that never raises an ``Exception``: what happened comes back as an :class:`Outcome`.

        ``kind`` is ``"done"`` (the aggregate, saved to ``snapshot_dir`` when given), ``"timeout"`` (with
        ``on_timeout="continue"``), ``"stopped"`` (the run was stopped) or ``"error"``: a refusal naming
        ``layer_<i>`` comes back naming the local parameter too. ``layers`` and ``weighting`` may be functions,
        called inside, so that a failure to produce them is an outcome as well (a DDP rank 0 must reach its
        broadcast whatever happens).
        """
        return _exchange(self, layers, weighting, names, snapshot_dir)

    def record_round(self, number: int, aggregation_id: str | None = None) -> None:
        """Count ``number`` rounds as done, and ``aggregation_id`` (when given) as the latest aggregate.

        For rounds this object did not run itself: a DDP rank that received rank 0's outcome, or a fit that
        resumes at a later epoch.
        """
        self.round = int(number)
        if aggregation_id is not None:
            self.last_aggregation_id = aggregation_id

    def __repr__(self) -> str:
        return (f"Federation(leaf={self._credentials.name!r}, host={self.host!r}, round={self.round}, "
                f"timeout={self.timeout}, on_timeout={self.on_timeout!r})")


__all__ = ["Federation", "RoundResult", "RunStopped", "AggregateMismatchError", "ON_TIMEOUT"]
