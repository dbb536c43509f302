"""One wait of a round, watched: progress reports to listeners and the REST safety net under the notifications.

:class:`WaitWatch` owns what happens while :class:`~.federation.Federation` waits (for the run to start, or
for the aggregate): it builds the :class:`~.progress.WaitProgress` reports and hands them to the progress
listeners (at the start of the wait, when the progress changes, at least every ``log_every_s``, and once
at the end), logs them at INFO, and reads the branch's round view (``GET`` :data:`~.protocol.ROUND_PATH`)
every ``check_every_s`` and right after the notification channel reconnects. When that view shows that
the round this leaf uploaded into has been aggregated, the aggregate is handed to the client's
:class:`~.waiter.RoundWaiter` as if its notification had come: a missed notification costs seconds, not
the timeout. A refused upload in the open round is said once at WARNING, naming the leaf and the reason.
While a call of the round finds the server away and is tried again (:meth:`Client.retrying_until`), a
watch of ``"server"`` (:meth:`WaitWatch.on_away`) says so: at WARNING and to the listeners at once, then
every ``log_every_s``, and once more when the server answers again.

A watch of an analytics round (``kind="federated_analytics"``) reads the round view's ``analytics`` part
instead, and hands a missed analytics aggregate over as one, so each kind of round sees only its own.

The watch never raises for a platform that cannot be reached or lacks the round endpoint: the wait goes
on, on notifications alone, and the first failure of a round is said once at WARNING.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Protocol, Sequence

from .errors import BranchKeyError
from .progress import AGGREGATE, ProgressListener, RefusedUpload, RoundView, WaitProgress, unblock_hint
from .protocol import KIND_FEDERATED_ANALYTICS, KIND_FEDERATED_LEARNING
from .waiter import Every, RoundWaiter

if TYPE_CHECKING:
    from .http import Away

logger = logging.getLogger(__name__)


class RoundSource(Protocol):
    """What a watch reads of the leaf's client (:class:`~.client.Client` is one): its round view, its waiter,
    and the run it knows of. A structural type, so that this module, which the client uses, needs nothing of it."""

    @property
    def branch_id(self) -> str: ...

    @property
    def run_number(self) -> int | None: ...

    @property
    def run_status(self) -> str | None: ...

    @property
    def waiter(self) -> RoundWaiter: ...

    def get_round(self, *, brief: bool = False) -> RoundView | None: ...


def hand_over_latest(client: RoundSource, view: RoundView | None, target: tuple[int, int],
                     kind: str = KIND_FEDERATED_LEARNING) -> str | None:
    """Give the waiter the branch's latest aggregate (of ``kind``: ``view`` is that kind's) when it closes
    ``target`` (run, round index) or a later round, and it was not received yet; return its id then, else None."""
    latest = view.latest_aggregate if view is not None else None
    if latest is None or latest.run_number is None or latest.round_index is None:
        return None
    if (latest.run_number, latest.round_index) < target:
        return None
    if client.waiter.add_aggregation(latest.aggregation_id, latest.run_number, latest.round_index, kind=kind):
        return latest.aggregation_id
    return None


def find_missed_aggregate(client: RoundSource, target: tuple[int, int], kind: str = KIND_FEDERATED_LEARNING) -> None:
    """Ask the platform for the aggregate of ``target`` (see :func:`hand_over_latest`), of a model's round or
    (``kind``) an analytics round's; errors are only logged."""
    try:
        view = client.get_round(brief=True)  # the latest aggregate is all it needs: no leaf names
    except BranchKeyError as exc:
        logger.debug("Round view unreadable: %s", exc)
        return
    if view is not None and kind == KIND_FEDERATED_ANALYTICS:
        view = view.analytics
    if hand_over_latest(client, view, target, kind) is not None:
        logger.info("Aggregate of run %d round index %d found by asking the server (its notification did not arrive)",
                    *target)


class RoundNotes:
    """What a round has already said once (refusals warned about, an unreachable platform), across its waits."""

    def __init__(self) -> None:
        self.refusals: set[RefusedUpload] = set()
        self.unreachable = False


