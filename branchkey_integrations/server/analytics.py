"""How an analytics round combines its uploads, exactly, field by field (no I/O: the rules alone).

Each field is combined by one operation (:data:`~branchkey_integrations.core.analytics.FIELD_OPS`): a bundle
entry of the official client's ``save_analytics`` by its suffix (``_n``, ``_sum``, ``_sumsq``, ``_nan`` summed;
``_min`` the minimum; ``_max`` the maximum), any other field by the operation its branch configures
(``branchkey-local branch --field-op NAME=OP``; a configured operation wins over the suffix). Sums are exact where
they can be and refused where they cannot: integers and booleans in int64 (an overflow is refused, never wrapped),
floats in float64, complex in complex128; NaN or infinity in a summed, min or max field is refused, as is a sum that
leaves float64. ``must_match``: every leaf sends the identical value (same bytes), else the upload that differs is
refused naming the leaf whose value it was checked against. A round's field set is pinned by its first upload:
names, shapes and dtypes (as a learning round's layer layout is).

:class:`FieldCombination` checks an upload against the round so far *before* changing anything, so a refused
upload leaves the round as it was.

Example:
    >>> round_ = FieldCombination({"labels": "sum", "size": "must_match"})
    >>> round_.add("leaf_1", {"age_n": np.array([3]), "age_max": np.array([40.0]), "labels": np.array([1, 2]),
    ...                       "size": np.array([8, 8])})
    >>> round_.add("leaf_2", {"age_n": np.array([2]), "age_max": np.array([70.0]), "labels": np.array([0, 5]),
    ...                       "size": np.array([8, 8])})
    >>> {name: value.tolist() for name, value in round_.values.items()}
    {'age_n': [5], 'age_max': [70.0], 'labels': [1, 7], 'size': [8, 8]}
"""

from __future__ import annotations

import json
from typing import Mapping

import numpy as np

from ..core.analytics import FIELD_OPS, bundle_op
from ..core.errors import InvalidValueError
from ..core.payload_kinds import field_name_problem
from ..core.wire import LayerSpec

#: fields one analytics upload may hold, by default (``serve --max-fields``)
DEFAULT_MAX_FIELDS = 10_000
_INT64 = np.iinfo(np.int64)


def field_op(name: str, configured: Mapping[str, str]) -> str | None:
    """The operation ``name`` is combined by on a branch whose configured operations are ``configured``."""
    return configured.get(name) or bundle_op(name)


def check_field_ops(ops: Mapping[str, object]) -> dict[str, str]:
    """``ops`` (field name -> operation) once every operation is one of :data:`FIELD_OPS`.

    Raises:
        InvalidValueError: naming the field and the operations allowed.
    """
    checked: dict[str, str] = {}
    for name, op in ops.items():
        problem = field_name_problem(name) if isinstance(name, str) else "it is not a string"
        if problem is not None:
            raise InvalidValueError(f"Field name {str(name)[:80]!r}: {problem}.")
        if op not in FIELD_OPS:
            raise InvalidValueError(f"Field {name!r}: operation {str(op)[:40]!r} is not one of {', '.join(FIELD_OPS)}.")
        checked[name] = str(op)
    return checked


def fields_to_json(specs: Mapping[str, LayerSpec]) -> str:
    """A field layout (name -> shape and dtype) as the store keeps it."""
    return json.dumps({name: {"dtype": s.dtype.str, "shape": list(s.shape)} for name, s in specs.items()})


def fields_from_json(text: str) -> dict[str, LayerSpec]:
    return {name: LayerSpec(tuple(item["shape"]), np.dtype(item["dtype"])) for name, item in json.loads(text).items()}


def layout_problem(expected: Mapping[str, LayerSpec], received: Mapping[str, LayerSpec]) -> str | None:
    """The first difference between two field layouts, or None when they agree."""
    missing = [name for name in expected if name not in received]
    extra = [name for name in received if name not in expected]
    if missing or extra:
        parts = ([f"missing {', '.join(repr(n) for n in missing[:5])}"] if missing else []) + \
                ([f"unexpected {', '.join(repr(n) for n in extra[:5])}"] if extra else [])
        return "; ".join(parts)
    for name, spec in expected.items():
        if received[name] != spec:
            return f"field {name!r}: expected {spec}, received {received[name]}"
    return None


