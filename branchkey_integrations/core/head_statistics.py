"""The statistics a leaf sends for classifier calibration: per class the count and the sum of the features entering
the final linear layer, and one sum of outer products over those features, all as ``federated_analytics`` fields
that the platform combines exactly by summing.

Why these three and nothing else: with them the federation knows, exactly, the pooled class means and the pooled
within-class (tied) covariance of the features, which is all the closed-form refit of :mod:`.head_refit` needs.
The sum of outer products is one matrix for all classes (not one per class, as CCVR sends): the tied covariance
is what the refit uses, it is ``classes`` times smaller (for a 256-wide layer and 10 classes, 263 kB instead of
2.6 MB), and it says less about any one class. It travels as the packed upper triangle (the matrix is symmetric).

The field names end in ``_n``, ``_sum`` and ``_sumsq``, the suffixes the platform sums without any configuration
(:data:`~.analytics.BUNDLE_OPS`); counts are int64, the rest float64, so the combination is exact in the counts and
float64-exact in the sums. A class with fewer than ``min_class_count`` samples on this leaf is withheld: its count,
its sum and its samples' outer products are zeros (a zero adds nothing to a sum, so withholding needs no other field).

Example:
    >>> features = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    >>> fields, withheld = head_statistics(features, np.array([0, 1, 1]), num_classes=3)
    >>> fields[COUNTS].tolist(), fields[SUMS].tolist(), withheld
    ([1, 2, 0], [[1.0, 0.0], [1.0, 3.0], [0.0, 0.0]], [2])
    >>> stats = HeadStatistics.from_fields(fields)
    >>> stats.outer.tolist()  # sum of x x^T over the three samples
    [[2.0, 1.0], [1.0, 5.0]]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .errors import AnalyticsError

logger = logging.getLogger(__name__)

#: the fields of one calibration upload: per-class counts [C] int64, per-class feature sums [C, D] float64, and the
#: packed upper triangle of the sum of outer products [D * (D + 1) / 2] float64 (suffixes the platform sums)
COUNTS = "head_class_n"
SUMS = "head_feature_sum"
OUTER = "head_outer_sumsq"
FIELDS = (COUNTS, SUMS, OUTER)


def pack_upper(matrix: np.ndarray) -> np.ndarray:
    """The upper triangle (diagonal included) of a square matrix, row by row.

    >>> pack_upper(np.array([[1.0, 2.0], [2.0, 3.0]])).tolist()
    [1.0, 2.0, 3.0]
    """
    return matrix[np.triu_indices(matrix.shape[0])]


def unpack_upper(packed: np.ndarray, size: int) -> np.ndarray:
    """The symmetric ``size x size`` matrix whose upper triangle :func:`pack_upper` gave as ``packed``.

    >>> unpack_upper(np.array([1.0, 2.0, 3.0]), 2).tolist()
    [[1.0, 2.0], [2.0, 3.0]]
    """
    rows, cols = np.triu_indices(size)
    if packed.shape != rows.shape:
        raise AnalyticsError(f"Field {OUTER!r} holds {packed.size} values; a {size}-wide layer's upper triangle holds "
                             f"{rows.size}. Every leaf must compute its statistics on the same layer.")
    matrix = np.zeros((size, size), np.float64)
    matrix[rows, cols] = packed
    matrix[cols, rows] = packed
    return matrix


def head_statistics(features: Any, labels: Any, num_classes: int,
                    min_class_count: int = 1) -> tuple[dict[str, np.ndarray], list[int]]:
    """This leaf's calibration fields for ``features`` ([N, D], the inputs of the final linear layer) and their
    ``labels`` ([N], integers from 0 to ``num_classes - 1``), and the classes it withholds: those with fewer
    than ``min_class_count`` samples here (absent ones included). Sums are taken in float64.

    Raises:
        AnalyticsError: features not 2-D, not finite, or not as many as the labels; a label out of range.
        ValueError: ``num_classes`` or ``min_class_count`` below 1.
    """
    for name, value in (("num_classes", num_classes), ("min_class_count", min_class_count)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"Expected {name} to be an int >= 1. Received: {name}={value!r}")
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).reshape(-1)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise AnalyticsError(f"Expected features of shape [samples, width] and one label per sample. Received: "
                             f"features {x.shape}, labels {y.shape}.")
    if not np.isfinite(x).all():
        raise AnalyticsError("The features entering the final layer hold NaN or infinity; calibration cannot use "
                             "them (check the model's training first).")
    if y.size and (y.dtype.kind not in "iu" or int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise AnalyticsError(f"Expected integer class labels from 0 to {num_classes - 1} (num_classes={num_classes}). "
                             f"Received labels of dtype {y.dtype} from {y.min()} to {y.max()}.")
    counts = np.bincount(y.astype(np.int64), minlength=num_classes).astype(np.int64)
    withheld = [int(c) for c in np.flatnonzero(counts < min_class_count)]
    keep = ~np.isin(y, withheld)
    x, y = x[keep], y[keep].astype(np.int64)
    counts[withheld] = 0
    sums = np.zeros((num_classes, x.shape[1]), np.float64)
    np.add.at(sums, y, x)
    fields = {COUNTS: counts, SUMS: sums, OUTER: pack_upper(x.T @ x)}
    if withheld:
        logger.info("Calibration statistics: classes %s have fewer than min_class_count=%d samples here and are not "
                    "sent", withheld, min_class_count)
    return fields, withheld


@dataclass(frozen=True)
class HeadStatistics:
    """Combined calibration statistics: ``counts`` [C], ``sums`` [C, D] and ``outer`` [D, D] (the full matrix)."""

    counts: np.ndarray
    sums: np.ndarray
    outer: np.ndarray

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> "HeadStatistics":
        """Read the combined fields (an :class:`~.analytics_result.AnalyticsResult`'s ``fields``).

        Raises:
            AnalyticsError: a field is missing, or the shapes do not fit together.
        """
        missing = [name for name in FIELDS if name not in fields]
        if missing:
            raise AnalyticsError(f"The analytics aggregate has no {', '.join(missing)}: it is not a calibration "
                                 "round's (every leaf of the round must send head_statistics' fields, and only them).")
        counts = np.asarray(fields[COUNTS]).astype(np.int64).reshape(-1)
        sums = np.asarray(fields[SUMS], dtype=np.float64)
        if sums.ndim != 2 or sums.shape[0] != counts.size:
            raise AnalyticsError(f"Field {SUMS!r} has shape {sums.shape}; expected [{counts.size}, width].")
        outer = unpack_upper(np.asarray(fields[OUTER], dtype=np.float64).reshape(-1), sums.shape[1])
        return cls(counts, sums, outer)

    @property
    def present(self) -> list[int]:
        """The classes some leaf sent (count > 0)."""
        return [int(c) for c in np.flatnonzero(self.counts > 0)]

    @property
    def absent(self) -> list[int]:
        """The classes no leaf sent: calibration leaves their rows of the final layer as they are."""
        return [int(c) for c in np.flatnonzero(self.counts == 0)]

    def means(self) -> np.ndarray:
        """The pooled mean of each present class, [len(present), D]."""
        present = self.present
        means: np.ndarray = self.sums[present] / self.counts[present, None]
        return means

    def within_covariance(self) -> np.ndarray:
        """The pooled within-class (tied) covariance: ``(sum x x^T - sum_c s_c s_c^T / n_c) / (N - K)``, K the
        number of present classes (the unbiased estimate; N - K is at least 1)."""
        present = self.present
        sums, counts = self.sums[present], self.counts[present].astype(np.float64)
        scatter = self.outer - (sums.T / counts) @ sums
        covariance: np.ndarray = (scatter + scatter.T) / 2 / max(float(counts.sum()) - len(present), 1.0)
        return covariance

    def fields(self) -> dict[str, np.ndarray]:
        """As the fields one upload carries (to re-send, or to compare with another leaf's)."""
        return {COUNTS: self.counts.copy(), SUMS: self.sums.copy(), OUTER: pack_upper(self.outer)}

    def nbytes(self) -> int:
        """How many bytes of values one upload of these statistics carries (before the archive's framing)."""
        return sum(value.nbytes for value in self.fields().values())


__all__ = ["COUNTS", "SUMS", "OUTER", "FIELDS", "HeadStatistics", "head_statistics", "pack_upper", "unpack_upper"]
