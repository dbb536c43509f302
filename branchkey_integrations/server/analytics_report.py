"""A branch's latest analytics result as people read it: ``branchkey-local status`` and the dashboard.

:func:`analytics_result` reads the branch's latest combined analytics round (which run and round, its aggregate,
how many leaves contributed), the branch's field operations, and the combined archive itself: per column with a
complete ``save_analytics`` bundle, the statistics :func:`~branchkey_integrations.core.analytics.column_statistics`
derives (count, mean, variance, std, min, max, range, nan, completeness); every other field with its operation and
its first values. Every leaf of a round sends the same fields (the round pins them), so each column had every
contributor's values. A result whose file retention removed (``serve --keep-rounds``) keeps its round's facts and
says so in ``note``. The answer is plain JSON: a statistic without a value (a column of no values) is None, never
NaN. :func:`result_lines` is the text table of ``status``.

Example:
    >>> result = {"run_number": 1, "round_index": 0, "contributors": 3, "aggregation_id": "a1", "note": None,
    ...           "field_ops": {"labels": "sum"}, "fields": [], "columns": {"age": {
    ...               "count": 6, "mean": 40.0, "std": 33.5, "min": 10.0, "max": 90.0, "range": 80.0,
    ...               "completeness": 0.857142, "leaves": 3}}}
    >>> print("\\n".join(result_lines(result)))
    latest analytics result: run 1 analytics round 1, 3 leaves, aggregate a1
    column  count  mean  std   min  max  range  completeness  leaves
    age     6      40    33.5  10   90   80     0.8571        3
    field operations: labels=sum
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from ..core import wire
from ..core.analytics import BUNDLE_SUFFIXES, bundle_columns, column_statistics
from ..core.errors import ArchiveError
from ..core.protocol import KIND_FEDERATED_ANALYTICS
from .analytics import field_op
from .store import Store

logger = logging.getLogger(__name__)

#: values of a field shown (the rest are counted, not listed)
PREVIEW_VALUES = 16
#: the columns of the text table, in order
TABLE_COLUMNS = ("count", "mean", "std", "min", "max", "range", "completeness", "leaves")


def analytics_result(store: Store, branch_id: str) -> dict[str, Any] | None:
    """The branch's latest combined analytics round, or None when it has none; blocking.

    Keys: ``kind``, ``run_number``, ``round_index``, ``aggregation_id``, ``aggregated_at``, ``contributors``,
    ``field_ops`` (the branch's configured operations, now), ``columns`` (column -> its statistics and
    ``leaves``), ``fields`` (each other field: ``name``, ``op``, ``dtype``, ``shape``, ``values``, ``truncated``)
    and ``note`` (why there are no columns or fields: the file was removed or cannot be read; else None).

    Raises:
        RecordNotFoundError: no such branch.
    """
    with store.reading():
        store.require_branch(branch_id)
        latest = store.latest_analytics_aggregate(branch_id)
        ops = store.field_ops(branch_id)
        record = store.analytics_file(latest["aggregation_id"]) if latest is not None else None
    if latest is None:
        return None
    result: dict[str, Any] = {"kind": KIND_FEDERATED_ANALYTICS, **latest, "field_ops": ops, "columns": {},
                              "fields": [], "note": None}
    if record is None or record.removed_at:
        when = f" at {record.removed_at}" if record is not None else ""
        result["note"] = (f"the combined file of this round was removed by retention{when}; its statistics are gone "
                          "(serve --keep-rounds N keeps more rounds; 0 keeps all)")
        return result
    try:
        archive = wire.decode(store.file_path(record))
    except FileNotFoundError:
        result["note"] = f"the combined file of this round ({record.path}) is missing from the data directory"
        return result
    except (ArchiveError, OSError) as exc:
        logger.warning("analytics aggregate %s of branch %s cannot be read: %s", record.id, branch_id, exc)
        result["note"] = f"the combined file of this round cannot be read: {exc}"
        return result
    fields = archive.fields
    contributors = latest["contributors"]
    result["columns"] = {column: {key: _number(value) for key, value in stats.items()} | {"leaves": contributors}
                         for column, stats in column_statistics(fields).items()}
    in_bundles = {f"{column}_{suffix}" for column in bundle_columns(list(fields)) for suffix in BUNDLE_SUFFIXES}
    result["fields"] = [_field(name, value, field_op(name, ops)) for name, value in fields.items()
                        if name not in in_bundles]
    return result


def _field(name: str, value: np.ndarray, op: str | None) -> dict[str, Any]:
    flat = value.reshape(-1)
    return {"name": name, "op": op, "dtype": value.dtype.str, "shape": list(value.shape),
            "values": [_plain(item) for item in flat[:PREVIEW_VALUES].tolist()], "truncated": flat.size > PREVIEW_VALUES}


def _number(value: float) -> float | int | None:
    """A statistic as JSON takes it: None for NaN, an int where it is one (a count)."""
    if not math.isfinite(value):
        return None
    return int(value) if value.is_integer() and abs(value) < 2 ** 53 else value


def _plain(item: Any) -> Any:
    """One value of a field as JSON takes it (a non-finite float or a complex number as text)."""
    if isinstance(item, bytes):
        return item.decode("utf-8", "backslashreplace")
    if isinstance(item, complex) or isinstance(item, float) and not math.isfinite(item):
        return str(item)
    return item


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 1e6 else f"{value:.6g}"
    return str(value)


def result_lines(result: dict[str, Any] | None, *, head: bool = True) -> list[str]:
    """``status``'s text of :func:`analytics_result`: a head line (unless ``head`` is false: the round view's
    lines already say which round it is), a table of the columns, the other fields, the branch's field operations."""
    if result is None:
        return []
    lines = [f"latest analytics result: run {result['run_number']} analytics round {result['round_index'] + 1}, "
             f"{result['contributors']} leaves, aggregate {result['aggregation_id']}"] if head else []
    if result["note"]:
        lines.append(f"  ({result['note']})")
    if result["columns"]:
        rows = [["column", *TABLE_COLUMNS]] + [[column, *(_show(stats[key]) for key in TABLE_COLUMNS)]
                                               for column, stats in result["columns"].items()]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    for item in result["fields"]:
        shown = ", ".join(_show(value) for value in item["values"]) + (", ..." if item["truncated"] else "")
        lines.append(f"field {item['name']} ({item['op'] or 'no operation'}, {item['dtype']}{item['shape']}): "
                     f"[{shown}]")
    return lines + field_ops_lines(result["field_ops"])


def field_ops_lines(ops: dict[str, str]) -> list[str]:
    """The branch's field operations in one line (none: no line)."""
    return [f"field operations: {', '.join(f'{name}={op}' for name, op in ops.items())}"] if ops else []


__all__ = ["analytics_result", "result_lines", "field_ops_lines", "PREVIEW_VALUES", "TABLE_COLUMNS"]
