"""The fuzzer's ``federated_analytics`` part (used by test_fuzz.py): upload bodies right and wrong in every way
issue 24 names, and an acceptance check written here from the protocol's rules, independent of the server's code.

Bodies: well formed ones of one layout (a ``save_analytics`` bundle of column ``age`` and configured fields), and
hostile ones: a raw column without an operation, text under ``sum``, NaN or infinity in a summed or ordered field,
int64 overflow (alone, or with the round's other uploads), an unsigned value past int64, a float64 sum that
overflows, ``must_match`` values that differ, fewer or more fields or another dtype or shape than the round's,
``layer_3`` and ``weighting`` members, no kind key, a learning archive declaring the analytics kind, an unknown
kind, a bare scalar, a pickled member, a name with a slash, no fields at all, and truncated or bit-flipped archives.

:func:`analytics_well_formed` is the rule an accepted analytics upload must pass (zipfile and ``numpy.load``
without pickle, nothing of the server): the kind key says ``federated_analytics``; at least one field, none named
``layer_<n>`` or with a control character, a slash or a backslash; every field at least 1-D, of dtype kind
``b i u f c U S``, with an operation (the branch's, else a bundle suffix's), of a dtype its operation takes, finite
where it is summed or ordered; and, against the other leaves' uploads in the open round, the same names, shapes and
dtypes, identical ``must_match`` values, and exact sums within int64 (integers) or finite float64.
"""

from __future__ import annotations

import io
import re
import zipfile
from typing import Any

import numpy as np
from hypothesis import strategies as st

from branchkey_integrations.core import wire

KIND = "federated_analytics"
#: the watched branches' (and the scratch branch's) field operations, set once at set-up
FIELD_OPS = {"labels": "sum", "size": "must_match", "lowest": "min", "site": "must_match", "count": "sum"}
#: how a save_analytics bundle's entries combine, by suffix (issue 24)
SUFFIX_OPS = {"n": "sum", "sum": "sum", "sumsq": "sum", "nan": "sum", "min": "min", "max": "max"}
INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1
MAX_FIELDS = 10_000
_REFUSED_NAME = re.compile(r"[\x00-\x1f\x7f-\x9f/\\]")
_LAYER = re.compile(r"layer_[0-9]+")


def savez(**members: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **members)
    return buffer.getvalue()


@st.composite
def valid_fields(draw: st.DrawFn) -> dict[str, np.ndarray]:
    """One leaf's fields in the watched branches' layout, with drawn values."""
    column = np.array(draw(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=5)))
    # big values now and then: two leaves' sums of them overflow int64 (count) or float64 (age_sumsq)
    count = draw(st.integers(0, 10 ** 6) | st.sampled_from([2 ** 62, INT64_MAX, -2 ** 62]))
    sumsq = draw(st.sampled_from([float(np.square(column).sum()), 1.7e308]))
    return {"age_n": np.array([column.size], np.int64), "age_sum": np.array([column.sum()]),
            "age_sumsq": np.array([sumsq]), "age_min": np.array([column.min()]),
            "age_max": np.array([column.max()]), "age_nan": np.array([draw(st.integers(0, 3))], np.int64),
            "labels": np.array(draw(st.lists(st.integers(0, 1000), min_size=3, max_size=3)), np.int64),
            "size": np.array([8, 8], np.int64), "lowest": np.array([draw(st.floats(-1e3, 1e3))]),
            "site": np.array(["A"]), "count": np.array([count], np.int64)}


FIELD_CHANGES = ["raw", "string_sum", "nonfinite", "overflow", "uint", "huge_float", "mismatch", "fewer", "more",
                 "dtype", "shape"]
ARCHIVE_CHANGES = ["layer_name", "weighting", "no_kind", "learning_declares", "wrong_kind", "scalar", "pickle",
                   "bad_name", "empty", "truncated", "flipped"]