class WaitWatch:
    """The periodic actions of one wait; pass :meth:`periodic` to a :class:`~.waiter.RoundWaiter` wait.

    Args:
        client: the leaf's client (its waiter, its round view).
        number: the leaf's round number (for reports and logs).
        waiting_for: ``"run start"`` or ``"aggregate"``.
        listeners: called with each :class:`WaitProgress`; an exception from one is logged and ignored.
        log_every_s: a report at least this often.
        check_every_s: how often the round view is read (and at once after a reconnect).
        target: ``(run_number, round_index)`` the upload went into, when the platform said.
        notes: the round's :class:`RoundNotes`, shared by its waits.
        kind: the round's payload kind; an analytics round's watch reads the round view's ``analytics`` part.
    """

    def __init__(self, client: RoundSource, number: int, waiting_for: str, listeners: Sequence[ProgressListener], *,
                 log_every_s: float, check_every_s: float, target: tuple[int, int] | None = None,
                 notes: RoundNotes | None = None, kind: str = KIND_FEDERATED_LEARNING) -> None:
        self.client = client
        self.number = number
        self.waiting_for = waiting_for
        self.listeners = list(listeners)
        self.log_every_s = log_every_s
        self.check_every_s = check_every_s
        self.target = target
        self.notes = notes or RoundNotes()
        self.kind = kind
        self.view: RoundView | None = None
        self.last: WaitProgress | None = None
        self.since = time.monotonic()
        self.away: Away | None = None
        self._reported = self.since

    # ------------------------------------------------------------- the wait
    def periodic(self) -> list[Every]:
        """The report (first at once) and the round-view check (first at once, again after a reconnect)."""
        return [Every(self.check_every_s, self.check, first=0.0, on_refresh=True),
                Every(self.log_every_s, self._report_periodically, first=0.0)]

    def _report_periodically(self, waited: float) -> None:
        self.report()

    def check(self, waited: float = 0.0) -> None:
        """Read the round view; hand a missed aggregate to the waiter; report what changed."""
        view = self.read_view()
        if view is None:
            return
        self.view = view
        for refusal in view.refused:
            if refusal not in self.notes.refusals:
                self.notes.refusals.add(refusal)
                logger.warning("Round %d of branch %s cannot complete as it is: the server refused the upload of "
                               "leaf %s: %s; %s", self.number, self.client.branch_id, refusal.leaf, refusal.reason,
                               unblock_hint((refusal.leaf,)))
        if self.waiting_for == AGGREGATE and self.target is not None:
            found = hand_over_latest(self.client, view, self.target, self.kind)
            if found is not None:
                logger.info("Round %d: aggregate %s found by asking the server (its notification did not arrive)",
                            self.number, found)
        if self.last is not None and not self.progress().same_progress(self.last):
            self.report()

    def read_view(self) -> RoundView | None:
        """The round view (of this watch's kind), or None (no such endpoint, none for analytics, or unreachable:
        said once per round, at WARNING)."""
        try:
            view = self.client.get_round()
            return view.analytics if view is not None and self.kind == KIND_FEDERATED_ANALYTICS else view
        except BranchKeyError as exc:
            if not self.notes.unreachable:
                self.notes.unreachable = True
                logger.warning("Round %d: could not read the round's progress from the server (%s); waiting on "
                               "notifications and trying again every %.0f s", self.number, exc, self.check_every_s)
            else:
                logger.debug("Round %d: round progress still unreadable: %s", self.number, exc)
            return None

    def on_away(self, away: Away) -> None:
        """:meth:`Client.retrying_until`'s listener: report a call that waits for the server (at once, at
        WARNING; then every ``log_every_s``) and, once it got through, the end of that wait."""
        if away.back:
            if self.away is not None:
                self.away = away
                self.report(final=True)
            self.away = None
            return
        first, self.away = self.away is None, away
        if first or time.monotonic() - self._reported >= self.log_every_s:
            self.report(level=logging.WARNING if first else logging.INFO)

    # ------------------------------------------------------------- reports
    def progress(self, final: bool = False) -> WaitProgress:
        """The wait as it stands."""
        away = self.away
        if away is not None:
            return WaitProgress(round=self.number, waiting_for=self.waiting_for, waited_s=away.waited_s,
                                run_number=self.client.run_number, run_status=self.client.run_status, final=final,
                                unreachable="" if away.back else f"{away.call}: {away.reason}",
                                retry_left_s=away.left_s, kind=self.kind)
        view, target = self.view, self.target
        run_number = target[0] if target is not None else (view.run_number if view is not None else
                                                           self.client.run_number)
        round_index = target[1] if target is not None else (view.round_index if view is not None else None)
        same_round = view is not None and (target is None or (view.run_number, view.round_index) == target)
        return WaitProgress(
            round=self.number, waiting_for=self.waiting_for, waited_s=time.monotonic() - self.since,
            run_number=run_number, round_index=round_index,
            uploaded=view.uploaded if same_round and view is not None else (),
            missing=view.missing if same_round and view is not None else (),
            required=view.required if view is not None else None,
            refused=view.refused if view is not None else (),
            run_status=self.client.run_status, known=same_round, final=final, kind=self.kind,
        )

    def report(self, final: bool = False, level: int = logging.INFO) -> WaitProgress:
        """Log the progress (at ``level``; DEBUG when final) and hand it to every listener."""
        progress = self.progress(final)
        self.last, self._reported = progress, time.monotonic()
        logger.log(logging.DEBUG if final else level, "%s", progress.message)
        for listener in self.listeners:
            try:
                listener(progress)
            except Exception:  # noqa: BLE001 - a listener's bug must not end the round
                logger.exception("A progress listener failed on round %d", self.number)
        return progress


__all__ = ["RoundSource", "RoundNotes", "WaitWatch", "hand_over_latest", "find_missed_aggregate"]
