"""Property-based fuzzing of every route the OpenAPI document describes, against a real in-process server.

Requests are drawn from the document itself (paths, methods, parameters, and bodies that follow the
documented schemas, or nearly: a field of the wrong kind, a required one left out) and mixed with hostile
variants: ids that are not ids, every kind of credentials, real WebSocket tickets and download signatures
used twice or spoilt, JSON that is not an object, bodies that are not JSON, and uploads that are wrong in
every way we know (random bytes, truncated or bit-flipped archives, other layouts, NaN, bad weightings,
pickled members, integrity headers that lie), and ``federated_analytics`` uploads right and wrong in every way
issue 24 names (fuzz_analytics.py). After every request:

- no answer is a 5xx, and every refusal (4xx) is ``{"error": text}``;
- a JSON success answer has a status the document lists for the operation and fits its schema;
- an upload is accepted (201) only if it is well formed by a check written here, independent of the
  server's code (zip CRCs, ``numpy.load`` without pickle, the round's layout, finite values, a finite
  weighting > 0, a JSON ``data`` part, honest integrity headers); an analytics upload only if it is well
  formed by the rules written in fuzz_analytics.py (its kind key, field names and dtypes, an operation per
  field, finite summed values, and against the round's other uploads: the same fields, identical must_match
  values, sums within int64 or float64);
- a refused request (4xx) leaves the watched branches exactly as they were: their rounds, the uploads
  that count, and their aggregates' rows and bytes, of both kinds.

Admin requests with the real token may change things, so they are aimed at a scratch tree and branch
(or ids that do not exist); the watched branches only ever see leaf calls, admin reads, and anonymous or
wrong admin calls. Leaves upload, but no round of either kind can complete: each watched branch has a leaf
that never uploads (``main``: three leaves, ``other``: two). The scratch branch has a combined analytics round
and an open one, for the analytics admin routes to act on.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import urllib.parse
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from branchkey_integrations.core import wire
from branchkey_integrations.core.protocol import (
    ADMIN_PREFIX,
    BLOB_PATH,
    DOWNLOAD_PATH,
    METRICS_PATH,
    UPLOAD_PATH,
    WS_PATH,
    WS_TICKET_PATH,
)
from branchkey_integrations.server import openapi as openapi_module
from branchkey_integrations.server.openapi import openapi_document

from ..conftest import wait_until
from ..inprocess import ServerThread
from .fuzz_analytics import FIELD_OPS, KIND, analytics_archives, analytics_well_formed, fields_of, read_members

pytestmark = pytest.mark.slow

DOCUMENT = openapi_document()
OPERATIONS = sorted((path, method) for path, item in DOCUMENT["paths"].items() for method in item)
STATIC = Path(openapi_module.__file__).parent / "static"
SPECS = [wire.LayerSpec((2, 3), np.dtype(np.float32)), wire.LayerSpec((3,), np.dtype(np.int64))]
#: requests per operation (30 unless named): ~40 operations run in ~30 s on two shared cores
EXAMPLES = {UPLOAD_PATH: 200, METRICS_PATH: 60, WS_PATH: 40, BLOB_PATH: 40,
            ADMIN_PREFIX + "/branches/{branch_id}/field-ops": 60,
            ADMIN_PREFIX + "/branches/{branch_id}/analytics/open/uploads/{leaf}": 60}
#: honest analytics uploads of real leaves (the round's combination reached, not only the door)
ANALYTICS_EXAMPLES = 200


def model(value: float = 1.0) -> list[np.ndarray]:
    return [np.full((2, 3), value, np.float32), np.arange(3, dtype=np.int64)]


# -- the server under test --------------------------------------------------------------------


@dataclass(repr=False)
class World:
    thread: ServerThread
    admin_token: str
    ids: dict[str, str]
    leaves: dict[str, dict[str, str]]

    @property
    def url(self) -> str:
        return self.thread.url

    def __repr__(self) -> str:  # Hypothesis prints its arguments: no tokens in the report
        return f"World({self.url})"

    def snapshot(self) -> Any:
        """Everything a refused request must not change on the watched branches (``main`` and ``other``)."""
        return [(self._branch_state(self.ids[name]), self._analytics_state(self.ids[name]))
                for name in ("main_branch", "other_branch")]

    def _analytics_state(self, branch: str) -> Any:
        store = self.thread.server.store
        rounds = store.analytics_history(branch)
        uploads = [(u["leaf_id"], u["id"], hashlib.sha256(u["path"].read_bytes()).hexdigest())
                   for r in rounds for u in store.analytics_uploads(branch, r["run_number"], r["round_index"])]
        aggregates = [(r["aggregate_id"], hashlib.sha256(store.file_path(store.analytics_file(r["aggregate_id"]))
                                                         .read_bytes()).hexdigest())
                      for r in rounds if r["aggregate_id"]]
        return [tuple(r.values()) for r in rounds], uploads, aggregates

    def open_scratch_analytics(self) -> None:
        """An upload of scratch_0 in the scratch branch's open analytics round (under the fuzzer's operations)."""
        branch = self.ids["scratch_branch"]
        _admin(self.url, self.admin_token, "POST", f"/admin/v1/branches/{branch}/run", {"run_status": "start"})
        _admin(self.url, self.admin_token, "PUT", f"/admin/v1/branches/{branch}/field-ops", {"field_ops": FIELD_OPS})
        _upload(self.url, self.leaves["scratch_0"], _fields(7.0))

    def round_fields(self, leaf_key: str) -> tuple[dict[str, str], list[dict[str, np.ndarray]]]:
        """The field operations of the leaf's branch and the fields of the other leaves' uploads in its open
        analytics round, oldest first (read with numpy, as the acceptance check reads the upload)."""
        leaf = self.leaves[leaf_key]
        store = self.thread.server.store
        branch = store.require_branch(leaf["branch_id"])
        current = store.open_analytics_round(branch.id, branch.run_number)
        uploads = store.analytics_uploads(branch.id, branch.run_number, current["round_index"]) if current else []
        others = [read_members(u["path"].read_bytes()) for u in uploads if u["leaf_id"] != leaf["id"]]
        return store.field_ops(branch.id), [fields_of(members) for members in others if members is not None]

    def _branch_state(self, branch: str) -> Any:
        store = self.thread.server.store
        rounds = [(r["run_number"], r["round_index"], r["status"], r["aggregate_id"]) for r in store.list_rounds(branch)]
        uploads = [(u["run_number"], u["round_index"], u["leaf_id"], u["file_id"], u["weighting"])
                   for u in store.list_uploads(branch)]
        aggregates = []
        for row in store.list_files(branch, "aggregate"):
            record = store.get_file(row["id"])
            aggregates.append((row["id"], row["sha256"], hashlib.sha256(store.file_path(record).read_bytes()).hexdigest()))
        return rounds, uploads, aggregates


def _admin(url: str, token: str, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    answer = requests.request(method, url + path, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert answer.status_code in (200, 201), answer.text
    return answer.json()["data"]


def _upload(url: str, leaf: dict[str, str], content: bytes) -> dict[str, Any]:
    answer = requests.post(url + "/api/v1/file/upload", files={"file": ("w.npz", content)},
                           headers={"Authorization": f"Bearer {leaf['id']}:{leaf['session_token']}"}, timeout=30)
    assert answer.status_code == 201, answer.text
    return answer.json()["data"]


def _fields(value: float) -> bytes:
    """A well formed analytics upload of the fuzzer's layout (fuzz_analytics.valid_fields)."""
    return wire.prepare_fields({
        "age_n": np.array([2]), "age_sum": np.array([2 * value]), "age_sumsq": np.array([2 * value * value]),
        "age_min": np.array([value]), "age_max": np.array([value]), "age_nan": np.array([0]),
        "labels": np.array([1, 2, 3]), "size": np.array([8, 8]), "lowest": np.array([value]), "site": np.array(["A"]),
        "count": np.array([1])}).getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    thread = ServerThread(tmp_path_factory.mktemp("fuzz") / "data")
    url, token = thread.url, thread.server.store.admin_token
    ids: dict[str, str] = {}
    leaves: dict[str, dict[str, str]] = {}
    for name, count in (("main", 3), ("other", 2), ("scratch", 2)):
        tree = _admin(url, token, "POST", "/admin/v1/trees", {"name": name})
        branch = _admin(url, token, "POST", f"/admin/v1/trees/{tree['id']}/branches", {"name": name})
        made = _admin(url, token, "POST", f"/admin/v1/branches/{branch['id']}/leaves", {"count": count})["leaves"]
        ids[f"{name}_tree"], ids[f"{name}_branch"] = tree["id"], branch["id"]
        for index, leaf in enumerate(made):
            leaves[f"{name}_{index}"] = leaf
        _admin(url, token, "PUT", f"/admin/v1/branches/{branch['id']}/field-ops", {"field_ops": FIELD_OPS})
    for name, count in (("main", 3), ("other", 2), ("scratch", 2)):  # analytics round 0 combined on each
        for index in range(count):
            _upload(url, leaves[f"{name}_{index}"], _fields(float(index)))
        ids[f"{name}_analytics_aggregate"] = wait_until(
            lambda: (thread.server.store.latest_analytics_aggregate(ids[f"{name}_branch"]) or {}).get("aggregation_id"),
            10, f"analytics round 0 of branch {name}")
    for name in ("main", "scratch"):  # analytics round 1: one upload (main_0's, scratch_0's)
        _upload(url, leaves[f"{name}_0"], _fields(5.0))
    for name, count in (("main", 3), ("other", 2)):  # round 0 aggregated: every later round has a fixed layout
        for index in range(count):
            _upload(url, leaves[f"{name}_{index}"], wire.encode(model(index + 1), float(index + 1)))
        store = thread.server.store
        branch_id = ids[f"{name}_branch"]
        aggregate = wait_for_aggregate(store, branch_id)
        ids[f"{name}_aggregate"] = aggregate
    _upload(url, leaves["main_0"], wire.encode(model(5), 2.0))  # round 1 of the watched branch: one of three
    ids["main_upload"] = thread.server.store.list_uploads(ids["main_branch"])[-1]["file_id"]
    yield World(thread, token, ids, leaves)
    thread.stop()