def check_upload_fields(fields: Mapping[str, np.ndarray], ops: Mapping[str, str], *, branch_id: str,
                        max_fields: int = DEFAULT_MAX_FIELDS) -> None:
    """What one upload must satisfy whatever else the round holds: at most ``max_fields`` fields, each with an
    operation, of a dtype its operation takes, and finite where it is summed or ordered.

    Raises:
        InvalidValueError: naming the field, and for a field with no operation the command that sets one.
    """
    if len(fields) > max_fields:
        raise InvalidValueError(f"Upload holds {len(fields)} fields; this server takes at most {max_fields} per upload "
                                "(serve --max-fields N).")
    for name, value in fields.items():
        op = field_op(name, ops)
        if op is None:
            raise InvalidValueError(
                f"Field {name!r} has no combining operation on branch {branch_id}: the server combines a field by "
                f"the operation its branch sets (sum, min, max or must_match). Set one with 'branchkey-local branch "
                f"--data-dir DIR --branch {branch_id} --field-op {name}=sum' (or PUT /admin/v1/branches/{branch_id}/"
                "field-ops), or send a raw column through save_analytics, which reduces it to combinable sums.")
        kind = value.dtype.kind
        if op == "sum" and kind not in "biufc" or op in ("min", "max") and kind not in "biuf":
            raise InvalidValueError(f"Field {name!r} has dtype {value.dtype}, which '{op}' cannot combine "
                                    f"({'numbers' if op == 'sum' else 'real numbers'} only); use must_match for it, "
                                    "or send numbers.")
        if op != "must_match" and kind in "fc" and not np.isfinite(value).all():
            bad = int(value.size - np.count_nonzero(np.isfinite(value)))
            raise InvalidValueError(f"Field {name!r} holds {bad} NaN or infinite value(s); a field combined by '{op}' "
                                    "must be finite (save_analytics omits NaNs and counts them in <column>_nan).")
        if op == "sum" and kind == "u" and value.size and int(value.max()) > _INT64.max:
            raise InvalidValueError(f"Field {name!r} holds a value over int64's range; sums are exact in int64.")


class FieldCombination:
    """The combination of one analytics round's uploads so far; :meth:`add` refuses what would spoil it.

    Args:
        ops: the branch's configured operations (field name -> operation); bundle entries need none.
    """

    def __init__(self, ops: Mapping[str, str]) -> None:
        self.ops = dict(ops)
        self.values: dict[str, np.ndarray] = {}
        self.layout: dict[str, LayerSpec] | None = None  # pinned by the first upload
        self.contributors: list[str] = []

    def combined(self, leaf: str, fields: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What the round would hold with ``leaf``'s ``fields`` added; nothing changes here.

        Raises:
            InvalidValueError: a field that cannot be combined (overflow, a must_match that differs, a layout that
                differs from the round's), naming the field and, for must_match, the leaf checked against.
        """
        received = {name: LayerSpec.of(value) for name, value in fields.items()}
        if self.layout is not None and (problem := layout_problem(self.layout, received)):
            raise InvalidValueError(
                f"Upload rejected: its fields do not match this analytics round's ({problem}); the round takes the "
                f"fields of {self.contributors[0]}'s upload. Every leaf of a round sends the same fields.")
        if not self.contributors:
            return {name: _start(value, field_op(name, self.ops)) for name, value in fields.items()}
        return {name: self._combine(name, self.values[name], value) for name, value in fields.items()}

    def add(self, leaf: str, fields: Mapping[str, np.ndarray]) -> None:
        """Combine ``leaf``'s ``fields`` into the round (checked first: a refusal changes nothing)."""
        values = self.combined(leaf, fields)
        if self.layout is None:
            self.layout = {name: LayerSpec.of(value) for name, value in fields.items()}
        self.values = values
        self.contributors.append(leaf)

    def _combine(self, name: str, so_far: np.ndarray, value: np.ndarray) -> np.ndarray:
        op = field_op(name, self.ops)
        if op == "min":
            return np.minimum(so_far, value)
        if op == "max":
            return np.maximum(so_far, value)
        if op == "must_match":
            if so_far.tobytes() != value.tobytes():
                raise InvalidValueError(
                    f"Field {name!r} (must_match) differs from the value {self.contributors[0]} sent this round "
                    f"({_show(so_far)}; received {_show(value)}). Every leaf must send the identical value.")
            return so_far
        return _sum(name, so_far, _start(value, "sum"))


def _start(value: np.ndarray, op: str | None) -> np.ndarray:
    """A field's first value as its operation accumulates it: a sum in int64, float64 or complex128."""
    if op != "sum":
        return value.copy()
    kind = value.dtype.kind
    return value.astype(np.int64 if kind in "biu" else np.complex128 if kind == "c" else np.float64)


def _sum(name: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.dtype == np.int64:
        with np.errstate(over="ignore"):
            total = a + b
        if ((a ^ total) & (b ^ total) < 0).any():  # both signs equal and the result's differs: wrapped
            raise InvalidValueError(f"Field {name!r}: the sum overflows int64 (the largest exact integer sum); "
                                    "send it as float64 if an approximate sum will do.")
        return total
    with np.errstate(over="ignore", invalid="ignore"):
        total = a + b
    if not np.isfinite(total).all():
        raise InvalidValueError(f"Field {name!r}: the sum overflows float64.")
    return total


def _show(value: np.ndarray) -> str:
    text = np.array2string(value.reshape(-1)[:8], threshold=8)
    return f"{value.dtype}{list(value.shape)} {text}"


__all__ = ["FieldCombination", "check_upload_fields", "check_field_ops", "field_op", "layout_problem",
           "fields_to_json", "fields_from_json", "DEFAULT_MAX_FIELDS"]
