"""What a server strategy is, and the registry of them: the one place the round logic, the store, the CLI
and the OpenAPI document learn which strategies exist and what their parameters are.

A strategy is one subclass of :class:`Strategy`, registered with :func:`register_strategy`. The class owns

- its **name** (``branches.algorithm``) and a one-line **summary** (``--help``);
- its **parameters** (:class:`Param`: default, range, meaning), checked when an instance is made, so
  an instance always holds valid ones (``self.params``);
- whether it **folds** each upload into the round's running FedAvg sum as it arrives (the upload's
  201 waits for its fold) or reads the stored uploads only at the end (``folds = False``: nothing is
  folded, and the 201 comes once the upload is committed);
- its **combine** step: given the round (:class:`RoundInputs`), write the aggregate and say what
  aggregated it, with any persisted state (:class:`Combined`). A strategy that keeps state between rounds
  reads it back through :class:`StateStore` and hands the new state to the store in ``Combined.state``,
  committed in the same transaction as the aggregate.

The round state machine (:mod:`~branchkey_integrations.server.rounds`) only asks these questions; it never
branches on a name. The built-in strategies live in :mod:`~branchkey_integrations.server.strategies` (and
the server optimizers in :mod:`~branchkey_integrations.server.optimizers`), which register themselves on
import; a new one is a class in its own module, decorated with :func:`register_strategy` (docs/contributing.md).
"""

from __future__ import annotations

import abc
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator, Mapping, Protocol, TypeVar

from ..core.errors import InvalidValueError
from ..core.wire import LayerSpec
from .records import Leaf, StateUpdate, UploadInput

logger = logging.getLogger(__name__)

DEFAULT_STRATEGY = "fedavg"


@dataclass(frozen=True)
class Param:
    """One strategy parameter: its default and the interval it must lie in."""

    default: float
    low: float
    high: float = math.inf
    low_inclusive: bool = False
    meaning: str = ""

    def allowed(self) -> str:
        low = "[" if self.low_inclusive else "("
        high = "inf)" if math.isinf(self.high) else f"{self.high:g})"
        return f"{low}{self.low:g}, {high}"

    def admits(self, value: float) -> bool:
        above = value >= self.low if self.low_inclusive else value > self.low
        return above and value < self.high


class StateStore(Protocol):
    """What a strategy may read from the store while it combines (the store's own methods)."""

    def previous_aggregate(self, branch_id: str, run_number: int, round_index: int) -> tuple[int, Path] | None: ...

    def optimizer_state(self, branch_id: str, run_number: int, round_index: int, strategy: str,
                        params: Mapping[str, float]) -> tuple[Path | None, Path | None] | None: ...

    def new_temp_path(self) -> Path: ...

    def new_state_temp_path(self) -> Path: ...

    def list_leaves(self, branch_id: str | None = None, *, tree_id: str | None = None) -> list[Leaf]: ...


@dataclass
class RoundInputs:
    """A complete round, as :meth:`Strategy.combine` sees it (in a worker thread).

    ``destination``: where the aggregate goes (written ahead for a folding strategy). ``mean``: when
    :meth:`Strategy.uses_mean` said so, the round's weighted FedAvg mean is already written there, and
    this is its (size, SHA-256). ``temps``: temporary files to remove once the aggregate is committed;
    a strategy that writes its aggregate elsewhere appends that file (and any state files) to it.
    """

    branch_id: str
    run_number: int
    round_index: int
    uploads: list[UploadInput]
    specs: list[LayerSpec]
    destination: Path
    mean: tuple[int, str] | None
    store: StateStore
    temps: list[Path] = field(default_factory=list)

    def where(self) -> str:
        return f"branch {self.branch_id} round {self.round_index + 1} of run {self.run_number}"


@dataclass(frozen=True)
class Combined:
    """What :meth:`Strategy.combine` made: the aggregate's file, size and SHA-256, what aggregated the round
    (``strategy``: the strategy's name, or ``fedavg`` where it fell back) and why not the branch's strategy
    or what was lost (``note``), the state to commit with it, and whether the aggregate is the running
    sum's mean (``remakeable``: it can be made again from the round's uploads after a crash, so its fsync
    may come after the leaves are told)."""

    path: Path
    size: int
    sha256: str
    strategy: str
    note: str | None = None
    state: StateUpdate | None = None
    remakeable: bool = False

    @classmethod
    def of_mean(cls, round_: RoundInputs, note: str | None = None) -> "Combined":
        """The round's weighted FedAvg mean (``round_.mean``, at ``round_.destination``) as its aggregate."""
        if round_.mean is None:
            raise ValueError("the round's mean was not written: uses_mean() must say True for this round")
        return cls(round_.destination, *round_.mean, strategy=DEFAULT_STRATEGY, note=note, remakeable=True)