def wait_for_aggregate(store: Any, branch_id: str) -> str:
    def done() -> str | None:
        rounds = store.list_rounds(branch_id)
        return next((r["aggregate_id"] for r in rounds if r["status"] == "aggregated"), None)

    return wait_until(done, 10, f"round 0 of branch {branch_id} to aggregate")


# -- strategies ---------------------------------------------------------------------------------


def resolve(schema: Any) -> Any:
    """The schema with every local ``$ref`` inlined."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            return resolve(DOCUMENT["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]])
        return {key: resolve(value) for key, value in schema.items()}
    if isinstance(schema, list):
        return [resolve(item) for item in schema]
    return schema


JUNK_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
#: any text, lone surrogates included (JSON escapes them as \\ud800; no UTF-8 can hold one)
JSON_TEXT = st.text(st.characters(codec=None), max_size=40)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False) | JSON_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(JSON_TEXT, inner, max_size=4), max_leaves=12,
)


#: numbers as text: around SQLite's 64-bit limit, and past Python's 4300-digit limit for int()
SMALL_NUMBERS = (st.integers(-2**80, 2**80) | st.sampled_from([2**63 - 1, 2**63, 2**64])).map(str)
NUMBERS = SMALL_NUMBERS | st.just("9" * 4400)  # one per request: aiohttp refuses request lines over 8190 bytes

#: bodies Python's json module reads although they are not JSON (NaN, Infinity), or that overflow
LOOSE_JSON = [b'{"count": NaN}', b'{"round_deadline_s": Infinity}', b'{"min_leaves": 1e400}', b'{"name": "\\ud800"}',
              b'{"min_leaves": 99999999999999999999999}', b'{"count": -Infinity, "name_prefix": null}',
              b'{"run_status": ["start"]}', b'{"mode": "test", "data": NaN}', b'[{}]', b'"x"', b'{"a":' * 50, b'[' * 100_000]


def from_schema(schema: Any) -> st.SearchStrategy[Any]:
    """Values of the JSON Schema subset the document uses (type, enum, anyOf, properties and their bounds);
    each value and each field is sometimes replaced by arbitrary JSON or left out."""
    if isinstance(schema, dict) and schema.get("type") == "object":  # wild values go into its fields
        return _conforming(schema)
    return st.one_of(_conforming(schema), JSON_VALUES)


def _conforming(schema: Any) -> st.SearchStrategy[Any]:
    if not isinstance(schema, dict) or not schema:
        return JSON_VALUES
    if "anyOf" in schema:
        return st.one_of([_conforming(option) for option in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties", {})
        if not properties and isinstance(schema.get("additionalProperties"), dict):  # a map: field-ops, params
            keys = st.sampled_from(["labels", "age_sum", "x", "layer_2", "weighting", "eta"]) | JUNK_TEXT
            return st.dictionaries(keys, from_schema(schema["additionalProperties"]),
                                   min_size=schema.get("minProperties", 0), max_size=4)
        if not properties:
            return st.dictionaries(JUNK_TEXT, JSON_VALUES, max_size=4)
        required = set(schema.get("required", []))
        fields = {name: st.one_of(st.none().map(lambda _: _MISSING), from_schema(sub)) if name not in required
                  else from_schema(sub) for name, sub in properties.items()}
        drop = st.sets(st.sampled_from(sorted(properties)), max_size=1) if required else st.just(set())
        return st.tuples(st.fixed_dictionaries(fields), drop).map(
            lambda pair: {k: v for k, v in pair[0].items() if v is not _MISSING and k not in pair[1]})
    if kind == "string":
        return st.text(st.characters(codec=None), min_size=schema.get("minLength", 0), max_size=40)
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "number":
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        return st.floats(low, None, allow_nan=False, allow_infinity=False, exclude_min="exclusiveMinimum" in schema)
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {})), max_size=4)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return JSON_VALUES


_MISSING = object()


STATIC_NAMES = sorted(str(path.relative_to(STATIC)) for path in STATIC.rglob("*") if path.is_file())
HOSTILE_IDS = st.sampled_from(["..", ".", "%2e%2e", "a" * 300, "null", "0", "-1", "é", " ", "leaf_1", "../../etc/passwd"])


def id_strategy(world: World, name: str, admin_write: bool, leaf_key: str | None) -> st.SearchStrategy[str]:
    """Mostly real ids of the right kind (of the scratch tree and branch only, for an admin call that may
    change things), else hostile ones."""
    ids = world.ids
    if admin_write and name in ("tree_id", "branch_id"):  # the scratch one of the kind the route takes
        real = [ids["scratch_tree"] if name == "tree_id" else ids["scratch_branch"]]
    elif admin_write and name != "leaf":
        real = [ids["scratch_tree"], ids["scratch_branch"]]
    elif name == "branch_id":
        real = [ids["main_branch"], ids["other_branch"], ids["scratch_branch"]]
        if leaf_key is not None:
            real += [world.leaves[leaf_key]["branch_id"]] * 3
    elif name == "tree_id":
        real = [ids["main_tree"], ids["other_tree"], ids["scratch_tree"]]
    elif name == "file_id":
        real = [ids["main_aggregate"], ids["other_aggregate"], ids["main_upload"], ids["main_analytics_aggregate"],
                ids["scratch_analytics_aggregate"]]
    elif name == "leaf":
        real = [world.leaves["scratch_0"]["id"], world.leaves["scratch_0"]["name"]]  # its upload is in the round
    elif name == "name":
        real = STATIC_NAMES
    else:
        real = list(ids.values())
    return st.one_of(st.sampled_from(real), st.sampled_from(real), HOSTILE_IDS, JUNK_TEXT.filter(bool),
                     RAW_IDS.map(Raw))


class Raw(str):
    """A path segment sent as it is, not quoted: percent escapes of bytes that are no UTF-8, or a NUL."""


RAW_IDS = st.sampled_from(["%ED%A0%80", "%FF", "%00", "a%2Fb", "%2e%2e", "%C0%AF", "x%20y", "%"])


@st.composite
def archives(draw: st.DrawFn) -> bytes:
    """Upload bodies: right ones, nearly right ones and wrong ones; of either payload kind."""
    if draw(st.integers(0, 9)) < 4:
        return draw(analytics_archives())
    kind = draw(st.sampled_from(["valid"] * 5 + ["random", "truncated", "flipped", "flipped", "layout", "nonfinite",
                                                 "weighting", "pickle", "extra", "empty", "no_weighting"]))
    values = draw(st.floats(-1e6, 1e6, allow_nan=False, width=32))
    valid = wire.encode(model(values), draw(st.floats(1e-3, 1e6)))
    if kind == "valid":
        return valid
    if kind == "random":
        return draw(st.binary(max_size=600))
    if kind == "truncated":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    if kind == "flipped":
        position = draw(st.integers(0, len(valid) - 1))
        return valid[:position] + bytes([valid[position] ^ (1 << draw(st.integers(0, 7)))]) + valid[position + 1:]
    if kind == "layout":
        shape = draw(st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple))
        dtype = draw(st.sampled_from([np.float16, np.float32, np.float64, np.int32, np.int64, np.complex64, np.bool_]))
        layers = draw(st.lists(st.just(np.zeros(shape, dtype)), min_size=1, max_size=3))
        return wire.encode(layers, 1.0)
    if kind == "nonfinite":
        layers = model()
        layers[0][draw(st.integers(0, 1)), draw(st.integers(0, 2))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        return savez(layer_0=layers[0], layer_1=layers[1], weighting=np.array([1.0]))
    if kind == "weighting":
        bad = draw(st.sampled_from([0.0, -1.0, np.nan, np.inf, [1.0, 2.0], "one"]))
        return savez(layer_0=model()[0], layer_1=model()[1], weighting=np.array(bad))
    if kind == "pickle":
        return savez(layer_0=np.array([{"a": 1}], dtype=object), layer_1=model()[1], weighting=np.array([1.0]))
    if kind == "extra":
        return savez(layer_0=model()[0], layer_1=model()[1], layer_3=model()[1], weighting=np.array([1.0]))
    if kind == "no_weighting":
        return savez(layer_0=model()[0], layer_1=model()[1])
    return b""


def savez(**members: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **members)
    return buffer.getvalue()


def well_formed(content: bytes) -> bool:
    """An upload the round may count, by our own reading (zipfile + numpy, nothing of the server)."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            if archive.testzip() is not None:
                return False
            names = archive.namelist()
            expected = {f"layer_{i}.npy" for i in range(len(SPECS))} | {"weighting.npy"}
            optional = {f"{wire.KIND_KEY}.npy"}
            if not expected <= set(names) or not set(names) <= expected | optional or len(names) != len(set(names)):
                return False
            arrays = {name[:-4]: np.load(io.BytesIO(archive.read(name)), allow_pickle=False) for name in names}
    except Exception:  # anything our reader cannot take is not well formed
        return False
    if wire.KIND_KEY in arrays and str(arrays[wire.KIND_KEY].reshape(-1)[0]) != wire.KIND_FEDERATED_LEARNING:
        return False
    weighting = arrays["weighting"]
    if weighting.size != 1 or weighting.dtype.kind not in "iuf" or not np.isfinite(weighting).all() or weighting.item() <= 0:
        return False
    for index, spec in enumerate(SPECS):
        layer = arrays[f"layer_{index}"]
        if layer.shape != spec.shape or layer.dtype != spec.dtype or not np.isfinite(layer).all():
            return False
    return True


