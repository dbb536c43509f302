"""One federated round, framework-free: submit arrays, wait for the aggregate, check it.

The Lightning and Keras callbacks turn a model into a list of NumPy arrays and back; everything in between lives
here, once: run status (pause waits, stop ends training), draining stale notifications, the bounded wait with
progress reports, and the complete check of the aggregate before a single parameter may change. The waits are
the client's :class:`~.waiter.RoundWaiter`: they wake on the notification, not on a poll; what runs during a
wait (progress listeners, the REST safety net under the notifications) is :class:`~.watch.WaitWatch`.

Faults a round rides out: a leaf more than one round behind its branch (resumed from an older checkpoint)
loads the branch's latest aggregate instead of uploading into a round long closed (``RoundResult.caught_up``);
with ``on_timeout="continue"`` an unreachable platform (or a 5xx) skips the round, said once at WARNING, and
the next round tries again; :meth:`Federation.interrupt` (SIGTERM, Ctrl-C) ends a wait with :class:`RoundInterrupted`.

Why drain before uploading: the client keeps only the newest aggregation id (as the official client does). An
id that arrived before this leaf's upload belongs to an earlier round: it lacks this leaf's contribution.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import wire
from .backoff import Backoff
from .client import Client, DownloadBuffer
from .client_options import ClientOptions
from .leaf_options import ON_TIMEOUT, LeafOptions, option_property as _option
from .protocol import START
from .credentials import Credentials, CredentialsLike
from .errors import (AggregateMismatchError, AggregationTimeoutError, ApiError, BranchKeyError, RoundInterrupted,
                     RunBlockedError, RunStopped, ServerError, TransportError)
from .analytics_result import AnalyticsResult
from .analytics_round import AnalyticsRound
from .client_payloads import analytics_entries
from .outcome import Layers, Outcome, RoundResult, Weighting, check_layers, checked_model, exchange as _exchange
from .progress import (AGGREGATE, RUN_START, SERVER, AggregateRef, ProgressListener, WaitProgress,
                       rounds_after_catching_up, rounds_behind)
from .waiter import Every
from .watch import RoundNotes, WaitWatch
from .wire import LayerSpec

logger = logging.getLogger(__name__)

_REFRESH_S = 5.0  # how often a paused round re-reads the run status over REST, in case a notification was lost
_CONFLICT_BACKOFF = (0.1, 2.0, 2.0)  # initial, factor, maximum seconds between retries of an upload refused with 409


def _split(target: tuple[int, int] | None) -> tuple[int | None, int | None]:
    return (None, None) if target is None else target


class Federation:
    """A leaf's side of federated rounds, independent of any deep-learning framework.

    Args:
        credentials: :class:`Credentials`, a dict, a JSON file path, or None for ``BRANCHKEY_*``
            environment variables. Checked here; the platform is contacted only by :meth:`connect`.
        host, timeout, on_timeout, log_every_s, transport, connect_timeout, compression, quantize, client_options,
        check_every_s:
            the options of :class:`~.leaf_options.LeafOptions` (what each means, its default), checked here,
            once; all of them are ``options``. :meth:`from_options` takes a ``LeafOptions`` instead.
        on_progress: a progress listener (see :meth:`add_progress_listener`).

    Raises:
        CredentialsError: a credential field is missing or malformed.
        ValueError: another argument (``transport`` and ``client_options`` included) is out of range,
            or a client option is unknown.

    Example (skipped: it needs a running branchkey-local and credentials; tests/core runs it):
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
        host: str = LeafOptions.host,
        *,
        timeout: float | None = LeafOptions.timeout,
        on_timeout: str = LeafOptions.on_timeout,
        log_every_s: float = LeafOptions.log_every_s,
        transport: str = LeafOptions.transport,
        connect_timeout: float = LeafOptions.connect_timeout,
        client_options: dict[str, Any] | None = LeafOptions.client_options,
        on_progress: ProgressListener | None = None,
        check_every_s: float = LeafOptions.check_every_s,
        compression: str | None = LeafOptions.compression,
        quantize: str | None = LeafOptions.quantize,
    ) -> None:
        options = LeafOptions(host, timeout=timeout, on_timeout=on_timeout, log_every_s=log_every_s,
                              check_every_s=check_every_s, transport=transport, connect_timeout=connect_timeout,
                              compression=compression, quantize=quantize, client_options=client_options)
        self._start(Credentials.load(credentials), options, on_progress)

    @classmethod
    def from_options(cls, credentials: CredentialsLike | None, options: LeafOptions,
                     on_progress: ProgressListener | None = None) -> Federation:
        """A federation of ``options``, checked already (what the callbacks build theirs with)."""
        federation = cls.__new__(cls)
        federation._start(Credentials.load(credentials), options, on_progress)
        return federation

    def _start(self, credentials: Credentials, options: LeafOptions, on_progress: ProgressListener | None) -> None:
        self._credentials = credentials
        self.options = options
        if on_progress is not None and not callable(on_progress):
            raise ValueError(f"Expected on_progress to be a function of one WaitProgress. Received: {on_progress!r}")
        self._listeners: list[ProgressListener] = [on_progress] if on_progress is not None else []
        self._interrupted: str | None = None
        self.round = 0
        self.analytics_rounds = 0  # analytics rounds this leaf completed (counted apart from the model's)
        self.last_aggregation_id: str | None = None
        self.last_run_number: int | None = None  # run and round of last_aggregation_id, when the platform said
        self.last_round_index: int | None = None
        self._client: Client | None = None
        self._download_buffer = DownloadBuffer()  # reused round after round: see DownloadBuffer
        self._encoding_state: dict[str, Any] = {}  # error feedback loaded before connect()

    (host, timeout, on_timeout, log_every_s, check_every_s, transport, connect_timeout, compression, quantize,
     client_options) = (_option(name) for name in ("host", "timeout", "on_timeout", "log_every_s", "check_every_s",
                                                   "transport", "connect_timeout", "compression", "quantize",
                                                   "client_options"))

    # ------------------------------------------------------------ connection
    def connect(self, client_factory: Callable[[Credentials, ClientOptions], Client] = Client.from_options) -> Client:
        """Create the client (once, of ``options.client``) and wait for its notification channel; return it.

        :meth:`interrupt` ends the wait for the channel at once (the next round then raises).
        """
        if self._client is None:
            client = client_factory(self._credentials, self.options.client)
            self._client = client
            client.encoding.load_state_dict(self._encoding_state)
            if self._interrupted is not None:
                client.waiter.interrupt(self._interrupted)
            channel = client.notifications
            try:  # the channel's connect listener wakes this wait, as does an interrupt
                opened = channel is None or client.waiter.wait_until(
                    channel.connected.is_set, time.monotonic() + self.connect_timeout)
            except RoundInterrupted:
                return client
            if not opened:
                logger.warning("The %s notification channel is not open after %.0f s; an aggregate published "
                               "before it opens can be missed.", client.transport, self.connect_timeout)
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
            self._encoding_state = self._client.encoding.state_dict()  # the error-feedback residual outlives it
            self._client.close()
            self._client = None

    # ------------------------------------------------------- progress, interrupt
    def add_progress_listener(self, listener: ProgressListener) -> None:
        """Call ``listener(progress)`` with a :class:`WaitProgress` while a round waits.

        On the thread that runs the round: at the start of each wait, when its progress changes, at least
        every ``log_every_s`` s, and once more when the wait ends (``progress.final``). An exception from a
        listener is logged and ignored.
        """
        if not callable(listener):
            raise ValueError(f"Expected a function of one WaitProgress. Received: {listener!r}")
        self._listeners.append(listener)

    def remove_progress_listener(self, listener: ProgressListener) -> None:
        """Stop calling ``listener`` (no error when it was not added)."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def interrupt(self, reason: str = "interrupted") -> None:
        """End the current wait at once (and every later one, until :meth:`clear_interrupt`).

        The round then raises :class:`RoundInterrupted` (:meth:`exchange`: an outcome ``"stopped"``). Safe to
        call from a signal handler in the main thread and from any other thread. An upload in flight
        completes (and counts) or never reached the server: it is never half-counted.
        """
        self._interrupted = reason
        if self._client is not None:
            self._client.waiter.interrupt(reason)

    def clear_interrupt(self) -> None:
        """Let rounds run again after :meth:`interrupt`."""
        self._interrupted = None
        if self._client is not None:
            self._client.waiter.clear_interrupt()

    @property
    def interrupted(self) -> str | None:
        """The reason given to :meth:`interrupt`, or None."""
        return self._interrupted

    def __getstate__(self) -> dict[str, Any]:
        # a client holds sockets and threads: never pickle it (DDP spawn, checkpoints), nor the buffer
        return {**self.__dict__, "_client": None, "_download_buffer": DownloadBuffer()}

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """``round`` and ``last_aggregation_id``; with the run and round of that aggregate when the platform said."""
        state: dict[str, Any] = {"round": self.round, "last_aggregation_id": self.last_aggregation_id}
        if self.last_run_number is not None and self.last_round_index is not None:
            state.update(last_run_number=self.last_run_number, last_round_index=self.last_round_index)
        return {**state, **(self._client.encoding.state_dict() if self._client is not None else self._encoding_state)}

    @property
    def last_aggregate(self) -> AggregateRef | None:
        """The last aggregate this leaf loaded, with its run and round when the platform said; None before one."""
        if self.last_aggregation_id is None:
            return None
        return AggregateRef(self.last_aggregation_id, self.last_run_number, self.last_round_index)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round = int(state.get("round", 0))
        self.last_aggregation_id = state.get("last_aggregation_id")
        self.last_run_number = state.get("last_run_number")
        self.last_round_index = state.get("last_round_index")
        self._encoding_state = {key: state[key] for key in ("error_feedback",) if key in state}
        if self._client is not None:
            self._client.encoding.load_state_dict(self._encoding_state)

    # ----------------------------------------------------------------- round
    def run_round(
        self,
        layers: Sequence[np.ndarray],
        weighting: float,
        expected: Sequence[LayerSpec] | None = None,
        names: Sequence[str] | None = None,
        controls: Sequence[np.ndarray] = (),
    ) -> RoundResult:
        """Upload ``layers`` (and SCAFFOLD's ``controls``), wait for the round's aggregate, check it.

        ``expected`` defaults to the specs of ``layers``; ``names`` (the parameters' real names)
        make error messages useful. A leaf more than one round behind its branch loads the branch's
        latest aggregate instead of uploading (``caught_up``). Raises :class:`RunStopped` when the run is
        stopped, :class:`RoundInterrupted` after :meth:`interrupt`, :class:`AggregateMismatchError` when
        the aggregate does not fit, and :class:`AggregationTimeoutError` on timeout with
        ``on_timeout="raise"`` (with ``"continue"``, a timeout, an unreachable platform or a 5xx end the
        round without an aggregate: ``skipped``).
        """
        layers = [np.asarray(a) for a in layers]
        expected = list(expected) if expected is not None else [LayerSpec.of(a) for a in layers]
        if names is not None and len(names) != len(layers):
            raise ValueError(f"Expected one name per layer ({len(layers)}). Received: {len(names)} names")
        wire.check_weighting(weighting)
        wire.check_finite(layers, names)
        number = self.round + 1
        self._check_interrupt()
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        upload_mb = sum(a.nbytes for a in layers) / 1e6
        notes = RoundNotes()
        started = time.monotonic()
        target: tuple[int, int] | None = None
        try:  # a call that finds the server away (a restart) is tried again until the round's deadline
            with self.client.retrying_until(deadline, on_away=self._watch(number, SERVER, notes).on_away):
                mark, target, behind = self._upload(layers, float(weighting), number, deadline, notes, controls)
                if behind is not None:
                    return self._catch_up(number, behind, expected, names, deadline)
                started = time.monotonic()
                logger.info("Round %d: uploaded %.1f MB%s; waiting for the aggregate (timeout %s)", number,
                            upload_mb, "" if target is None else f" into round {target[1] + 1} of run {target[0]}",
                            "none" if self.timeout is None else f"{self.timeout:.0f} s")
                aggregation_id = self._wait_for_aggregate(number, deadline, mark, target, notes)
                wait_s = time.monotonic() - started
                if aggregation_id is None:
                    return RoundResult(None, None, wait_s, upload_mb, self.round, *_split(target), skipped="timeout")
                archive = self._download(aggregation_id, expected, deadline)
        except (TransportError, ServerError) as exc:
            if self.on_timeout != "continue":
                raise
            logger.warning("Round %d skipped: %s. Training goes on with the local model; the next round tries "
                           "again (on_timeout='continue').", number, exc)
            return RoundResult(None, None, time.monotonic() - started, upload_mb, self.round, *_split(target),
                               skipped="unreachable")
        aggregate, server_controls = self._checked(archive, expected, names)
        run_number, round_index = self.client.waiter.round_of(aggregation_id)
        self._record(number, AggregateRef(aggregation_id, run_number, round_index))
        logger.info("Round %d done: aggregate %s after %.1f s", number, aggregation_id, wait_s)
        return RoundResult(aggregation_id, aggregate, wait_s, upload_mb, number, run_number, round_index,
                           controls=server_controls)

    def _checked(self, archive: wire.Archive, expected: Sequence[LayerSpec], names: Sequence[str] | None
                 ) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """An aggregate's layers (never another payload kind's: :func:`checked_model`) and (SCAFFOLD) controls,
        each checked against ``expected``."""
        controls = check_layers(archive.controls, expected, names) if archive.controls else None
        return checked_model(archive, expected, names), controls

    def _download(self, aggregation_id: str, expected: Sequence[LayerSpec], deadline: float | None) -> wire.Archive:
        """The aggregate, limited to a multiple of the local model's size and to the round's deadline."""
        return self.client.download_aggregate(
            aggregation_id, buffer=self._download_buffer,
            expected_bytes=sum(math.prod(spec.shape) * spec.dtype.itemsize for spec in expected),
            timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))

    def _record(self, number: int, aggregate: AggregateRef) -> None:
        self.round, self.last_aggregation_id = number, aggregate.aggregation_id
        self.last_run_number, self.last_round_index = aggregate.run_number, aggregate.round_index

    def _check_interrupt(self) -> None:
        if self._client is not None:
            self._client.waiter.check_interrupt()
        elif self._interrupted is not None:
            raise RoundInterrupted(f"The round was interrupted: {self._interrupted}")

    # ------------------------------------------------------------- catching up
    def _catch_up(self, number: int, latest: AggregateRef, expected: Sequence[LayerSpec],
                  names: Sequence[str] | None, deadline: float | None) -> RoundResult:
        """Load the branch's latest aggregate instead of uploading (the leaf is more than a round behind)."""
        archive = self._download(latest.aggregation_id, expected, deadline)
        aggregate, controls = self._checked(archive, expected, names)
        number = rounds_after_catching_up(self.round, self.last_aggregate, latest)  # numbered as the branch's other leaves number it
        self._record(number, latest)
        logger.info("Round %d: caught up with aggregate %s", number, latest.aggregation_id)
        return RoundResult(latest.aggregation_id, aggregate, 0.0, 0.0, number, latest.run_number, latest.round_index,
                           caught_up=True, controls=controls)

    def _behind(self, number: int, notes: RoundNotes) -> AggregateRef | None:
        """The branch's latest aggregate when this leaf is more than one round behind it (said at WARNING)."""
        try:
            view = self.client.get_round()
        except BranchKeyError as exc:
            logger.debug("Round %d: round view unreadable before the upload: %s", number, exc)
            return None
        behind = 0 if view is None else rounds_behind(view, self.last_aggregate, self.round)
        if view is None or behind < 2:
            return None
        latest = view.latest_aggregate
        assert latest is not None
        logger.warning(
            "Round %d: leaf %s is %d rounds behind branch %s (its last aggregate %s is of run %s round index %s; "
            "the branch's latest, %s, of run %s round index %s): was it resumed from an older checkpoint? Loading the "
            "branch's latest aggregate instead of uploading into a round that closed long ago.",
            number, self.credentials.name, behind, self.client.branch_id,
            self.last_aggregation_id, self.last_run_number, self.last_round_index, latest.aggregation_id,
            latest.run_number, latest.round_index)
        return latest

    # ----------------------------------------------------------------- upload
    def _drain_stale(self) -> int:
        """Drop the unread aggregation id (an earlier round's); return the mark the round's aggregate must pass."""
        mark, stale = self.client.waiter.drain()
        if stale is not None:
            logger.info("Ignoring aggregate %s: it arrived before this leaf's upload", stale)
        return mark

    def _upload(self, layers: list[np.ndarray], weighting: float, number: int, deadline: float | None, notes: RoundNotes,
                controls: Sequence[np.ndarray] = ()) -> tuple[int, tuple[int, int] | None, AggregateRef | None]:
        """Upload once the run is in ``start``; a pause (even one that races the upload) is waited out.

        Returns the mark taken just before the upload (see :meth:`RoundWaiter.drain`) and the
        ``(run_number, round_index)`` the upload went into (when the platform said); or, without an upload,
        the branch's latest aggregate when this leaf is more than one round behind.
        """
        conflicts = Backoff(*_CONFLICT_BACKOFF)
        while True:
            self._wait_for_start(number, deadline, notes)
            behind = self._behind(number, notes)
            if behind is not None:
                return 0, None, behind
            mark = self._drain_stale()
            try:
                # run_round checked every value already: the client does not check them again
                receipt = self.client.upload_arrays(weighting, layers, values_checked=True, controls=controls)
                return mark, receipt.round, None  # where the platform said the upload went
            except RunBlockedError:
                continue  # the status changed between the check and the call
            except ApiError as exc:
                if exc.status_code != 409:
                    raise
                logger.info("Upload for round %d refused (%s); trying again once the run is started", number, exc)
                self._refresh_run_status(notes)
                self._check_deadline(number, deadline, "the upload to be accepted")
                delay = conflicts.next()  # a 409 that persists while the run is 'start' must not spin
                self.client.waiter.sleep(delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic())))

    def _refresh_run_status(self, notes: RoundNotes) -> None:
        try:
            self.client.get_run_details(once=True)  # re-read every few seconds: a retry would only delay an interrupt
        except BranchKeyError as exc:
            if notes.unreachable:
                logger.debug("Could not re-read the run status: %s", exc)
            else:
                notes.unreachable = True
                logger.warning("Could not re-read the run status: %s", exc)

    # ------------------------------------------------------------------ waits
    def _watch(self, number: int, waiting_for: str, notes: RoundNotes,
               target: tuple[int, int] | None = None) -> WaitWatch:
        return WaitWatch(self.client, number, waiting_for, self._listeners, log_every_s=self.log_every_s,
                         check_every_s=self.check_every_s, target=target, notes=notes)

    def _wait_for_start(self, number: int, deadline: float | None, notes: RoundNotes) -> None:
        """Return once the run is in ``start``; re-read it every few seconds, in case a notification was lost."""
        client = self.client
        if client.run_status == START:
            client.waiter.check_interrupt()
            return
        watch = self._watch(number, RUN_START, notes)
        periodic = [*watch.periodic(), Every(_REFRESH_S, lambda _: self._refresh_run_status(notes), on_refresh=True)]
        try:
            started = client.waiter.wait_for_start(deadline, periodic, stopped=f"before round {number}")
        finally:
            if watch.last is not None:
                watch.report(final=True)
        if not started:
            raise self._timeout_error(number, "the run to start")

    def _wait_for_aggregate(self, number: int, deadline: float | None, mark: int, target: tuple[int, int] | None,
                            notes: RoundNotes) -> str | None:
        """The id of this round's aggregate; None on timeout with ``on_timeout="continue"``."""
        watch = self._watch(number, AGGREGATE, notes, target)
        try:
            aggregation_id = self.client.waiter.wait_for_aggregate_after(
                mark, deadline, watch.periodic(), stopped=f"during round {number}", target=target)
        finally:
            watch.report(final=True)
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

    check_aggregate = staticmethod(check_layers)  # every layer of an aggregate checked before any is used

    # ------------------------------------------------------------- analytics
    def analytics_round(self, columns: Mapping[str, Any] | None = None, fields: Mapping[str, Any] | None = None, *,
                        nan_policy: str = "omit", timeout: float | None = None) -> AnalyticsResult:
        """One federated analytics round: raw ``columns`` reduced here to their bundles (``save_analytics``' rules;
        raw values never leave) and ``fields`` as given (``save_fields``'), sent as one upload; then the wait for
        that analytics round's aggregate, visible and interruptible as a model's round (progress listeners,
        :meth:`interrupt`), and its :class:`AnalyticsResult`. Usable between model rounds, from a training
        callback's hook, or from a thread beside them. ``timeout``: seconds (None: the federation's ``timeout``).
        Raises what :meth:`~.analytics_round.AnalyticsRound.run` raises (a timeout always raises), and
        :class:`AnalyticsError` for a column or field that cannot be sent, before anything is sent."""
        entries = analytics_entries(columns, fields, nan_policy)
        number = self.analytics_rounds + 1
        analytics_round = AnalyticsRound(self.client, number, self._listeners, log_every_s=self.log_every_s,
                                         check_every_s=self.check_every_s)
        result = analytics_round.run(entries, self.timeout if timeout is None else timeout)
        self.analytics_rounds = number
        return result

    # --------------------------------------------------------------- metrics
    def send_metrics(self, data: dict[str, Any] | str, mode: str = "train",
                     aggregation_id: str | None = None) -> bool:
        """Send metrics for ``aggregation_id`` (default: the last aggregate); False when refused or none yet.
        ``mode`` is checked by :meth:`Client.send_performance_metrics`, the one check of it."""
        aggregation_id = aggregation_id or self.last_aggregation_id
        if aggregation_id is None:
            logger.debug("No aggregate yet: metrics not sent")
            return False
        return self.client.send_performance_metrics(aggregation_id, data, mode)

    # -------------------------------------------------------- for callbacks
    def exchange(self, layers: Layers, weighting: Weighting, names: Sequence[str] | None = None, *,
                 snapshot_dir: Path | None = None, controls: Layers = ()) -> Outcome:
        """One :meth:`run_round` that never raises an ``Exception``: what happened comes back as an :class:`Outcome`.

        ``kind`` is ``"done"`` (the aggregate, saved to ``snapshot_dir`` when given), ``"timeout"`` (with
        ``on_timeout="continue"``), ``"stopped"`` (the run was stopped) or ``"error"``: a refusal naming
        ``layer_<i>`` comes back naming the local parameter too. ``layers`` and ``weighting`` may be functions,
        called inside, so that a failure to produce them is an outcome as well (a DDP rank 0 must reach its
        broadcast whatever happens).
        """
        return _exchange(self.run_round, layers, weighting, names, snapshot_dir, controls)  # controls: SCAFFOLD's

    def record_round(self, number: int, aggregation_id: str | None = None, run_number: int | None = None,
                     round_index: int | None = None) -> None:
        """Count ``number`` rounds as done, and ``aggregation_id`` (when given, of that run and round) as the
        latest aggregate.

        For rounds this object did not run itself: a DDP rank that received rank 0's outcome, or a fit that
        resumes at a later epoch.
        """
        self.round = int(number)
        if aggregation_id is not None:
            self._record(self.round, AggregateRef(aggregation_id, run_number, round_index))

    def __repr__(self) -> str:
        return (f"Federation(leaf={self._credentials.name!r}, host={self.host!r}, round={self.round}, "
                f"timeout={self.timeout}, on_timeout={self.on_timeout!r})")


__all__ = ["Federation", "RoundResult", "RunStopped", "RoundInterrupted", "AggregateMismatchError", "ON_TIMEOUT",
           "WaitProgress", "ProgressListener"]