class Strategy(abc.ABC):
    """A server strategy: subclass it, set the class attributes, write :meth:`combine`, register it.

    Raises (when made):
        InvalidValueError: a parameter it does not have, or a value out of its range.
    """

    #: the name a branch stores and the CLI and API take
    name: ClassVar[str]
    #: one line for ``--help``
    summary: ClassVar[str] = ""
    #: name -> its default and range
    parameters: ClassVar[Mapping[str, Param]] = {}
    #: True: each upload is folded into the round's running FedAvg sum on arrival (its 201 waits for the
    #: fold). False: no running-sum work; :meth:`combine` reads the stored uploads at the end.
    folds: ClassVar[bool] = True
    #: True: the branch's learning uploads may carry ``control_<n>`` members (SCAFFOLD's control updates) and its
    #: aggregates do; any other branch refuses them (checked on upload: :func:`takes_controls`)
    carries_controls: ClassVar[bool] = False

    def __init__(self, **params: object) -> None:
        self.params: dict[str, float] = self.check(params)

    @classmethod
    def check(cls, params: Mapping[str, object]) -> dict[str, float]:
        """The full parameters: ``params`` checked, the others at their defaults."""
        unknown = sorted(str(key) for key in params if key not in cls.parameters)
        if unknown:
            raise InvalidValueError(f"Strategy {cls.name} has no parameter {', '.join(repr(k[:40]) for k in unknown)}; "
                                    f"its parameters are {sorted(cls.parameters) or 'none'}.")
        checked = {}
        for key, spec in cls.parameters.items():
            value = params.get(key, spec.default)
            number = _number(value)
            if number is None or not spec.admits(number):
                raise InvalidValueError(f"Expected {cls.name}'s {key} in {spec.allowed()}. Received: {key}={value!r:.80}")
            checked[key] = number
        return checked

    @classmethod
    def describe(cls) -> str:
        """One line per parameter: its default, range and meaning (for ``--help`` and errors)."""
        return "; ".join(f"{key}={p.default:g} in {p.allowed()} ({p.meaning})" for key, p in cls.parameters.items())

    def fallback_reason(self, uploads: int) -> str | None:
        """Why this strategy cannot run on a round of ``uploads`` uploads (the round then takes the weighted
        FedAvg mean, and the note says why), or None."""
        return None

    def uses_mean(self, uploads: int) -> bool:
        """Whether :meth:`combine` needs the round's weighted FedAvg mean written first (``RoundInputs.mean``)."""
        return self.folds or self.fallback_reason(uploads) is not None

    @abc.abstractmethod
    def combine(self, round_: RoundInputs) -> Combined:
        """Write the round's aggregate (blocking: runs in a worker thread) and say what it is."""


#: name -> strategy class; filled by :func:`register_strategy`
STRATEGIES: dict[str, type[Strategy]] = {}

S = TypeVar("S", bound=type[Strategy])


def register_strategy(cls: S) -> S:
    """Add a strategy class to the catalogue under its ``name`` (usable as a class decorator).

    Raises:
        InvalidValueError: the class has no name, its defaults are out of its own ranges, or another
            class holds the name.
    """
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.strip():
        raise InvalidValueError(f"Expected a strategy class with a name (a class attribute). Received: {cls!r}")
    held = STRATEGIES.get(name)
    if held is not None and held is not cls:
        raise InvalidValueError(f"Expected a new strategy name; {name!r} is {held.__module__}.{held.__qualname__}.")
    cls.check({})  # its defaults must pass its own checks
    STRATEGIES[name] = cls
    return cls


def unregister_strategy(name: str) -> None:
    """Remove a strategy from the catalogue (a test's toy strategy, once done)."""
    STRATEGIES.pop(name, None)


def strategy_class(name: object) -> type[Strategy]:
    if not isinstance(name, str) or name not in STRATEGIES:
        raise InvalidValueError(f"Expected a strategy in {sorted(STRATEGIES)}. Received: strategy={name!r:.80}")
    return STRATEGIES[name]


def takes_controls(name: str) -> bool:
    """Whether a branch whose algorithm is ``name`` takes ``control_<n>`` members (``Strategy.carries_controls``)."""
    cls = STRATEGIES.get(name)
    return cls is not None and cls.carries_controls


def strategy_for(name: object, params: Mapping[str, object] | None = None) -> Strategy:
    """An instance of the strategy ``name`` with ``params`` (checked; the others at their defaults).

    Raises:
        InvalidValueError: an unknown strategy or parameter name, or a value out of its range.
    """
    cls = strategy_class(name)
    return cls(**cls.check(dict(params or {})))  # checked first: a constructor may name its parameters


def check_strategy(name: object, params: Mapping[str, object] | None = None) -> dict[str, float]:
    """The strategy's full parameters: ``params`` checked, the others at their defaults.

    Raises:
        InvalidValueError: an unknown strategy or parameter name, or a value out of its range; the
            message names the value and what is allowed.

    Example (with the built-in strategies registered):
        >>> from branchkey_integrations.server import strategies
        >>> check_strategy("fedadam", {"eta": 0.1})
        {'eta': 0.1, 'beta_1': 0.9, 'beta_2': 0.99, 'tau': 0.001}
        >>> check_strategy("trimmed-mean", {"beta": 0.5})
        Traceback (most recent call last):
        ...
        branchkey_integrations.core.errors.InvalidValueError: Expected trimmed-mean's beta in [0, 0.5). Received: beta=0.5
    """
    return strategy_class(name).check(dict(params or {}))


def describe(name: str) -> str:
    """One line per parameter of ``name``: its default, range and meaning (for ``--help`` and errors)."""
    return strategy_class(name).describe()


class _Catalogue(Mapping[str, Mapping[str, Param]]):
    """The registered strategies' parameters by name, read from the classes each time (a live view)."""

    def __getitem__(self, name: str) -> Mapping[str, Param]:
        return STRATEGIES[name].parameters

    def __iter__(self) -> Iterator[str]:
        return iter(list(STRATEGIES))

    def __len__(self) -> int:
        return len(STRATEGIES)


#: name -> its parameters, for every registered strategy
CATALOGUE: Mapping[str, Mapping[str, Param]] = _Catalogue()


def _number(value: object) -> float | None:
    """``value`` as a float, or None: not a number (a bool is not one), or too large for a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


__all__ = [
    "DEFAULT_STRATEGY", "Param", "StateStore", "RoundInputs", "Combined", "Strategy", "STRATEGIES", "CATALOGUE",
    "register_strategy", "unregister_strategy", "strategy_class", "strategy_for",
    "takes_controls", "check_strategy", "describe",
]
