"""Federated analytics' vocabulary, shared by the leaf and the server: the six-entry bundle of a column, the
operations a field is combined by, and the statistics derived exactly from a combined bundle.

The official 3.x client's ``save_analytics`` reduces a raw column ``age`` on the leaf to ``age_n``, ``age_sum``,
``age_sumsq``, ``age_min``, ``age_max`` and ``age_nan`` (raw values never leave the site); the platform combines
them by their suffix (counts and sums summed, ``_min`` the minimum, ``_max`` the maximum), and every other field by
the operation the branch configures for it (:data:`FIELD_OPS`). From a combined bundle,
:func:`column_statistics` derives count, mean, variance (population: ``sumsq/n - mean^2``), std, min, max, range
and completeness ``n / (n + nan)``.

Example:
    >>> bundle_op("age_sumsq"), bundle_op("age_max"), bundle_op("histogram")
    ('sum', 'max', None)
    >>> stats = column_statistics({"age_n": [6], "age_sum": [300.0], "age_sumsq": [24600.0], "age_min": [10.0],
    ...                            "age_max": [90.0], "age_nan": [2]})["age"]
    >>> stats["mean"], stats["variance"], stats["range"], stats["completeness"]
    (50.0, 1600.0, 80.0, 0.75)
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

#: the suffixes of a column's bundle, in the order the official client writes them
BUNDLE_SUFFIXES = ("n", "sum", "sumsq", "min", "max", "nan")
#: how each bundle suffix is combined across leaves (no configuration: the arithmetic decides)
BUNDLE_OPS = {"n": "sum", "sum": "sum", "sumsq": "sum", "min": "min", "max": "max", "nan": "sum"}
#: the operations a branch may configure for a field: summed, the minimum, the maximum, or the same on every leaf
FIELD_OPS = ("sum", "min", "max", "must_match")


def bundle_op(name: str) -> str | None:
    """The operation a field named like a bundle entry (``<column>_<suffix>``) is combined by, else None."""
    column, _, suffix = name.rpartition("_")
    return BUNDLE_OPS.get(suffix) if column else None


def bundle_columns(names: object) -> list[str]:
    """The columns whose six bundle entries are all among ``names``, in order of first appearance.

    >>> bundle_columns(["age_n", "age_sum", "age_sumsq", "age_min", "age_max", "age_nan", "site"])
    ['age']
    """
    present = set(names)  # type: ignore[call-overload]
    columns: list[str] = []
    for name in names:  # type: ignore[attr-defined]
        column, _, suffix = name.rpartition("_")
        if suffix == BUNDLE_SUFFIXES[0] and column and column not in columns and \
                all(f"{column}_{s}" in present for s in BUNDLE_SUFFIXES):
            columns.append(column)
    return columns


def column_statistics(fields: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Per column with a complete bundle in ``fields``: count, sum, mean, variance, std, min, max, range, nan and
    completeness, in float64 (a column with no values has NaN for the statistics that need one).

    Variance is the population variance of the pooled values, ``sumsq / n - mean ** 2`` (floored at 0: rounding
    can leave a tiny negative where every value is equal).
    """
    out: dict[str, dict[str, float]] = {}
    for column in bundle_columns(list(fields)):
        value = {suffix: float(np.asarray(fields[f"{column}_{suffix}"], dtype=np.float64).reshape(-1)[0])
                 for suffix in BUNDLE_SUFFIXES}
        n, total, nan = value["n"], value["sum"], value["nan"]
        mean = total / n if n else math.nan
        variance = max(value["sumsq"] / n - mean * mean, 0.0) if n else math.nan
        out[column] = {
            "count": n, "sum": total, "mean": mean, "variance": variance, "std": math.sqrt(variance),
            "min": value["min"], "max": value["max"], "range": value["max"] - value["min"], "nan": nan,
            "completeness": n / (n + nan) if n + nan else math.nan,
        }
    return out


__all__ = ["BUNDLE_SUFFIXES", "BUNDLE_OPS", "FIELD_OPS", "bundle_op", "bundle_columns", "column_statistics"]