@dataclass
class Call:
    method: str
    url: str
    headers: dict[str, str]
    kwargs: dict[str, Any]
    upload: tuple[bytes, bool] | None = None  # (file content, whether the rest of the request is honest)
    leaf_key: str | None = None  # whose credentials it carries (an upload's acceptance check reads its round)
    real_query: tuple[str, str] | None = None  # ("ticket" | "signed", how to spoil it): filled in when sent


LEAVES = ["main_0", "main_1", "other_0"]


def credentials(world: World, draw: st.DrawFn, path: str) -> tuple[dict[str, str], str | None]:
    """Half the time the right kind for the route (so the handler itself is reached), else anything;
    with the key of the leaf whose credentials they are, if any."""
    right = "admin" if path.startswith(ADMIN_PREFIX) else "leaf"
    who = draw(st.sampled_from([right] * 6 + ["none", "garbage", "leaf", "other_leaf", "admin", "wrong_admin"]))
    if who == "leaf":
        key = draw(st.sampled_from(LEAVES))
        leaf = world.leaves[key]
        return {"Authorization": f"Bearer {leaf['id']}:{leaf['session_token']}"}, key
    if who == "other_leaf":  # a real leaf id with another leaf's token
        return {"Authorization": f"Bearer {world.leaves['main_0']['id']}:{world.leaves['other_0']['session_token']}"}, None
    if who == "admin":
        return {"Authorization": f"Bearer {world.admin_token}"}, None
    if who == "wrong_admin":
        return {"Authorization": "Bearer " + world.admin_token[::-1]}, None
    if who == "garbage":
        return {"Authorization": draw(st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=60)
                                      | st.sampled_from(["Bearer :", "Bearer x:", "Bearer :y", "Bearer a:b:c", "Basic x"]))}, None
    return {}, None


