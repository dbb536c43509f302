"""The one interface every framework's simulation module implements, and the lookup by name.

A framework module trains one model on one :class:`~.data.Split` for ``rounds x epochs_per_round``
epochs, reports the test accuracy after each round, and federates through that framework's real
BranchKey callback when given a :class:`FederationTarget` (else it trains alone: local-only or the
centralized baseline, with the very same model, optimizer and budget).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Protocol

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


@dataclass(frozen=True)
class FederationTarget:
    """Where a federated leaf uploads (its credentials file, the server URL, the notification transport),
    and how it trains between rounds: ``proximal_mu`` > 0 is FedProx (the callback's proximal term)."""

    credentials: str
    host: str
    transport: str = "websocket"
    round_timeout_s: float = 300.0
    proximal_mu: float = 0.0


class Framework(Protocol):
    """What :mod:`.lightning_model` and :mod:`.keras_model` provide."""

    def train(self, data: Split, test: Split, plan: TrainPlan, on_round: RoundHook,
              federation: FederationTarget | None = None) -> None: ...


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
