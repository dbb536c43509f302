"""The one interface every framework's simulation module implements, and the lookup by name.

A framework module trains one federated leaf's turn (:meth:`Framework.train_turn`: from an aggregate,
``epochs_per_round`` epochs, the budget's learning-rate schedule), scores an aggregate
(:meth:`Framework.score`), and trains a model alone for ``rounds x epochs_per_round`` epochs reporting the
test accuracy after each round (:meth:`Framework.train`: local-only or the centralized baseline, with the
very same model, optimizer and budget).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from .data import Split

FRAMEWORKS = {"lightning": "lightning_model", "keras": "keras_model"}
_INSTALL_HINT = {"lightning": "branchkey-integrations[lightning,simulate]",
                 "keras": "branchkey-integrations[tensorflow,simulate]"}  # [keras] alone brings no backend
_REQUIRES = {"lightning": ("torch", "lightning"), "keras": ("keras",)}

#: called after each round with (round number from 1, accuracy on the common test set)
RoundHook = Callable[[int, float], None]


@dataclass(frozen=True)
class TrainPlan:
    """The training budget and recipe, identical for federated, local-only and centralized training."""

    rounds: int
    epochs_per_round: int
    seed: int  # the initial model: the same on every leaf, as if the platform had sent it
    data_seed: int = 0  # the order of batches: each leaf's own
    batch_size: int = 32
    learning_rate: float = 1e-2  # cosine-annealed to 0 over the whole budget
    hidden: int = 256


class Framework(Protocol):
    """What :mod:`.lightning_model` and :mod:`.keras_model` provide."""

    def train(self, data: Split, test: Split, plan: TrainPlan, on_round: RoundHook) -> None: ...

    def train_turn(self, data: Split, plan: TrainPlan, number: int, start: Sequence[np.ndarray] | None,
                   proximal_mu: float = 0.0, state: Any = None, accelerator: str = "cpu",
                   scaffold: Any = None) -> tuple[list[np.ndarray], Any]: ...

    def score(self, layers: Sequence[np.ndarray], test: Split, plan: TrainPlan) -> float: ...

    def features(self, layers: Sequence[np.ndarray], split: Split, plan: TrainPlan) -> np.ndarray: ...

    def head(self, layers: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]: ...

    def with_head(self, layers: Sequence[np.ndarray], weight: np.ndarray, bias: np.ndarray) -> list[np.ndarray]: ...


def load_framework(name: str) -> Framework:
    """The simulation module for ``name``; a missing framework fails here with the install command."""
    if name not in FRAMEWORKS:
        raise ValueError(f"Expected framework in {tuple(FRAMEWORKS)}. Received: framework={name!r}")
    try:
        module: ModuleType = importlib.import_module(f"{__package__}.{FRAMEWORKS[name]}")
    except ImportError as exc:
        raise ImportError(f"The {name} simulation needs {exc.name or 'a missing package'}: "
                          f"pip install '{_INSTALL_HINT[name]}'") from exc
    return module  # type: ignore[return-value]  # a module satisfies the Protocol structurally


def check_installed(name: str) -> None:
    """Fail with the install command if ``name``'s packages are missing, without importing them (the
    parent process only supervises; importing TensorFlow there would cost seconds and memory for nothing)."""
    if name not in FRAMEWORKS:
        raise ValueError(f"Expected framework in {tuple(FRAMEWORKS)}. Received: framework={name!r}")
    missing = [module for module in _REQUIRES[name] if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(f"The {name} simulation needs {', '.join(missing)}: pip install '{_INSTALL_HINT[name]}'")