@st.composite
def calls(draw: st.DrawFn, world: World, path: str, method: str) -> Call:
    operation = DOCUMENT["paths"][path][method]
    admin_write = path.startswith(ADMIN_PREFIX) and method != "get"
    headers, leaf_key = credentials(world, draw, path)
    concrete = path
    for parameter in operation.get("parameters", []):
        if parameter["in"] == "path":
            value = draw(id_strategy(world, parameter["name"], admin_write, leaf_key))
            segment = value if isinstance(value, Raw) else urllib.parse.quote(
                value, safe="/" if parameter["name"] == "name" else "")
            concrete = concrete.replace("{" + parameter["name"] + "}", segment)
    query_names = [p["name"] for p in operation.get("parameters", []) if p["in"] == "query" and p.get("required")]
    real_query = None
    if query_names and draw(st.booleans()):  # a real ticket or signature, used as is or spoilt
        kind = "ticket" if "ticket" in query_names else "signed"
        real_query = (kind, draw(st.sampled_from(["as_is", "other_request", "twice", "expired", "tampered", "other_file"])))
    query = {name: draw(JUNK_TEXT | (NUMBERS if index == 0 else SMALL_NUMBERS))
             for index, name in enumerate(query_names)}
    for parameter in operation.get("parameters", []):  # optional ones: absent, a number of any size, or junk
        if parameter["in"] == "query" and not parameter.get("required") and draw(st.booleans()):
            query[parameter["name"]] = draw((SMALL_NUMBERS if query else NUMBERS) | JUNK_TEXT)
    url = world.url + concrete + ("?" + urllib.parse.urlencode(query) if query and not real_query else "")
    kwargs: dict[str, Any] = {}
    content = operation.get("requestBody", {}).get("content", {})
    if "multipart/form-data" in content:
        upload = draw(upload_calls(world, url, headers))
        upload.leaf_key = leaf_key
        return upload
    if "application/json" in content:
        schema = resolve(content["application/json"]["schema"])
        bodies = [from_schema(schema), JSON_VALUES]
        if "mode" in schema.get("properties", {}):
            bodies += [metrics_bodies(world, leaf_key or "main_0")] * 2
        body = draw(st.one_of(bodies))
        if draw(st.integers(0, 9)) == 0:  # not JSON at all, or what Python's json takes beyond JSON
            kwargs["data"] = draw(st.binary(max_size=100) | st.sampled_from(LOOSE_JSON))
        else:
            kwargs["json"] = body
    return Call(method, url, headers, kwargs, real_query=real_query)


