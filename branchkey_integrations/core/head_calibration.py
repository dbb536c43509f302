"""Classifier calibration as the callbacks run it, framework-free: when it runs (:class:`CalibrationPlan`), and one
calibration (:func:`calibrate`): this leaf's class statistics of the features entering the final linear layer
(:mod:`.head_statistics`) go out as one ``federated_analytics`` round of the leaf's
:class:`~.federation.Federation`, and the layer is refit from the combined statistics (:mod:`.head_refit`).

Every leaf of the branch refits from the same combined statistics with the same closed-form float64 arithmetic,
so every leaf ends with the same layer (docs/calibration.md says why the refit is on the leaves and not on the
server). Every leaf of a branch must calibrate at the same rounds: an analytics round completes when the branch's
leaves have all sent.

Example:
    >>> plan = CalibrationPlan.of("every:2")
    >>> [plan.after_round(n) for n in (1, 2, 3, 4)], plan.at_end
    ([False, True, False, True], True)
    >>> CalibrationPlan.of(False).enabled
    False
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .head_refit import DEFAULT_RIDGE, HeadRefit, check_ridge, refit_head
from .head_statistics import HeadStatistics, head_statistics

logger = logging.getLogger(__name__)

#: what ``calibrate_head`` takes: False (off), True or ``"end"`` (once, after training), ``"every:K"`` (after every
#: K-th round, and after training when its last round was not one of them)
CALIBRATE_CHOICES = "False, True, 'end' or 'every:K' (K an int >= 1)"


@dataclass(frozen=True)
class CalibrationPlan:
    """When a callback calibrates, and with what: ``every`` (rounds; None: only at the end), ``at_end``,
    ``min_class_count`` (a class with fewer samples on this leaf is not sent) and ``ridge``."""

    enabled: bool = False
    every: int | None = None
    at_end: bool = False
    min_class_count: int = 1
    ridge: float = DEFAULT_RIDGE

    @classmethod
    def of(cls, calibrate_head: Any, min_class_count: Any = 1, ridge: Any = DEFAULT_RIDGE) -> "CalibrationPlan":
        """The plan for the callbacks' ``calibrate_head`` option.

        Raises:
            ValueError: naming the value received and what is allowed.
        """
        if isinstance(min_class_count, bool) or not isinstance(min_class_count, int) or min_class_count < 1:
            raise ValueError(f"Expected min_class_count to be an int >= 1. Received: min_class_count={min_class_count!r}")
        ridge = check_ridge(ridge)
        if calibrate_head is False or calibrate_head is None:
            return cls()
        if calibrate_head is True or calibrate_head == "end":
            return cls(True, None, True, min_class_count, ridge)
        if isinstance(calibrate_head, str) and calibrate_head.startswith("every:"):
            every = calibrate_head.partition(":")[2]
            if every.isdigit() and int(every) >= 1:
                return cls(True, int(every), True, min_class_count, ridge)
        raise ValueError(f"Expected calibrate_head to be {CALIBRATE_CHOICES}. Received: calibrate_head={calibrate_head!r}")

    def after_round(self, number: int) -> bool:
        """Whether round ``number`` (from 1) is followed by a calibration."""
        return self.every is not None and number % self.every == 0


def calibrate(federation: Any, features: Any, labels: Any, weight: Any, bias: Any, plan: CalibrationPlan,
              say: Callable[[str], None] = logger.info) -> HeadRefit:
    """One calibration of this leaf: send the class statistics of ``features`` (the final layer's inputs on this
    leaf's training data, [N, D]) and ``labels`` ([N]) in an analytics round of ``federation``, and return the
    final layer (``weight`` [C, D], ``bias`` [C]) refit from the combined statistics. What it did is said through
    ``say`` (the callback's output): the classes withheld here, and the classes no leaf sent (left as they were).

    Raises:
        AnalyticsError: statistics that cannot be computed or combined (see :func:`~.head_statistics.head_statistics`).
        what :meth:`~.federation.Federation.analytics_round` raises (a timeout, a stopped run).
    """
    weight = np.asarray(weight)
    fields, withheld = head_statistics(features, labels, weight.shape[0], plan.min_class_count)
    if withheld:
        say(f"BranchKey: calibration: classes {withheld} have fewer than min_class_count={plan.min_class_count} "
            "samples on this leaf and are not sent.")
    result = federation.analytics_round(fields=fields)
    refit = refit_head(HeadStatistics.from_fields(result.fields), weight, bias, ridge=plan.ridge)
    say(f"BranchKey: calibration: final layer refit from {result.contributors or 'the'} leaves' class statistics "
        f"(classes {refit.refit})"
        + (f"; classes {refit.untouched} were sent by no leaf and keep their rows." if refit.untouched else "."))
    return refit


__all__ = ["CALIBRATE_CHOICES", "CalibrationPlan", "calibrate"]
