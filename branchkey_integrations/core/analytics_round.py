"""One federated analytics round of a leaf: upload the payload, wait for that round's aggregate, read it.

:meth:`Federation.analytics_round <.federation.Federation.analytics_round>` runs it; this module owns the round
itself. It waits as a model's round waits, with the same machinery (:class:`~.watch.WaitWatch` over the
client's :class:`~.waiter.RoundWaiter`): a paused run is waited out, a stopped one raises
:class:`~.errors.RunStopped`, a server that is away is asked again until the deadline, progress goes to the
federation's listeners (``WaitProgress.kind`` is ``"federated_analytics"``) and to the log, the round view's
``analytics`` part is read every ``check_every_s`` as the safety net under the notifications, and
:meth:`Federation.interrupt` ends the wait at once. Analytics rounds are counted apart from a model's by the
platform (their own round index): the wait takes only the analytics aggregate of the round its upload went
into, so an analytics round may run beside a model's (another thread, or a training callback's hook) and
neither ever takes the other's aggregate.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Sequence

from .analytics_result import AnalyticsResult
from .backoff import Backoff
from .errors import AggregationTimeoutError, ApiError, BranchKeyError, RunBlockedError
from .progress import AGGREGATE, RUN_START, SERVER, ProgressListener, UploadReceipt
from .protocol import KIND_FEDERATED_ANALYTICS, START
from .waiter import Every
from .watch import RoundNotes, WaitWatch

if TYPE_CHECKING:
    from .client import Client

logger = logging.getLogger(__name__)

_REFRESH_S = 5.0  # how often a paused round re-reads the run status over REST, in case a notification was lost
_CONFLICT_BACKOFF = (0.1, 2.0, 2.0)  # initial, factor, maximum seconds between retries of an upload refused with 409


class AnalyticsRound:
    """One analytics round of ``client``'s leaf, numbered ``number`` (this leaf's analytics rounds, from 1).

    Args:
        client: the leaf's connected client.
        number: the round's number, for reports and logs.
        listeners: progress listeners, called as a model's round calls them.
        log_every_s, check_every_s: as :class:`~.leaf_options.LeafOptions`'.
    """

    def __init__(self, client: Client, number: int, listeners: Sequence[ProgressListener], *, log_every_s: float,
                 check_every_s: float) -> None:
        self.client = client
        self.number = number
        self.listeners = list(listeners)
        self.log_every_s = log_every_s
        self.check_every_s = check_every_s
        self.notes = RoundNotes()

    def run(self, entries: dict[str, Any], timeout: float | None) -> AnalyticsResult:
        """Upload ``entries`` (a payload's fields, bundles included), wait for the round's aggregate and read it.

        Raises:
            AggregationTimeoutError: no aggregate within ``timeout`` s (:class:`AnalyticsRoundMissedError`: a
                later analytics round completed without this one's aggregate arriving).
            RunStopped, RoundInterrupted: the run was stopped, or :meth:`Federation.interrupt` was called.
            RequestRejectedError: the platform refused the upload (the message names the field).
        """
        self.client.waiter.check_interrupt()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.client.retrying_until(deadline, on_away=self._watch(SERVER).on_away):
            receipt = self._upload(entries, deadline, timeout)
            logger.info("Analytics round %d: uploaded %d fields%s; waiting for the aggregate", self.number,
                        len(entries), "" if receipt.round is None else f" into run {receipt.run_number} analytics "
                        f"round {receipt.round_index}")
            watch = self._watch(AGGREGATE, receipt.round)
            try:
                aggregation_id = self.client.waiter.wait_for_analytics(
                    receipt.mark, deadline, watch.periodic(), stopped=f"during analytics round {self.number}",
                    target=receipt.round)
            finally:
                watch.report(final=True)
            if aggregation_id is None:
                raise self._timeout_error("the analytics aggregate", timeout)
            run_number, round_index = self.client.waiter.round_of(aggregation_id)
            known = self._contributors(aggregation_id, watch)
            result = self.client.download_analytics(
                aggregation_id, timeout=None if deadline is None else max(0.0, deadline - time.monotonic()),
                run_number=run_number, round_index=round_index, **known)
        logger.info("Analytics round %d done: aggregate %s", self.number, aggregation_id)
        return result

    # ----------------------------------------------------------------- steps
    def _watch(self, waiting_for: str, target: tuple[int, int] | None = None) -> WaitWatch:
        return WaitWatch(self.client, self.number, waiting_for, self.listeners, log_every_s=self.log_every_s,
                         check_every_s=self.check_every_s, target=target, notes=self.notes,
                         kind=KIND_FEDERATED_ANALYTICS)

    def _upload(self, entries: dict[str, Any], deadline: float | None, timeout: float | None) -> UploadReceipt:
        """Upload once the run is in ``start``; a pause (even one that races the upload) and a 409 are waited out."""
        conflicts = Backoff(*_CONFLICT_BACKOFF)
        while True:
            self._wait_for_start(deadline, timeout)
            try:
                return self.client.upload_fields(entries)
            except RunBlockedError:
                continue  # the status changed between the check and the call
            except ApiError as exc:
                if exc.status_code != 409:
                    raise
                logger.info("Analytics upload refused (%s); trying again once the run is started", exc)
                self._refresh_run_status()
                if deadline is not None and time.monotonic() >= deadline:
                    raise self._timeout_error("the upload to be accepted", timeout) from exc
                delay = conflicts.next()
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                self.client.waiter.sleep(delay if left is None else min(delay, left))

    def _wait_for_start(self, deadline: float | None, timeout: float | None) -> None:
        if self.client.run_status == START:
            self.client.waiter.check_interrupt()
            return
        watch = self._watch(RUN_START)
        periodic = [*watch.periodic(), Every(_REFRESH_S, lambda _: self._refresh_run_status(), on_refresh=True)]
        try:
            started = self.client.waiter.wait_for_start(deadline, periodic,
                                                        stopped=f"before analytics round {self.number}")
        finally:
            if watch.last is not None:
                watch.report(final=True)
        if not started:
            raise self._timeout_error("the run to start", timeout)

    def _refresh_run_status(self) -> None:
        try:
            self.client.get_run_details(once=True)
        except BranchKeyError as exc:
            logger.debug("Could not re-read the run status: %s", exc)

    def _contributors(self, aggregation_id: str, watch: WaitWatch) -> dict[str, Any]:
        """How many leaves (and which) the aggregate combines, when the platform says (its round view)."""
        view = watch.view
        if view is None or view.latest_aggregate is None or view.latest_aggregate.aggregation_id != aggregation_id:
            view = watch.read_view()
        latest = view.latest_aggregate if view is not None else None
        if latest is None or latest.aggregation_id != aggregation_id:
            return {}
        return {"contributors": latest.contributors, "contributor_names": latest.contributor_names}

    def _timeout_error(self, what: str, timeout: float | None) -> AggregationTimeoutError:
        return AggregationTimeoutError(
            f"Analytics round {self.number} of branch {self.client.branch_id}: still waiting for {what} after "
            f"timeout={timeout} s. Raise the timeout, or check the branch's leaves with the round view "
            "(every leaf of the branch must send the same fields).")


__all__ = ["AnalyticsRound"]