def fill_query(world: World, call: Call) -> str:
    """The URL of ``call`` with a real ticket or download signature in its query, spoilt as drawn."""
    kind, spoil = call.real_query  # type: ignore[misc]
    leaf = world.leaves["main_0"]
    auth = {"Authorization": f"Bearer {leaf['id']}:{leaf['session_token']}"}
    if kind == "ticket":
        ticket = requests.post(world.url + WS_TICKET_PATH, headers=auth, timeout=10).json()["data"]
        query = {"ticket": ticket["ticket_id"], "request_id": ticket["request_id"]}
        if spoil == "other_request":
            query["request_id"] = query["request_id"][::-1]
        elif spoil == "twice":  # spend it first
            requests.get(world.url + WS_PATH, params=query, timeout=10)
        return world.url + WS_PATH + "?" + urllib.parse.urlencode(query)
    signed = requests.get(world.url + DOWNLOAD_PATH.format(file_id=world.ids["main_aggregate"]), headers=auth,
                          timeout=10).json()["data"]["download_url"]
    parts = urllib.parse.urlsplit(signed)
    query = dict(urllib.parse.parse_qsl(parts.query))
    route = parts.path
    if spoil == "expired":
        query["expires"] = "1"
    elif spoil == "tampered":
        query["signature"] = query["signature"][:-1] + ("0" if query["signature"][-1] != "0" else "1")
    elif spoil == "other_file":
        route = BLOB_PATH.format(file_id=world.ids["other_aggregate"])
    elif spoil == "other_request":
        query["expires"] = str(int(query["expires"]) + 1)
    return world.url + route + "?" + urllib.parse.urlencode(query)


