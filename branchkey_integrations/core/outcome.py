"""How one round ends for a training callback: the :class:`Outcome` of :meth:`Federation.exchange`.

This module owns :class:`RoundResult` (what :meth:`Federation.run_round` returns), the check of an aggregate
before it may be loaded (:func:`checked_model`: a model's kind, then every layer against the local model), the
four ways a round can end for a leaf that is training (``"done"``, ``"timeout"``, ``"stopped"``, ``"error"``),
the mapping of :meth:`Federation.run_round`'s exceptions onto them, and making an
outcome portable between processes. Why an outcome instead of exceptions: under DDP only global rank 0 runs the
round, and every rank must then act identically. An exception raised on rank 0 before the broadcast would leave
the other ranks waiting for it forever; an outcome is a value that can always be broadcast, and every rank then
stops, loads or raises alike. The Keras callback, with one process, uses the same value so that both callbacks
draw the same line between "the run ended" and "the round failed".
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence, Union

import numpy as np

from . import wire
from .errors import AggregateMismatchError, BranchKeyError, RequestRejectedError, RoundInterrupted, RunStopped
from .protocol import KIND_FEDERATED_LEARNING, LAYER_PATTERN
from .snapshots import save_snapshot

logger = logging.getLogger(__name__)

OUTCOME_KINDS = ("done", "timeout", "stopped", "error")

#: the arrays of a round, or a function that makes them: a failure to make them is then an outcome too
Layers = Union[Sequence[np.ndarray], Callable[[], Sequence[np.ndarray]]]
#: a weighting, or a function that returns one (called once, inside the round)
Weighting = Union[float, Callable[[], float]]

_LAYER_KEY = re.compile(rf"\b{LAYER_PATTERN.pattern}\b")  # how the platform names a layer: by its position


def check_layers(received: Sequence[np.ndarray], expected: Sequence[wire.LayerSpec],
                 names: Sequence[str] | None = None) -> list[np.ndarray]:
    """Check every layer of an aggregate before any is used; return them cast to the expected dtypes.

    Raises:
        AggregateMismatchError: the layer count, a shape or a dtype kind differs, or a value is not finite.
    """
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


def checked_model(archive: wire.Archive, expected: Sequence[wire.LayerSpec],
                  names: Sequence[str] | None = None) -> list[np.ndarray]:
    """The layers of a downloaded aggregate, checked (:func:`check_layers`); an aggregate of another payload kind
    (an analytics round's) is never a model: :class:`AggregateMismatchError`."""
    if archive.kind != KIND_FEDERATED_LEARNING:
        raise AggregateMismatchError(f"The aggregate is a {archive.kind!r} archive ({len(archive.fields)} fields), not "
                                     "a model: it was an analytics round's, and is never loaded into a model.")
    return check_layers(archive.layers, expected, names)


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
        run_number, round_index: the server's run and round of the aggregate (or of the upload, after a
            timeout), when the platform says.
        caught_up: the leaf was more than one round behind its branch and loaded the branch's latest
            aggregate instead of uploading (``upload_mb`` is 0).
        skipped: why a round without an aggregate ended: ``"timeout"`` or ``"unreachable"`` (the platform
            could not be reached or failed, with ``on_timeout="continue"``); None when it has an aggregate.
        controls: the aggregate's ``control_<n>`` members (SCAFFOLD's server control variate), checked and cast
            like ``layers``; None when it holds none (every branch but a SCAFFOLD one).
    """

    aggregation_id: str | None
    layers: list[np.ndarray] | None
    wait_s: float
    upload_mb: float
    round: int
    run_number: int | None = None
    round_index: int | None = None
    caught_up: bool = False
    skipped: str | None = None
    controls: list[np.ndarray] | None = None

    @property
    def timed_out(self) -> bool:
        return self.layers is None


@dataclass(frozen=True)
class Outcome:
    """What one round came to.

    Attributes:
        kind: ``"done"`` (``result`` holds the checked aggregate), ``"timeout"`` (``result`` holds no layers:
            the wait ran out, or the platform could not be reached, with ``on_timeout="continue"``),
            ``"stopped"`` (the run was stopped, or the wait interrupted; ``error`` is the :class:`RunStopped` or
            :class:`RoundInterrupted` that says when) or ``"error"`` (``error`` is what went wrong).
        result: the round's :class:`RoundResult` for ``"done"`` and ``"timeout"``, else None.
        error: the exception for ``"stopped"`` and ``"error"``, else None.
    """

    kind: str
    result: RoundResult | None = None
    error: BaseException | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in OUTCOME_KINDS:
            raise ValueError(f"Expected kind in {OUTCOME_KINDS}. Received: kind={self.kind!r}")

    def portable(self) -> Outcome:
        """This outcome with an error that survives pickling (a DDP broadcast pickles it).

        An error that does not pickle (it holds a socket, a lambda, ...) travels as a :class:`BranchKeyError`
        with its type and text, so the receiving rank can still raise something that says what happened.
        """
        if self.error is None:
            return self
        try:
            pickle.loads(pickle.dumps(self.error))
            return self
        except Exception:  # noqa: BLE001 - any failure means "not portable"
            return replace(self, error=BranchKeyError(f"{type(self.error).__name__} on global rank 0: {self.error}"))


#: how :func:`exchange` runs the round: :meth:`Federation.run_round` (arrays, weighting, names=...)
RunRound = Callable[..., RoundResult]


def exchange(run_round: RunRound, layers: Layers, weighting: Weighting, names: Sequence[str] | None = None,
             snapshot_dir: Path | None = None, controls: Layers = ()) -> Outcome:
    """One ``run_round`` as an :class:`Outcome`; see :meth:`Federation.exchange`, which is the way to call it."""
    try:
        arrays = list(layers() if callable(layers) else layers)
        extra = {"controls": list(controls() if callable(controls) else controls)} if controls else {}
        result = run_round(arrays, weighting() if callable(weighting) else weighting, names=names, **extra)
        if result.timed_out:
            return Outcome("timeout", result)
        if snapshot_dir is not None:
            assert result.aggregation_id is not None and result.layers is not None
            save_snapshot(snapshot_dir, result.round, result.aggregation_id, result.layers,
                          names if names is not None else [wire.layer_key(i) for i in range(len(arrays))])
        return Outcome("done", result)
    except (RunStopped, RoundInterrupted) as exc:
        logger.info("%s Stopping training.", exc)
        return Outcome("stopped", error=exc)
    except RequestRejectedError as exc:
        named = name_refused_layers(exc, names or [])
        if named is not exc:
            named.__cause__ = exc
        return Outcome("error", error=named)
    except Exception as exc:  # noqa: BLE001 - the caller raises it (on every rank, under DDP)
        return Outcome("error", error=exc)


def layer_names_in(texts: Iterable[str], names: Sequence[str]) -> str:
    """What this leaf calls the ``layer_<i>`` that ``texts`` mention (the platform only knows positions), as
    ``"layer_0 is 'stem.weight', ..."``, or ``""`` when they mention none of ``names``."""
    mentioned = sorted({int(i) for text in texts for i in _LAYER_KEY.findall(text) if int(i) < len(names)})
    return ", ".join(f"layer_{i} is {names[i]!r}" for i in mentioned)


def name_refused_layers(error: RequestRejectedError, names: Sequence[str]) -> RequestRejectedError:
    """The platform's refusal with the local names of the ``layer_<i>`` it mentions.

    The platform only knows positions; the leaf knows that ``layer_4`` is ``head/kernel``, which is what
    a user needs to find the layer whose architecture differs.
    """
    local = layer_names_in([error.message], names)
    if not local:
        return error
    return RequestRejectedError(f"{error.message} (on this leaf {local}; every leaf of the branch must federate "
                                "the same parameters)", error.status_code)


__all__ = ["OUTCOME_KINDS", "RoundResult", "Outcome", "Layers", "Weighting", "RunRound", "exchange", "layer_names_in",
           "name_refused_layers", "check_layers", "checked_model"]
