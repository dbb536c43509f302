"""What a waiting leaf knows about its round, as values: the server's view and the progress of a wait.

This module owns read-only values about rounds, and nothing that talks to the platform:

- :class:`RoundView`: one answer of ``GET`` :data:`~.protocol.ROUND_PATH` (branchkey-local): the branch's
  run, its open round (who has uploaded, who is missing, whose upload was refused and why) and its latest
  aggregate. :func:`parse_round_view` checks the answer; a malformed one is a :class:`ProtocolError`.
- :class:`WaitProgress`: what :class:`~.federation.Federation` hands to its progress listeners while a round
  waits (at the start of a wait, whenever the progress changes, and at least every ``log_every_s``). The
  Lightning and Keras callbacks print it in the framework's own output; :attr:`WaitProgress.message` is
  the one line they show.
- :class:`AggregateRef` and :class:`UploadReceipt`: an aggregate, or an upload (what
  :meth:`~.client.Client.upload_arrays` returns), and the run and round it belongs to; with
  :func:`rounds_behind` and :func:`rounds_after_catching_up`, the arithmetic of a leaf behind its branch.

Why values: a listener runs on the training thread between two waits, and may keep or print what it was
given; nothing in it changes behind its back.

Example:
    >>> progress = WaitProgress(round=3, waiting_for="aggregate", waited_s=12.4, run_number=1, round_index=2,
    ...                         uploaded=("leaf_1",), missing=("leaf_2",), required=2, known=True)
    >>> progress.message
    'Round 3 of run 1: waiting for the aggregate for 12 s; 1 of 2 uploads; missing: leaf_2'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .errors import ProtocolError
from .protocol import KIND_FEDERATED_ANALYTICS, KIND_FEDERATED_LEARNING, is_file_id

#: what a wait waits for: the run to start, the round's aggregate, or the server to answer again (a restart)
RUN_START, AGGREGATE, SERVER = "run start", "aggregate", "server"
WAITING_FOR = (RUN_START, AGGREGATE, SERVER)


@dataclass(frozen=True)
class RefusedUpload:
    """An upload the server refused in the open round: which leaf (by name), why, and when (ISO 8601 UTC)."""

    leaf: str
    reason: str
    at: str | None = None


@dataclass(frozen=True)
class AggregateRef:
    """An aggregate and the round it closed: ``run_number`` and ``round_index`` (from 0 within the run).

    Either number is None when the platform did not say (the hosted platform's notifications); so is
    ``contributors``, how many leaves' uploads it combines (``contributor_names``: theirs, when said).
    """

    aggregation_id: str
    run_number: int | None = None
    round_index: int | None = None
    contributors: int | None = None
    contributor_names: tuple[str, ...] = ()

    @property
    def tagged(self) -> bool:
        """Whether the platform named the round this aggregate closes."""
        return self.run_number is not None and self.round_index is not None


@dataclass(frozen=True)
class RoundView:
    """The branch as ``GET /api/v1/round/{branch_id}`` shows it to one of its leaves.

    Attributes:
        run_status, run_number: the branch's run.
        round_index: the open round (from 0 within the run), or None while none is open (run stopped).
        uploaded, missing: names of the leaves whose upload counts in the open round, and of those without one.
        required: how many uploads complete the round.
        refused: uploads refused in the open round (the latest per leaf).
        opened_at, deadline_at: ISO 8601 UTC, or None.
        latest_aggregate: the branch's latest aggregate, or None before the first.
        analytics: the branch's analytics rounds, seen the same way (their own round index, from 0 within the
            run; ``round_index`` None while none is open), or None where the platform has none.
    """

    run_status: str
    run_number: int
    round_index: int | None
    uploaded: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    required: int | None = None
    refused: tuple[RefusedUpload, ...] = ()
    opened_at: str | None = None
    deadline_at: str | None = None
    latest_aggregate: AggregateRef | None = None
    analytics: RoundView | None = None


def _int_or_none(data: dict[str, Any], name: str, context: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolError(f"{context}: {name}={value!r}; expected an integer >= 0 or null.")
    return value


def _names(data: dict[str, Any], name: str, context: str) -> tuple[str, ...]:
    value = data.get(name) or []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ProtocolError(f"{context}: {name}={value!r}; expected a list of leaf names.")
    return tuple(value)


def parse_round_view(data: dict[str, Any], context: str = "round progress") -> RoundView:
    """Check the ``data`` of a ROUND_PATH answer and return it as a :class:`RoundView`."""
    run_status, run_number = data.get("run_status"), _int_or_none(data, "run_number", context)
    if not isinstance(run_status, str) or run_number is None:
        raise ProtocolError(f"{context}: expected run_status and run_number in {sorted(data)}.")
    refused = []
    for item in data.get("refused") or []:
        if not isinstance(item, dict) or not isinstance(item.get("leaf"), str):
            raise ProtocolError(f"{context}: a refused upload without a leaf name: {item!r}")
        refused.append(RefusedUpload(item["leaf"], str(item.get("reason", "")), item.get("at")))
    latest = data.get("latest_aggregate")
    ref = None
    if latest is not None:
        if not isinstance(latest, dict) or not is_file_id(latest.get("aggregation_id")):
            raise ProtocolError(f"{context}: latest_aggregate={str(latest)[:200]}; expected an object with an "
                                "aggregation_id that is a plain token (a file id).")
        contributors = latest.get("contributors")
        listed = isinstance(contributors, list)  # the leaves' names, or how many they are
        names = _names(latest, "contributors", context) if listed else ()
        ref = AggregateRef(latest["aggregation_id"], _int_or_none(latest, "run_number", context),
                           _int_or_none(latest, "round_index", context),
                           len(names) if listed else _int_or_none(latest, "contributors", context), names)
    analytics = data.get("analytics")
    if analytics is not None and not isinstance(analytics, dict):
        raise ProtocolError(f"{context}: analytics={str(analytics)[:200]}; expected an object or null.")
    return RoundView(run_status, run_number, _int_or_none(data, "round_index", context),
                     _names(data, "uploaded", context), _names(data, "missing", context),
                     _int_or_none(data, "required", context), tuple(refused), data.get("opened_at"),
                     data.get("deadline_at"), ref, None if analytics is None else parse_round_view(
                         {"run_status": run_status, "run_number": run_number, **analytics, "analytics": None},
                         f"{context} (analytics)"))


@dataclass(frozen=True)
class UploadReceipt:
    """What one upload was: the platform's ``file_id``, the run and round it went into (None when the
    platform did not say: the hosted platform), its ``size`` in bytes, and ``mark``, the count of aggregation
    ids of its ``kind`` this client had received just before it (its round's aggregate comes after: see
    :meth:`~.waiter.RoundWaiter.drain`), and its payload ``kind`` (a model's round and an analytics round are
    counted apart).

    Example:
        >>> receipt = UploadReceipt("f00d", 1, 4, 1024)
        >>> receipt.round
        (1, 4)
    """

    file_id: str
    run_number: int | None
    round_index: int | None
    size: int
    mark: int = 0
    kind: str = KIND_FEDERATED_LEARNING

    @property
    def round(self) -> tuple[int, int] | None:
        """``(run_number, round_index)``, or None when the platform did not say."""
        if self.run_number is None or self.round_index is None:
            return None
        return self.run_number, self.round_index



def rounds_after_catching_up(rounds_done: int, last: AggregateRef | None, latest: AggregateRef) -> int:
    """The round count of a leaf that caught up with ``latest``: its count before, plus the rounds its branch went
    through since the leaf's ``last`` aggregate, so that it numbers the next rounds as the other leaves do. When
    the platform did not tag both aggregates (or the run changed), one more than before.

    Example:
        >>> rounds_after_catching_up(1, AggregateRef("a1", 1, 0), AggregateRef("a3", 1, 2))  # the branch holds round 3
        3
        >>> rounds_after_catching_up(1, None, AggregateRef("a3", 1, 2))
        2
    """
    if last is None or not (last.tagged and latest.tagged) or last.run_number != latest.run_number:
        return rounds_done + 1
    assert latest.round_index is not None and last.round_index is not None
    return rounds_done + max(1, latest.round_index - last.round_index)


def rounds_behind(view: RoundView, last: AggregateRef | None, rounds_done: int) -> int:
    """How many of the branch's aggregates a leaf has missed: 0 when it holds the latest or cannot tell.

    ``last`` is the leaf's last aggregate, ``rounds_done`` its round count. By the run and round of ``last``
    where both it and the branch's latest are tagged (an aggregate of a later run counts as 2: far
    behind); else by ``rounds_done`` against the open round's index. A leaf that never received an
    aggregate (``last`` None) is a newcomer, not behind.

    Example:
        >>> view = RoundView("start", 1, 5, latest_aggregate=AggregateRef("a5", 1, 4))
        >>> rounds_behind(view, AggregateRef("a2", 1, 2), 3), rounds_behind(view, AggregateRef("a5", 1, 4), 5)
        (2, 0)
    """
    latest = view.latest_aggregate
    if latest is None or last is None or latest.aggregation_id == last.aggregation_id:
        return 0
    if latest.tagged and last.tagged:
        assert latest.run_number is not None and latest.round_index is not None
        assert last.run_number is not None and last.round_index is not None
        if latest.run_number != last.run_number:
            return 2 if latest.run_number > last.run_number else 0
        return max(0, latest.round_index - last.round_index)
    if view.round_index is None:
        return 0
    return max(0, view.round_index - rounds_done)


@dataclass(frozen=True)
class WaitProgress:
    """One report on a round that waits; what a progress listener of :class:`~.federation.Federation` receives.

    A listener is called on the thread that runs the round: at the start of each wait, whenever what the
    leaf knows changes (a leaf uploaded, an upload was refused, the run status changed), and at least
    every ``log_every_s`` seconds. It must return quickly; an exception from it is logged and ignored.

    Attributes:
        round: the leaf's round number (rounds this leaf completed so far, plus one).
        waiting_for: ``"run start"`` (the run is paused; the upload waits), ``"aggregate"`` (uploaded;
            the round's aggregate is awaited) or ``"server"`` (a call of the round finds the server away, as
            during a restart, and is tried again until the round's timeout).
        waited_s: seconds this wait has lasted.
        run_number, round_index: the server's run and round this wait is about (the round the upload went
            into, else the open round), or None when the platform does not say.
        uploaded, missing: names of the leaves whose upload counts in the open round, and of those without
            one; empty when the platform does not say (``known`` is then False).
        required: how many uploads complete the round, or None when not known.
        refused: uploads the server refused in the open round (another leaf's, say: a different model), each
            with the leaf's name and the server's reason.
        run_status: the run status as the leaf last heard it (``"start"``, ``"pause"``, ``"stop"``) or None.
        known: whether the server's round progress (``uploaded``, ``missing``, ``required``, ``refused``)
            is known: False on a platform without branchkey-local's round endpoint, or while it is unreachable.
        final: True for the last report of a wait (it ended: aggregate, timeout, stop or interrupt).
        unreachable: while waiting for the server, the call and why it did not get through, such as
            ``"POST /api/v1/file/upload: connection refused"``; else empty.
        retry_left_s: while waiting for the server, seconds until the round's timeout ends the tries
            (None: the round has no timeout).
        kind: the round's payload kind: ``"federated_learning"`` (a model's round) or ``"federated_analytics"``
            (:meth:`Federation.analytics_round`; ``round`` then counts this leaf's analytics rounds).
    """

    round: int
    waiting_for: str
    waited_s: float
    run_number: int | None = None
    round_index: int | None = None
    uploaded: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    required: int | None = None
    refused: tuple[RefusedUpload, ...] = ()
    run_status: str | None = None
    known: bool = False
    final: bool = False
    unreachable: str = ""
    retry_left_s: float | None = None
    kind: str = KIND_FEDERATED_LEARNING

    def __post_init__(self) -> None:
        if self.waiting_for not in WAITING_FOR:
            raise ValueError(f"Expected waiting_for in {WAITING_FOR}. Received: waiting_for={self.waiting_for!r}")

    @property
    def message(self) -> str:
        """One line for the user, e.g. ``Round 3 of run 1: waiting for the aggregate for 12 s; 1 of 2 uploads;
        missing: leaf_2``; rounds are numbered from 1 within their run, as ``branchkey-local status`` and the
        dashboard number them; refused uploads are named with their reason, and what unblocks the round."""
        return self.line()

    def line(self, detail: str = "") -> str:
        """:attr:`message` with ``detail`` (a suffix such as ``"; on this leaf layer_0 is 'stem.weight'"``) after
        the refusals it explains and before what unblocks the round."""
        name = "Analytics round" if self.kind == KIND_FEDERATED_ANALYTICS else "Round"
        where = round_label(self.round, self.run_number, self.round_index)
        what = {RUN_START: "the run to start", AGGREGATE: "the aggregate", SERVER: "the server"}[self.waiting_for]
        text = f"{name} {where}: waiting for {what} for {self.waited_s:.0f} s"
        if self.unreachable:
            text += f" ({self.unreachable}); trying again " + (
                "until it answers (the round has no timeout)" if self.retry_left_s is None else
                f"until the round's timeout, {self.retry_left_s:.0f} s from now")
        if self.waiting_for == RUN_START and self.run_status is not None:
            text += f" (run is {self.run_status!r})"
        if self.known and self.required is not None:
            text += f"; {len(self.uploaded)} of {self.required} uploads"
        if self.missing:
            text += "; missing: " + ", ".join(self.missing)
        for refusal in self.refused:
            text += f"; upload of {refusal.leaf} refused: {refusal.reason}"
        text += detail
        if self.refused and self.waiting_for == AGGREGATE:
            text += "; " + unblock_hint(tuple(refusal.leaf for refusal in self.refused))
        return text

    def same_progress(self, other: WaitProgress | None) -> bool:
        """Whether ``other`` reports the same state (everything but ``waited_s`` and ``final``)."""
        if other is None:
            return False
        fields = ("round", "waiting_for", "run_number", "round_index", "uploaded", "missing", "required",
                  "refused", "run_status", "known", "unreachable", "kind")
        return all(getattr(self, name) == getattr(other, name) for name in fields)


def round_label(number: int, run_number: int | None, round_index: int | None) -> str:
    """How a person reads a round: ``"3 of run 1"``, numbered from 1 within the run as ``branchkey-local status``,
    ``simulate`` and the dashboard number it (the protocol's ``round_index`` counts from 0). ``number`` is the
    leaf's own count, shown alone when the server did not say, and beside the server's when the two differ
    (a leaf that joined late or goes on into a new run).

    Example:
        >>> round_label(3, 1, 2), round_label(3, None, None), round_label(9, 2, 0)
        ('3 of run 1', '3', "1 of run 2 (this leaf's round 9)")
    """
    if run_number is None or round_index is None:
        return str(number)
    own = "" if number == round_index + 1 else f" (this leaf's round {number})"
    return f"{round_index + 1} of run {run_number}{own}"


def unblock_hint(refused: tuple[str, ...]) -> str:
    """What a person can do when a round waits on leaves whose uploads were refused: without it the leaves wait
    until their ``timeout``.

    Example:
        >>> unblock_hint(("leaf_2",))  # doctest: +ELLIPSIS
        "the round completes when leaf_2 uploads a model of the same layout, or on the operator's ...drop-upload...
    """
    names = ", ".join(refused)
    return (f"the round completes when {names} uploads a model of the same layout, or on the operator's "
            f"'branchkey-local round drop-upload LEAF' (or 'round reset', or 'leaf revoke {refused[0]}'), or after "
            f"the branch's round deadline ('branchkey-local init --round-deadline S'); else this leaf waits its "
            f"timeout")


#: what :meth:`Federation.add_progress_listener` accepts
ProgressListener = Callable[[WaitProgress], None]

__all__ = ["UploadReceipt", "RUN_START", "AGGREGATE", "SERVER", "WAITING_FOR", "RefusedUpload", "AggregateRef", "RoundView",
           "parse_round_view", "round_label", "unblock_hint", "rounds_behind", "rounds_after_catching_up", "WaitProgress", "ProgressListener"]