@st.composite
def metrics_bodies(draw: st.DrawFn, world: World, leaf_key: str) -> dict[str, Any]:
    """Metrics that get past the identity check, so the rest of the handler is reached."""
    leaf = world.leaves[leaf_key]
    return {"mode": draw(st.sampled_from(["test", "train", "non-federated", "nope"])), "leaf_id": leaf["id"],
            "branch_id": leaf["branch_id"], "tree_id": leaf["tree_id"], "data": draw(JSON_VALUES),
            "aggregation_id": draw(st.sampled_from([None, world.ids["main_aggregate"], world.ids["other_aggregate"]])
                                   | JSON_VALUES)}


@st.composite
def upload_calls(draw: st.DrawFn, world: World, url: str, headers: dict[str, str]) -> Call:
    content = draw(archives())
    honest = True
    data = draw(st.sampled_from(["object", "object", "none", "junk", "list"]))
    fields: dict[str, Any] = {"file": ("w.npz", content)}
    if data == "object":
        fields["data"] = (None, json.dumps({"leaf_name": "x", "metadata": draw(JSON_VALUES)}))
    elif data == "junk":
        text = draw(JUNK_TEXT)
        fields["data"] = (None, text)
        honest = _is_json_object(text)
    elif data == "list":
        fields["data"] = (None, "[1, 2]")
        honest = False
    integrity = draw(st.sampled_from(["none", "none", "right", "right", "wrong_size", "wrong_digest", "junk"]))
    extra = dict(headers)
    digest = "sha256=" + base64.b64encode(hashlib.sha256(content).digest()).decode()
    if integrity == "right":
        extra.update({"x-bk-file-size": str(len(content)), "x-bk-file-digest": digest})
    elif integrity == "wrong_size":
        extra["x-bk-file-size"] = str(len(content) + draw(st.integers(1, 1000)))
        honest = False
    elif integrity == "wrong_digest":
        extra["x-bk-file-digest"] = "sha256=" + "A" * 43 + "="
        honest = False
    elif integrity == "junk":
        name = draw(st.sampled_from(["x-bk-file-size", "x-bk-file-digest"]))
        extra[name] = draw(st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=30) | NUMBERS)
        honest = honest and extra[name] in (str(len(content)), digest)
    if draw(st.integers(0, 7)) == 0:  # not multipart at all
        return Call("post", url, extra, {"data": content}, (content, False))
    return Call("post", url, extra, {"files": fields}, (content, honest))


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


