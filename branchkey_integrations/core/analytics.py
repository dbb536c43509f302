"""Federated analytics' vocabulary, shared by the leaf and the server: the six-entry bundle of a column, the
operations a field is combined by, and the statistics derived exactly from a combined bundle.

The official 3.x client's ``save_analytics`` reduces a raw column ``age`` on the leaf to ``age_n``, ``age_sum``,
``age_sumsq``, ``age_min``, ``age_max`` and ``age_nan`` (raw values never leave the site); the platform combines
them by their suffix (counts and sums summed, ``_min`` the minimum, ``_max`` the maximum), and every other field by
the operation the branch configures for it (:data:`FIELD_OPS`). :func:`reduce_column` is that reduction on the
leaf (3.0.1's rules: numeric 1-D columns only, NaNs omitted and counted or refused, infinities and empty columns
refused; ``_n`` and ``_nan`` int64, the rest float64). From a combined bundle,
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
import warnings
from typing import Any, Mapping

import numpy as np

from .errors import AnalyticsError
from .payload_kinds import field_name_problem

#: the suffixes of a column's bundle, in the order the official client writes them
BUNDLE_SUFFIXES = ("n", "sum", "sumsq", "min", "max", "nan")
#: how each bundle suffix is combined across leaves (no configuration: the arithmetic decides)
BUNDLE_OPS = {"n": "sum", "sum": "sum", "sumsq": "sum", "min": "min", "max": "max", "nan": "sum"}
#: the operations a branch may configure for a field: summed, the minimum, the maximum, or the same on every leaf
FIELD_OPS = ("sum", "min", "max", "must_match")
#: what :func:`reduce_column` does with a NaN: drop and count it (with a ``UserWarning``), or refuse the column
NAN_POLICIES = ("omit", "raise")
#: the dtype kinds a raw column may have: bool, int, uint, float (a sum of squares means nothing for the others)
COLUMN_DTYPE_KINDS = "biuf"
#: the bundle entries that count values (int64); the others are float64
COUNT_SUFFIXES = ("n", "nan")


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


def check_nan_policy(nan_policy: object) -> str:
    """``nan_policy`` when it is one of :data:`NAN_POLICIES`, else ``ValueError`` listing them."""
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"Expected nan_policy in {NAN_POLICIES}. Received: nan_policy={nan_policy!r}")
    return str(nan_policy)


def reduce_column(name: str, values: object, nan_policy: str = "omit") -> dict[str, np.ndarray]:
    """The bundle of one raw column: ``{name}_n``, ``_sum``, ``_sumsq``, ``_min``, ``_max``, ``_nan``, each a
    one-element array (``_n`` and ``_nan`` int64, the others float64), in that order. The raw values stay here.

    Values are widened to float64 before squaring (booleans become 0.0 and 1.0). Under ``nan_policy="omit"`` NaNs
    are dropped, counted in ``_nan`` and said in a ``UserWarning``; under ``"raise"`` a NaN is an error.

    >>> bundle = reduce_column("age", [10, 20, 30])
    >>> bundle["age_n"], bundle["age_sum"], bundle["age_sumsq"], bundle["age_max"], bundle["age_nan"]
    (array([3]), array([60.]), array([1400.]), array([30.]), array([0]))

    Raises:
        AnalyticsError: the column is not numeric or not 1-D, is empty (or only NaNs), holds an infinity, or holds
            a NaN under ``nan_policy="raise"``.
        ValueError: ``nan_policy`` is not one of :data:`NAN_POLICIES`.
    """
    check_nan_policy(nan_policy)
    try:
        column = np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise AnalyticsError(f"Column {name!r} is not readable as an array: {exc}") from None
    if column.dtype.kind not in COLUMN_DTYPE_KINDS:
        raise AnalyticsError(f"Column {name!r} has dtype {column.dtype}, which is not numeric: its bundle is a count, "
                             "a sum and a sum of squares. Send a categorical or already-computed value with "
                             "save_fields instead.")
    if column.ndim != 1:
        raise AnalyticsError(f"Column {name!r} has shape {column.shape}; a column is 1-D, one value per record. Send "
                             "a vector such as a spacing with save_fields instead.")
    column = column.astype(np.float64, copy=False)
    if column.size == 0:
        raise AnalyticsError(f"Column {name!r} is empty: it has no minimum or maximum, and a placeholder would corrupt "
                             "the federation's. Leave the column out.")
    if np.isinf(column).any():
        raise AnalyticsError(f"Column {name!r} holds an infinite value, which would make the pooled variance NaN for "
                             "every leaf. Clean or clip the column first.")
    missing = np.isnan(column)
    nan_count = int(missing.sum())
    if nan_count:
        if nan_policy == "raise":
            raise AnalyticsError(f"Column {name!r} holds {nan_count} NaN value(s) and nan_policy='raise'. Drop or "
                                 "impute them, or pass nan_policy='omit' to summarise the values present.")
        warnings.warn(f"Column {name!r}: {nan_count} of {column.size} values are NaN and were omitted; its count is "
                      f"{column.size - nan_count}, and the mean and variance describe only the values present.",
                      UserWarning, stacklevel=3)
        column = column[~missing]
        if column.size == 0:
            raise AnalyticsError(f"Column {name!r} holds no value but NaN: there is nothing to summarise. Leave the "
                                 "column out.")
    reduced = {"n": column.size, "sum": column.sum(), "sumsq": np.square(column).sum(), "min": column.min(),
               "max": column.max(), "nan": nan_count}
    return {f"{name}_{suffix}": np.array([reduced[suffix]], dtype=np.int64 if suffix in COUNT_SUFFIXES else np.float64)
            for suffix in BUNDLE_SUFFIXES}


def reduce_columns(columns: Mapping[str, object], nan_policy: str = "omit") -> dict[str, np.ndarray]:
    """The bundles of every column of ``columns`` (name -> raw values), as one mapping of entries, in order.

    Raises:
        AnalyticsError: no columns, a column name that cannot be a field's (reserved, ``layer_<n>``, not a
            string), two columns whose entries share a name, or a column :func:`reduce_column` refuses.
        ValueError: ``nan_policy`` is not one of :data:`NAN_POLICIES`.
    """
    check_nan_policy(nan_policy)
    if not isinstance(columns, Mapping):
        raise AnalyticsError(f"Expected columns as a dict of name -> raw values. Received: {type(columns).__name__}")
    if not columns:
        raise AnalyticsError("No columns to summarise: pass at least one name -> raw values.")
    entries: dict[str, np.ndarray] = {}
    for name, values in columns.items():
        problem = field_name_problem(name) if isinstance(name, str) else "it is not a string"
        if problem is not None:
            raise AnalyticsError(f"Column name {str(name)[:80]!r}: {problem}.")
        for key, value in reduce_column(name, values, nan_policy).items():
            problem = field_name_problem(key)
            if key in entries or problem is not None:
                raise AnalyticsError(f"Column {name!r} gives the entry {key!r}, " + (
                    "which another column gave already: rename one of them." if problem is None else f"but {problem}."))
            entries[key] = value
    return entries


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


__all__ = ["BUNDLE_SUFFIXES", "BUNDLE_OPS", "FIELD_OPS", "NAN_POLICIES", "COLUMN_DTYPE_KINDS", "COUNT_SUFFIXES",
           "bundle_op", "bundle_columns", "check_nan_policy", "reduce_column", "reduce_columns", "column_statistics"]
