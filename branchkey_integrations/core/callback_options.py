"""What the framework callbacks share, framework-free: their common options and what those options resolve to.

The Lightning and the Keras callback take the same options with the same meaning (``every_n_epochs``,
``num_samples``, ``buffers``, ``snapshot_dir``, ...). Checking and resolving them here, once, keeps the two
callbacks' error messages, weighting rules, round numbering and snapshot files identical; the callbacks only
translate between their framework and :class:`~branchkey_integrations.core.federation.Federation`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Callable, Sequence, Union

from .errors import RequestRejectedError
from .federation import RoundResult

logger = logging.getLogger(__name__)

#: ``"local"``: state that is not trained (BatchNorm statistics) stays on the leaf, as in FedBN;
#: ``"average"``: its floating-point part is averaged like the parameters.
BUFFER_POLICIES = ("local", "average")

NumSamples = Union[int, Callable[[], int], None]

_LAYER_KEY = re.compile(r"\blayer_(0|[1-9][0-9]*)\b")


def check_every_n_epochs(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected every_n_epochs >= 1. Received: every_n_epochs={value!r}")
    return value


def check_num_samples(value: Any, *, required: bool) -> NumSamples:
    """An int > 0 or a zero-argument callable; None only where the framework can count the samples itself."""
    ok = callable(value) or (isinstance(value, int) and not isinstance(value, bool) and value > 0)
    if ok or (value is None and not required):
        return value
    allowed = "an int > 0 or a callable returning one" if required else \
        "an int > 0, a callable returning one, or None"
    raise ValueError(f"Expected num_samples to be {allowed}. Received: num_samples={value!r}")


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"Expected {name} in {tuple(allowed)}. Received: {name}={value!r}")
    return value


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"Expected {name} to be True or False. Received: {name}={value!r}")
    return value


def resolve_weighting(num_samples: NumSamples, fallback: Callable[[], float] | None = None) -> float:
    """This leaf's weighting in the average: ``num_samples`` (called if callable), else ``fallback()``.

    A callable is checked on every call: it may count data that grows between rounds.
    """
    if callable(num_samples):
        value = num_samples()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"Expected num_samples() to return a number > 0. Received: {value!r}")
        return float(value)
    if num_samples is not None:
        return float(num_samples)
    if fallback is None:
        raise ValueError("Expected num_samples to be an int > 0 or a callable returning one. Received: num_samples=None")
    return float(fallback())


def is_round_epoch(epoch: int, every_n_epochs: int) -> bool:
    """Whether the 0-based ``epoch`` ends with a round: epochs n-1, 2n-1, ..."""
    return (epoch + 1) % every_n_epochs == 0


def rounds_before(epoch: int, every_n_epochs: int) -> int:
    """Rounds that the epochs before the 0-based ``epoch`` took part in: what a run resumed at ``epoch`` has done."""
    return epoch // every_n_epochs


def name_refused_layers(error: RequestRejectedError, names: Sequence[str]) -> RequestRejectedError:
    """The platform's refusal with the local names of the ``layer_<i>`` it mentions.

    The platform only knows positions; the leaf knows that ``layer_4`` is ``head/kernel``, which is what
    a user needs to find the layer whose architecture differs.
    """
    mentioned = sorted({int(i) for i in _LAYER_KEY.findall(error.message) if int(i) < len(names)})
    if not mentioned:
        return error
    local = ", ".join(f"layer_{i} is {names[i]!r}" for i in mentioned)
    return RequestRejectedError(f"{error.message} (on this leaf {local}; every leaf of the branch must federate "
                                "the same parameters)", error.status_code)


def save_snapshot(directory: Path, result: RoundResult, names: Sequence[str]) -> Path:
    """Write the aggregate of ``result`` as ``round_<n>.safetensors``: named tensors, loadable without pickle."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"round_{result.round:05d}.safetensors"
    save_file(dict(zip(names, result.layers)), str(path),
              metadata={"aggregation_id": str(result.aggregation_id), "round": str(result.round)})
    logger.debug("Saved the aggregate of round %d to %s", result.round, path)
    return path


__all__ = ["BUFFER_POLICIES", "NumSamples", "check_every_n_epochs", "check_num_samples", "check_choice",
           "check_flag", "resolve_weighting", "is_round_epoch", "rounds_before", "name_refused_layers",
           "save_snapshot"]
