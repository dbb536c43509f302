"""What a leaf gets back from a federated analytics round: :class:`AnalyticsResult`.

An analytics aggregate is an archive of the combined fields under their own names (the bundles of
``save_analytics``, summed, minimised and maximised exactly; every other field by its configured operation).
This module turns one into a value: the combined entries as they came, the statistics of each column derived
from its bundle in float64 (:func:`~.analytics.column_statistics`: count, sum, mean, population variance, std,
min, max, range, NaNs omitted and completeness ``n / (n + nan)``), the run and round it closed and how many
leaves contributed, when the platform said; and a readable table. Why a value of its own: a model aggregate is
loaded into a model and checked against it; an analytics one is read, printed and compared, never loaded, and
an archive of the other kind is refused here by its declared kind.

Example:
    >>> fields = {"age_n": [3], "age_sum": [30.0], "age_sumsq": [300.0], "age_min": [10.0], "age_max": [10.0],
    ...           "age_nan": [0]}
    >>> site_a = AnalyticsResult.of(fields)
    >>> site_a.statistics["age"].mean, site_a.statistics["age"].variance
    (10.0, 0.0)
    >>> pooled = AnalyticsResult.of({**fields, "age_n": [6], "age_sum": [300.0], "age_sumsq": [24600.0],
    ...                              "age_max": [90.0]})
    >>> pooled.statistics["age"].mean, pooled.statistics["age"].variance, pooled.statistics["age"].std
    (50.0, 1600.0, 40.0)
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields as dataclass_fields
from types import MappingProxyType
from typing import Mapping

import numpy as np

from .analytics import BUNDLE_SUFFIXES, column_statistics
from .archive import Archive
from .errors import AnalyticsError
from .protocol import KIND_FEDERATED_ANALYTICS


@dataclass(frozen=True)
class ColumnStatistics:
    """One column's statistics over every leaf's values, derived exactly from its combined bundle (float64).

    ``variance`` is the population variance ``sumsq / n - mean ** 2``; ``nan`` how many values the leaves omitted
    as NaN; ``completeness`` ``count / (count + nan)``. A column without values has NaN where one is needed.
    """

    count: float
    sum: float
    mean: float
    variance: float
    std: float
    min: float
    max: float
    range: float
    nan: float
    completeness: float


#: the columns of :meth:`AnalyticsResult.table`, in order
TABLE_COLUMNS = ("count", "mean", "variance", "std", "min", "max", "range", "completeness")


@dataclass(frozen=True)
class AnalyticsResult:
    """A federated analytics aggregate, read.

    Attributes:
        fields: every combined entry by name, as the platform combined it (read-only arrays).
        statistics: per column of ``save_analytics`` (a complete bundle among ``fields``), its
            :class:`ColumnStatistics`.
        aggregation_id: the aggregate's id, when it was downloaded.
        run_number, round_index: the analytics round it closed, when the platform said.
        contributors: how many leaves' uploads it combines, when the platform said.
    """

    fields: Mapping[str, np.ndarray]
    statistics: Mapping[str, ColumnStatistics]
    aggregation_id: str | None = None
    run_number: int | None = None
    round_index: int | None = None
    contributors: int | None = None
    contributor_names: tuple[str, ...] = field(default=())

    @classmethod
    def of(cls, fields: Mapping[str, object], *, aggregation_id: str | None = None, run_number: int | None = None,
           round_index: int | None = None, contributors: int | None = None,
           contributor_names: tuple[str, ...] = ()) -> AnalyticsResult:
        """The result of combined ``fields`` (name -> array), with the statistics derived from their bundles."""
        frozen = {}
        for name, value in fields.items():
            array = np.array(value, copy=True)
            array.setflags(write=False)
            frozen[name] = array
        statistics = {column: ColumnStatistics(**values) for column, values in column_statistics(frozen).items()}
        if contributors is None and contributor_names:
            contributors = len(contributor_names)
        return cls(MappingProxyType(frozen), MappingProxyType(statistics), aggregation_id, run_number, round_index,
                   contributors, tuple(contributor_names))

    @classmethod
    def from_archive(cls, archive: Archive, **known: object) -> AnalyticsResult:
        """The result of a decoded aggregate; ``known`` as :meth:`of` (its id, run, round, contributors).

        Raises:
            AnalyticsError: the archive does not declare the ``federated_analytics`` kind (a model aggregate,
                say: its id was not an analytics round's).
        """
        if archive.kind != KIND_FEDERATED_ANALYTICS:
            raise AnalyticsError(
                f"Aggregate {known.get('aggregation_id') or ''} is a {archive.kind!r} archive ({len(archive.layers)} "
                f"layers), not a {KIND_FEDERATED_ANALYTICS!r} one: pass the id of an analytics round's aggregate "
                "(Federation.analytics_round returns its result; a model aggregate is loaded with file_download).")
        return cls.of(archive.fields, **known)  # type: ignore[arg-type]

    @property
    def columns(self) -> list[str]:
        """The columns with statistics, in the order their entries came."""
        return list(self.statistics)

    @property
    def other_fields(self) -> list[str]:
        """The entries that belong to no column's bundle (``save_fields``' values), in order."""
        bundled = {f"{column}_{suffix}" for column in self.statistics for suffix in BUNDLE_SUFFIXES}
        return [name for name in self.fields if name not in bundled]

    def table(self, precision: int = 6) -> str:
        """The statistics as a text table, one row per column (numbers with ``precision`` significant digits)."""
        rows = [["column", *TABLE_COLUMNS]]
        for column, stats in self.statistics.items():
            rows.append([column, *(format(getattr(stats, name), f".{precision}g") for name in TABLE_COLUMNS)])
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                                   for i, (cell, width) in enumerate(zip(row, widths))).rstrip() for row in rows)

    def __str__(self) -> str:
        where = "" if self.run_number is None or self.round_index is None else \
            f" of run {self.run_number} analytics round {self.round_index + 1}"  # from 1, as status and the dashboard
        who = "" if self.contributors is None else f", {self.contributors} leaves"
        lines = [f"Federated analytics{where}{who}" + (f" (aggregate {self.aggregation_id})"
                                                      if self.aggregation_id else "")]
        if self.statistics:
            lines.append(self.table())
        for name in self.other_fields:
            text = np.array2string(self.fields[name], threshold=12, max_line_width=100)
            lines.append(f"{name} = {text}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, dict[str, float]]:
        """``{column: {statistic: value}}``, plain floats (for JSON, or a DataFrame)."""
        return {column: {f.name: getattr(stats, f.name) for f in dataclass_fields(stats)}
                for column, stats in self.statistics.items()}


__all__ = ["AnalyticsResult", "ColumnStatistics", "TABLE_COLUMNS"]
