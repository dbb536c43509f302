"""The refit of the final linear layer from combined class statistics (:mod:`.head_statistics`), in float64 NumPy,
closed-form, so that every leaf that refits from the same statistics gets the same bytes.

The refit is CCVR's (Luo et al., NeurIPS 2021) taken to its limit: CCVR samples virtual features from
class-conditional Gaussians and trains the classifier on them by SGD. With one covariance shared by the classes
(the tied covariance :class:`~.head_statistics.HeadStatistics` holds), the classifier that softmax regression
converges to on infinitely many such samples is linear discriminant analysis, which has a closed form:
``w_c = S^-1 mu_c``, ``b_c = -w_c . mu_c / 2 + log(n_c / N)``, with ``S`` the pooled within-class covariance
plus a ridge ``ridge * trace(S) / D * I`` (the features of a ReLU layer are far from full rank). Closed-form means
no sampling, no seed, no iteration count: nothing that two leaves could do differently, and milliseconds of work.

A class that no leaf sent (count 0 in the combined statistics) keeps its row of the layer as it was, and the
refit says so (:attr:`HeadRefit.untouched`, and a warning in the log).

Example:
    >>> from .head_statistics import HeadStatistics, head_statistics
    >>> x = np.array([[0.0, 1.0], [0.2, 1.1], [1.0, 0.0], [1.1, 0.1]])
    >>> fields, _ = head_statistics(x, np.array([0, 0, 1, 1]), num_classes=3)
    >>> refit = refit_head(HeadStatistics.from_fields(fields), np.ones((3, 2)), np.zeros(3))
    >>> refit.refit, refit.untouched, refit.weight[2].tolist()
    ([0, 1], [2], [1.0, 1.0])
    >>> (x @ refit.weight[:2].T + refit.bias[:2]).argmax(axis=1).tolist()
    [0, 0, 1, 1]
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import AnalyticsError
from .head_statistics import HeadStatistics

logger = logging.getLogger(__name__)

#: the ridge added to the within-class covariance, as a fraction of its mean variance (chosen at seeds 0-2 of the
#: strategies benchmark among 0.001, 0.01 and 0.1; all three were within 0.5 point of each other)
DEFAULT_RIDGE = 1e-2


def check_ridge(ridge: object) -> float:
    """``ridge`` as a float when it is a finite number > 0, else ``ValueError`` naming it."""
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not 0 < ridge < math.inf:
        raise ValueError(f"Expected ridge to be a number > 0 (default {DEFAULT_RIDGE}). Received: ridge={ridge!r}")
    return float(ridge)


@dataclass(frozen=True)
class HeadRefit:
    """The refit layer: ``weight`` [C, D] and ``bias`` [C] in float64 (out x in, as ``torch.nn.Linear``; a Keras
    ``Dense`` kernel is its transpose), the classes refit and those left as they were."""

    weight: np.ndarray
    bias: np.ndarray
    refit: list[int]
    untouched: list[int]

    def digest(self) -> str:
        """A SHA-256 of the layer's bytes: equal on two leaves exactly when their layers are bit-identical."""
        return hashlib.sha256(self.weight.tobytes() + self.bias.tobytes()).hexdigest()


def refit_head(stats: HeadStatistics, weight: Any, bias: Any, *, ridge: float = DEFAULT_RIDGE) -> HeadRefit:
    """Refit the rows of ``weight`` [C, D] and ``bias`` [C] of the classes present in ``stats``; the others stay.

    Raises:
        AnalyticsError: the layer's shape does not match the statistics', or no class has any sample.
        ValueError: ``ridge`` is not a number > 0.
    """
    ridge = check_ridge(ridge)
    old_weight = np.array(weight, dtype=np.float64)
    old_bias = np.array(bias, dtype=np.float64).reshape(-1)
    classes, width = stats.sums.shape
    if old_weight.shape != (classes, width) or old_bias.shape != (classes,):
        raise AnalyticsError(f"The final layer has weight {old_weight.shape} and bias {old_bias.shape}; the "
                             f"statistics are of {classes} classes of {width} features. Compute them on the inputs of "
                             "this layer, with num_classes equal to its outputs.")
    present, absent = stats.present, stats.absent
    if not present:
        raise AnalyticsError("No leaf sent any class (every count is 0): there is nothing to refit the layer on. "
                             "Lower min_class_count, or check the labels the leaves pass.")
    covariance = stats.within_covariance()
    scale = float(np.trace(covariance)) / width
    covariance[np.diag_indices(width)] += ridge * (scale if scale > 0 else 1.0)
    means = stats.means()
    new_weight = np.linalg.solve(covariance, means.T).T
    counts = stats.counts[present].astype(np.float64)
    new_bias = -0.5 * np.einsum("cd,cd->c", new_weight, means) + np.log(counts / counts.sum())
    old_weight[present], old_bias[present] = new_weight, new_bias
    if absent:
        logger.warning("Calibration: classes %s were sent by no leaf; their rows of the final layer are left as they "
                       "were", absent)
    logger.info("Calibration: refit the final layer's rows of %d classes from %d samples", len(present),
                int(counts.sum()))
    return HeadRefit(old_weight, old_bias, present, absent)


def class_accuracy(features: Any, labels: Any, weight: Any, bias: Any) -> list[float | None]:
    """The accuracy, per class, of the layer ``weight`` [C, D] and ``bias`` on ``features`` [N, D] (its inputs)
    with their ``labels``: what a refit changes, class by class; None for a class with no sample here.

    >>> class_accuracy(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]]), [0, 1, 1], np.eye(3, 2), np.zeros(3))
    [1.0, 0.5, None]
    """
    labels = np.asarray(labels).reshape(-1)
    logits = np.asarray(features, dtype=np.float64) @ np.asarray(weight, dtype=np.float64).T + np.asarray(bias)
    right = logits.argmax(axis=1) == labels
    return [float(right[labels == c].mean()) if (labels == c).any() else None for c in range(logits.shape[1])]


__all__ = ["DEFAULT_RIDGE", "HeadRefit", "check_ridge", "class_accuracy", "refit_head"]