# -- the property ---------------------------------------------------------------------------------


def check_documented(path: str, method: str, status: int, body: Any, where: str) -> None:
    """A success answer has a status the document lists for the operation, and fits its schema."""
    response = DOCUMENT["paths"][path][method]["responses"].get(str(status))
    assert response is not None, f"{where} answered {status}, which the OpenAPI document does not list"
    schema = response.get("content", {}).get("application/json", {}).get("schema")
    if schema is not None:
        try:
            jsonschema.validate(body, {"allOf": [schema], "components": DOCUMENT["components"]})
        except jsonschema.ValidationError as exc:
            raise AssertionError(f"{where} answered what its OpenAPI schema does not allow: {exc.message}") from None


#: BRANCHKEY_FUZZ_SCALE=10 runs ten times as many requests (a deeper search, on demand)
SCALE = float(os.environ.get("BRANCHKEY_FUZZ_SCALE", "1"))


@pytest.mark.parametrize(("path", "method"), OPERATIONS, ids=[f"{m.upper()} {p}" for p, m in OPERATIONS])
def test_no_route_fails_accepts_a_malformed_upload_or_changes_the_round_when_it_refuses(world, path, method) -> None:
    seen: set[int] = set()

    if "/analytics/open/" in path:  # the scratch branch's open analytics round, for the drop and reset to act on
        world.open_scratch_analytics()

    @settings(max_examples=int(EXAMPLES.get(path, 30) * SCALE), deadline=None, database=None, derandomize=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(call=calls(world, path, method))
    def check(call: Call) -> None:
        url = fill_query(world, call) if call.real_query else call.url
        before = world.snapshot()
        round_fields = world.round_fields(call.leaf_key) if call.upload is not None and call.leaf_key else None
        answer = requests.request(call.method, url, headers=call.headers, timeout=30, allow_redirects=False,
                                  stream=True, **call.kwargs)
        where = f"{call.method.upper()} {call.url[len(world.url):][:120]}"
        seen.add(answer.status_code)
        world.admin_token = world.thread.server.store.admin_token  # POST /admin/v1/admin-token/rotate changes it
        if answer.headers.get("Content-Type", "").startswith("text/event-stream"):
            answer.close()  # an endless stream: its status and headers are the answer
        assert answer.status_code < 500, f"{where} answered {answer.status_code}: {answer.text[:300]}"
        if answer.status_code >= 400:  # every refusal says why, in the one error shape
            assert answer.headers.get("Content-Type", "").startswith("application/json"), f"{where}: {answer.text[:200]}"
            error = answer.json()
            assert set(error) == {"error"} and isinstance(error["error"], str) and error["error"], f"{where}: {error}"
        if answer.status_code < 300 and answer.headers.get("Content-Type", "").startswith("application/json"):
            check_documented(path, method, answer.status_code, answer.json(), where)
        if call.upload is not None and answer.status_code == 201:
            content, honest = call.upload
            accepted = answer.json()["data"]
            if accepted["kind"] == KIND:
                assert round_fields is not None, f"{where}: an upload without a leaf's credentials was accepted"
                assert honest and analytics_well_formed(content, *round_fields), \
                    f"{where} accepted a malformed analytics upload: {answer.text[:300]}"
            else:
                assert honest and well_formed(content), f"{where} accepted a malformed upload: {answer.text[:300]}"
                assert accepted["round_index"] >= 1
        if answer.status_code >= 400:
            assert world.snapshot() == before, f"{where} was refused ({answer.status_code}) yet changed the round"

    check()
    assert seen - {401}, f"every {method.upper()} {path} request was refused at the door; the fuzzer reached no handler"
    assert_no_round_completed(world)


def assert_no_round_completed(world: World) -> None:
    store = world.thread.server.store
    for name in ("main", "other"):  # no round was completed, and round 0's aggregate is the one made at set-up
        rounds = store.list_rounds(world.ids[f"{name}_branch"])
        assert [r["status"] for r in rounds] == ["aggregated", "open"], (name, rounds)
        assert rounds[0]["aggregate_id"] == world.ids[f"{name}_aggregate"]
        analytics = store.analytics_history(world.ids[f"{name}_branch"])[::-1]  # oldest first
        assert [r["status"] for r in analytics] in (["aggregated"], ["aggregated", "open"]), (name, analytics)
        assert analytics[0]["aggregate_id"] == world.ids[f"{name}_analytics_aggregate"]


def test_analytics_uploads_are_accepted_only_well_formed_and_a_refusal_changes_nothing(world) -> None:
    """Honest requests of the watched branches' leaves carrying analytics bodies right and wrong
    (fuzz_analytics.py): two leaves of ``main`` share a round (its layout, must_match values and sums meet each
    other's), ``other_0`` is its round's sole uploader (it may change its layout)."""
    outcomes: dict[str, int] = {"accepted": 0, "refused": 0}

    @settings(max_examples=int(ANALYTICS_EXAMPLES * SCALE), deadline=None, database=None, derandomize=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(content=analytics_archives(), leaf_key=st.sampled_from(LEAVES), declared=st.sampled_from([KIND, None]))
    def check(content: bytes, leaf_key: str, declared: str | None) -> None:
        leaf = world.leaves[leaf_key]
        before, (ops, others) = world.snapshot(), world.round_fields(leaf_key)
        data = {"leaf_name": leaf["name"], "metadata": "{}"} | ({"kind": declared} if declared else {})
        answer = requests.post(world.url + UPLOAD_PATH, files={"file": ("a.npz", content), "data": (None, json.dumps(data))},
                               headers={"Authorization": f"Bearer {leaf['id']}:{leaf['session_token']}"}, timeout=30)
        assert answer.status_code < 500, answer.text[:300]
        if answer.status_code == 201:
            outcomes["accepted"] += 1
            if answer.json()["data"]["kind"] == KIND:
                assert analytics_well_formed(content, ops, others), f"accepted a malformed analytics upload: {answer.text}"
            else:
                assert well_formed(content), f"accepted a malformed upload: {answer.text}"
        else:
            outcomes["refused"] += 1
            assert answer.status_code in (400, 413) and set(answer.json()) == {"error"}, answer.text[:300]
            assert world.snapshot() == before, f"a refused analytics upload changed the branch: {answer.text[:300]}"

    check()
    assert outcomes["accepted"] and outcomes["refused"], outcomes
    assert_no_round_completed(world)