@st.composite
def analytics_archives(draw: st.DrawFn) -> bytes:
    """Analytics upload bodies: well formed ones (about a fifth), nearly right ones (their fields changed: twice
    as likely as each archive change) and wrong ones."""
    change = draw(st.sampled_from(["valid"] * 8 + FIELD_CHANGES * 2 + ARCHIVE_CHANGES))
    fields = draw(valid_fields())
    if change == "raw":  # a raw column sent as a field: no operation
        fields["age"] = np.array([31.0, 40.0])
    elif change == "string_sum":
        fields["labels"] = np.array(["a", "b", "c"])
    elif change == "nonfinite":
        fields[draw(st.sampled_from(["age_sum", "age_sumsq", "lowest", "age_max"]))] = np.array(
            [draw(st.sampled_from([np.nan, np.inf, -np.inf]))])
    elif change == "overflow":  # alone it may be fine: with the round's other uploads it overflows
        fields["count"] = np.array([draw(st.sampled_from([2 ** 62, INT64_MAX, INT64_MIN, -2 ** 62]))], np.int64)
    elif change == "uint":
        fields["count"] = np.array([draw(st.sampled_from([2 ** 63, 2 ** 64 - 1, 5]))], np.uint64)
    elif change == "huge_float":
        name, value = draw(st.sampled_from([("age_sumsq", 1.7e308), ("age_sumsq", 1.7e308), ("age_sum", -1.7e308)]))
        fields[name] = np.array([value])
    elif change == "mismatch":
        fields["size"] = np.array([8, draw(st.integers(0, 16))], np.int64)
    elif change == "fewer":
        del fields[draw(st.sampled_from(sorted(fields)))]
    elif change == "more":
        fields[draw(st.sampled_from(["extra_sum", "extra_max", "note", "count_n"]))] = np.array([1.0])
    elif change == "dtype":
        name = draw(st.sampled_from(["age_n", "labels", "lowest", "count"]))
        fields[name] = fields[name].astype(draw(st.sampled_from([np.float64, np.int32, np.uint8, np.float32])))
    elif change == "shape":
        fields["labels"] = np.arange(draw(st.integers(1, 5)), dtype=np.int64)
    if change == "valid" or change in FIELD_CHANGES:
        return wire.prepare_fields(fields).getvalue()
    kind = {wire.KIND_KEY: np.array(KIND)}
    if change == "layer_name":
        return savez(**fields, layer_3=np.ones(3), weighting=np.array([0.0]), **kind)
    if change == "weighting":  # written as 0.0 and read by nothing; any single number goes, anything else is refused
        bad = draw(st.sampled_from([[0.0], [1.0], [1.0, 2.0], "x", [np.nan]]))
        return savez(**fields, weighting=np.array(bad), **kind)
    if change == "no_kind":
        return savez(**fields, weighting=np.array([0.0]))
    if change == "learning_declares":
        return savez(layer_0=np.ones((2, 3), np.float32), layer_1=np.arange(3), weighting=np.array([1.0]), **kind)
    if change == "wrong_kind":
        return savez(**fields, **{wire.KIND_KEY: np.array(draw(st.sampled_from(["federated_other", "", "x" * 70])))})
    if change == "scalar":
        return savez(**{**fields, "count": np.array(5)}, **kind)
    if change == "pickle":
        return savez(**{**fields, "site": np.array([{"a": 1}], dtype=object)}, **kind)
    if change == "bad_name":
        return savez(**fields, **{draw(st.sampled_from(["a/b", "a\\b", "tab\there", "x" * 300])): np.ones(1)}, **kind)
    if change == "empty":
        return savez(weighting=np.array([0.0]), **kind)
    valid = wire.prepare_fields(fields).getvalue()
    if change == "truncated":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    position = draw(st.integers(0, len(valid) - 1))  # flipped
    return valid[:position] + bytes([valid[position] ^ (1 << draw(st.integers(0, 7)))]) + valid[position + 1:]


def read_members(content: bytes) -> dict[str, np.ndarray] | None:
    """The archive's members by name (``.npy`` removed), by our own reading; None if it cannot be read so."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            if archive.testzip() is not None:
                return None
            names = archive.namelist()
            if len(names) != len(set(names)) or not all(name.endswith(".npy") for name in names):
                return None
            return {name[:-4]: np.load(io.BytesIO(archive.read(name)), allow_pickle=False) for name in names}
    except Exception:  # anything our reader cannot take is not well formed
        return None


def declared_kind(members: dict[str, np.ndarray]) -> str | None:
    value = members.get(wire.KIND_KEY)
    if value is None or value.size != 1 or value.dtype.kind not in "US":
        return None
    return str(value.reshape(-1)[0])


def fields_of(members: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An analytics archive's fields: its members but the kind key and ``weighting`` (read by nothing)."""
    return {name: value for name, value in members.items() if name not in (wire.KIND_KEY, "weighting")}


def field_op(name: str, ops: dict[str, str]) -> str | None:
    column, _, suffix = name.rpartition("_")
    return ops.get(name) or (SUFFIX_OPS.get(suffix) if column else None)


def analytics_well_formed(content: bytes, ops: dict[str, str], others: list[dict[str, np.ndarray]]) -> bool:
    """An analytics upload the open round may count, given the branch's operations and the fields of the other
    leaves' uploads in that round (oldest first)."""
    members = read_members(content)
    if members is None or declared_kind(members) != KIND:
        return False
    weighting = members.get("weighting")  # read by nothing, but no field either: one number at most
    if weighting is not None and (weighting.size != 1 or weighting.dtype.kind not in "biuf"):
        return False
    fields = fields_of(members)
    if not fields or len(fields) > MAX_FIELDS:
        return False
    for name, value in fields.items():
        if _LAYER.fullmatch(name) or not 0 < len(name) <= 256 or _REFUSED_NAME.search(name):
            return False
        kind, op = value.dtype.kind, field_op(name, ops)
        if value.ndim == 0 or kind not in "biufcUS" or op is None:
            return False
        if op == "sum" and kind not in "biufc" or op in ("min", "max") and kind not in "biuf":
            return False
        if op != "must_match" and kind in "fc" and not np.isfinite(value).all():
            return False
        if op == "sum" and kind == "u" and value.size and int(value.max()) > INT64_MAX:
            return False
    if not others:  # the sole uploader of its round: any layout
        return True
    layout = {name: (value.shape, value.dtype) for name, value in others[0].items()}
    if {name: (value.shape, value.dtype) for name, value in fields.items()} != layout:
        return False
    for name, value in fields.items():
        op = field_op(name, ops)
        if op == "must_match" and value.tobytes() != others[0][name].tobytes():
            return False
        if op == "sum" and value.dtype.kind in "biu":  # exact, in Python integers
            total = sum((other[name].astype(object) for other in others), value.astype(object))
            if any(not INT64_MIN <= int(item) <= INT64_MAX for item in np.asarray(total).reshape(-1)):
                return False
        elif op == "sum":
            wide = np.complex128 if value.dtype.kind == "c" else np.float64
            with np.errstate(over="ignore", invalid="ignore"):
                total = sum((other[name].astype(wide) for other in others), np.zeros(value.shape, wide))
                total = total + value.astype(wide)
            if not np.isfinite(total).all():
                return False
    return True


__all__ = ["FIELD_OPS", "KIND", "analytics_archives", "analytics_well_formed", "read_members", "fields_of",
           "declared_kind", "valid_fields"]
