"""The OpenAPI 3.1 description of branchkey-local's HTTP API: every leaf route and every admin route.

:func:`openapi_document` builds the document from the path constants of
:mod:`branchkey_integrations.core.protocol`, so a path is spelled once; the server serves it without
authentication at ``GET`` :data:`~branchkey_integrations.core.protocol.OPENAPI_PATH`. A test checks it
against the app's router (every route documented, every documented route served, same methods) and a
property-based fuzzer draws requests from it, so the document cannot drift from the handlers unnoticed.

Conventions the document spells out: every answer is ``{"data": ...}`` or ``{"error": text}``; leaf
routes take ``Authorization: Bearer {leaf_id}:{session_token}``, admin routes
``Bearer {admin_token}``; the signed blob URL and the WebSocket need no header (a signature or a
one-use ticket instead).

Why one module of this size: it is one document, data more than code; its schemas and the paths that name
them by ``$ref`` are checked whole, against the router, by the tests.
"""

from __future__ import annotations

import copy
import functools
import math
import sys
from typing import Any

from aiohttp import web

from .. import __version__
from ..core.analytics import FIELD_OPS
from ..core.payload_kinds import FIELD_NAME_REFUSED, MAX_FIELD_NAME, RESERVED_FIELD_NAMES
from ..core.protocol import (
    ADMIN_PREFIX,
    LAYER_PATTERN,
    PAYLOAD_KINDS,
    BLOB_PATH,
    BRANCH_CONFIG_PATH,
    DOWNLOAD_PATH,
    FILE_DIGEST_HEADER,
    IDEMPOTENCY_KEY_HEADER,
    IDEMPOTENCY_KEY_PATTERN,
    FILE_ID_PATTERN,
    FILE_SIZE_HEADER,
    METRIC_MODES,
    METRICS_PATH,
    OPENAPI_PATH,
    ROUND_PATH,
    RUN_PATH,
    RUN_STATUSES,
    UPLOAD_PATH,
    WS_PATH,
    WS_TICKET_PATH,
)
from .codec_policy import advertisable
from .events import KINDS
from .state import MAX_METRICS_BYTES, MAX_METRICS_PAGE, MAX_METRICS_PER_ROUND, METRICS_PAGE
from .store import MAX_MODEL_BYTES
from .strategies import CATALOGUE, DEFAULT_STRATEGY, STRATEGIES, Param

Schema = dict[str, Any]

# -- schemas ------------------------------------------------------------------------------------

_STR: Schema = {"type": "string"}
_INT: Schema = {"type": "integer", "minimum": 0}
_TIME: Schema = {"type": "string", "format": "date-time"}
_NAME: Schema = {"type": "string", "pattern": r"\S", "description": "not blank"}
_PARAMS: Schema = {"type": "object", "additionalProperties": {"type": "number"},
                   "description": "the strategy's parameters; those not given take their defaults"}


#: schemas of parameters by name (path, query and header alike); any other is a plain string
_ID: Schema = {"type": "string", "format": "uuid", "description": "an id the server made"}
_SEGMENT: Schema = {"type": "string", "pattern": r"^(?!\.\.?$)[^/\\]+$",
                    "description": "one path segment: no '/' or '\\', not '.' or '..'"}
PARAMETERS: dict[str, Schema] = {
    "branch_id": _ID, "tree_id": _ID,
    "file_id": {"type": "string", "pattern": f"^{FILE_ID_PATTERN.pattern}$", "not": {"pattern": r"\.\."},
                "description": "a plain token (letters, digits, '.', '_', '-'; never '..'), such as a UUID"},
    "leaf": {**_SEGMENT, "description": "the leaf's id or name"},
    "name": {**_SEGMENT, "description": "a file of the page, such as dashboard.js (and the vendor/ files, which "
                                        "this one-segment schema leaves out)"},
    "run": {"type": "integer", "minimum": 0, "maximum": 10**18 - 1, "description": "a run number (default: the latest)"},
    "limit": {"type": "integer", "minimum": 1, "maximum": MAX_METRICS_PAGE, "description": "items per page"},
    "after": {"type": "integer", "minimum": 0, "maximum": 10**18 - 1, "description": "the previous page's next"},
    "latest": {"type": "integer", "minimum": 1, "maximum": 1000, "description": "the latest N entries instead"},
    "brief": {"enum": ["0", "1"], "description": "1: the leaves counted (uploaded_count), not named"},
    "codec": {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,31}$",
              "description": "a codec the branch advertises (else, or none: the aggregate as stored)"},
    FILE_SIZE_HEADER: {"type": "integer", "minimum": 0, "maximum": 10**18 - 1,
                       "description": "the bytes of part 'file' (3.x clients)"},
    FILE_DIGEST_HEADER: {"type": "string", "pattern": "^sha256=[A-Za-z0-9+/]{43}=$",
                         "description": "sha256=<base64 of the SHA-256 of part 'file'> (3.x clients)"},
    IDEMPOTENCY_KEY_HEADER: {"type": "string", "pattern": f"^{IDEMPOTENCY_KEY_PATTERN.pattern}$",
                             "description": "one key per upload, the same on its retries: a retry of an upload "
                                            "already counted is answered with that upload's 201 (branchkey-local)"},
}


def _obj(required: dict[str, Schema], optional: dict[str, Schema] | None = None, *, extra: bool = True) -> Schema:
    schema: Schema = {"type": "object", "properties": {**required, **(optional or {})}, "required": list(required)}
    if not extra:
        schema["additionalProperties"] = False
    return schema


def _null(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _one_strategy(schema: Schema, *, default: str | None = None) -> Schema:
    """``schema`` whose strategy_params are those of its strategy (``default`` where the strategy is left
    out), each in the catalogue's range: the catalogue is the one source of names and ranges."""
    def params(name: str) -> Schema:
        return _null({"type": "object", "additionalProperties": False,
                      "properties": {key: _param_range(param) for key, param in CATALOGUE[name].items()}})

    choices = [{"properties": {"strategy": {"const": name}, "strategy_params": params(name)}, "required": ["strategy"]}
               for name in sorted(CATALOGUE)]
    if default is not None:
        choices.append({"not": {"required": ["strategy"]}, "properties": {"strategy_params": params(default)}})
    return {**schema, "oneOf": choices}


def _param_range(param: Param) -> Schema:
    schema: Schema = {"type": "number", "description": f"{param.meaning} (default {param.default:g})",
                      "minimum" if param.low_inclusive else "exclusiveMinimum": param.low}
    if math.isinf(param.high):
        schema["maximum"] = sys.float_info.max  # any finite number
    else:
        schema["exclusiveMaximum"] = param.high
    return schema

#: a field's name: 1-256 characters, no control character, '/' or '\\', not reserved, not a layer's
_FIELD_NAME: Schema = {"type": "string", "allOf": [
    {"pattern": "^[^" + FIELD_NAME_REFUSED.pattern[1:-1] + "]{1,%d}$" % MAX_FIELD_NAME},
    {"not": {"pattern": "^" + LAYER_PATTERN.pattern + "$"}}, {"not": {"enum": sorted(RESERVED_FIELD_NAMES)}}]}
_KIND: Schema = {"enum": list(PAYLOAD_KINDS), "description": "the payload kind (federated_learning: a model)"}
_MODEL_BYTES = _null({"type": "integer", "minimum": 1, "maximum": MAX_MODEL_BYTES,
                      "description": "bytes an upload may inflate to; null: learned from the branch's first aggregate"})


def schemas() -> dict[str, Schema]:
    """The document's schemas; the strategies' names and parameters are those registered now."""
    strategy: Schema = {"enum": sorted(CATALOGUE), "description": "the branch's aggregation (docs: Strategies)"}
    return {
        "Error": _obj({"error": _STR}),
        "RunDetails": _obj({"run_status": {"enum": list(RUN_STATUSES)}, "run_number": _INT}),
        "UploadAccepted": _obj({"file_id": _STR, "run_number": _INT, "round_index": _INT, "kind": _KIND}),
        "LatestAggregate": _obj({"aggregation_id": _STR, "run_number": _INT, "round_index": _INT}, {
            "strategy": _null(strategy),
            "strategy_note": _null({**_STR, "description": "why not the branch's strategy, or its state lost"})}),
        "Refusal": _obj({"leaf": _STR, "reason": _STR, "at": _TIME}),
        "RoundProgress": _obj({
            "run_status": {"enum": list(RUN_STATUSES)}, "run_number": _INT, "round_index": _null(_INT),
            "required": _INT, "opened_at": _null(_TIME),
            "deadline_at": _null(_TIME), "latest_aggregate": _null(_ref("LatestAggregate")),
            "strategy": strategy, "strategy_params": _PARAMS, "kind": _KIND,
            "analytics": _null(_ref("AnalyticsProgress")),
        }, {"uploaded": {"type": "array", "items": _STR}, "missing": {"type": "array", "items": _STR},
            "refused": {"type": "array", "items": _ref("Refusal")}, "uploaded_count": {**_INT, "description": "brief=1"}}),
        "AnalyticsProgress": _obj({
            "kind": _KIND, "run_number": _INT, "round_index": _null({**_INT, "description": "the open analytics round"}),
            "required": _INT,
            "opened_at": _null(_TIME), "deadline_at": _null(_TIME), "latest_aggregate": _null(_obj({
                "aggregation_id": _STR, "run_number": _INT, "round_index": _INT, "contributors": _INT,
                "aggregated_at": _TIME}))}, {"uploaded": {"type": "array", "items": _STR},
                                             "missing": {"type": "array", "items": _STR}, "uploaded_count": _INT}),
        "FieldOps": {"type": "object", "additionalProperties": {"enum": list(FIELD_OPS)},
                     "description": "how analytics rounds combine each field (bundle entries need none)"},
        "FieldOpsRequest": _obj({"field_ops": {"type": "object", "minProperties": 1, "propertyNames": _FIELD_NAME,
                                               "additionalProperties": _null({"enum": list(FIELD_OPS)}),
                                               "description": "field name -> operation; null removes it"}}),
        "Codecs": {"type": "array", "items": {"enum": advertisable()}, "uniqueItems": True,
                   "description": "codecs the branch's uploads may be encoded with besides plain NPZ; absent or "
                                  "empty: plain NPZ only"},
        "DownloadUrl": _obj({"download_url": {"type": "string", "format": "uri"}}),
        "MetricsRequest": _obj(
            {"mode": {"enum": list(METRIC_MODES)}, "leaf_id": _STR, "branch_id": _STR, "tree_id": _STR,
             "data": {"description": "the metrics as JSON text (or a JSON object or array)",
                      "anyOf": [{**_STR, "contentMediaType": "application/json"}, {"type": "object"}, {"type": "array"}]}},
            {"aggregation_id": _null(_STR)},
        ),
        "Created": _obj({"id": _STR}),
        "BranchConfig": _obj({
            "branch": _obj({"id": _STR, "name": _STR, "tree_id": _STR}),
            "service": _obj({"algorithm": strategy, "config": {**_obj({
                "min_leaves": _null(_INT), "round_deadline_s": _null({"type": "number"})}),
                "description": "min_leaves, round_deadline_s and the strategy's parameters (eta, beta_1, ...)"},
                "field_ops": _ref("FieldOps")}, {"codecs": _ref("Codecs"), "delta_uploads": {
                    "type": "boolean", "description": "true (with codecs): uploads may be the difference from the "
                                                      "branch's latest aggregate (part data's delta_base)"}}),
            "model_config": {"type": "object"}, "created_at": _TIME, "updated_at": _TIME,
        }),
        "Ticket": _obj({"ticket_id": _STR, "request_id": _STR, "expires_at": _TIME}),
        "Tree": _obj({"id": _STR, "name": _STR, "owner_id": _STR, "created_at": _TIME}),
        "Branch": _obj({
            "id": _STR, "tree_id": _STR, "name": _STR, "min_leaves": _null(_INT),
            "round_deadline_s": _null({"type": "number"}), "algorithm": strategy, "strategy_params": _PARAMS,
            "run_status": {"enum": list(RUN_STATUSES)}, "run_number": _INT, "created_at": _TIME, "updated_at": _TIME,
            "max_model_bytes": _null(_INT),
        }),
        "Leaf": _obj({"id": _STR, "name": _STR, "owner_id": _STR, "tree_id": _STR, "branch_id": _STR}),
        "LeafCredentials": _obj({"id": _STR, "name": _STR, "session_token": _STR, "owner_id": _STR, "tree_id": _STR,
                                 "branch_id": _STR}),
        "TreeRequest": _obj({}, {"name": _NAME, "owner_id": _null(_NAME)}),
        "BranchRequest": _one_strategy(_obj({}, {
            "name": _NAME,
            "min_leaves": _null({"type": "integer", "minimum": 1, "maximum": 1_000_000, "description": "null: every leaf"}),
            "round_deadline_s": _null({"type": "number", "exclusiveMinimum": 0, "description": "null: no deadline"}),
            "strategy": strategy, "strategy_params": _null(_PARAMS), "max_model_bytes": _MODEL_BYTES,
        }), default=DEFAULT_STRATEGY),
        "StrategyRequest": _one_strategy(_obj({"strategy": strategy}, {"strategy_params": _null(_PARAMS)})),
        "MaxModelBytesRequest": _obj({"max_model_bytes": _MODEL_BYTES}),
        "LeavesRequest": _obj({}, {"count": {"type": "integer", "minimum": 1, "maximum": 10000},
                                   "name_prefix": _NAME}),
        "RunRequest": _obj({"run_status": {"enum": list(RUN_STATUSES)}}),
        "RunState": _obj({"branch_id": _STR, "run_status": {"enum": list(RUN_STATUSES)}, "run_number": _INT}),
        "DroppedUploads": _obj({"run_number": _INT, "round_index": _INT, "dropped": {"type": "array", "items": _STR}}),
    }


def _list_of(key: str, item: Schema) -> Schema:
    return _obj({key: {"type": "array", "items": item}})


# -- operations -------------------------------------------------------------------------------

_ERRORS = {
    400: "malformed request (the text names the problem and the fix)", 401: "missing or wrong credentials",
    403: "not this caller's branch or file", 404: "no such record", 409: "the run or round does not take it now",
    410: "removed by the server's retention (serve --keep-rounds, --keep-uploads)", 413: "larger than the server accepts",
    429: "past a limit per leaf (connections at once, metrics reports per round)",
}


def _operation(summary: str, *, tag: str, ok: tuple[int, Schema | None], security: str | None,
               errors: tuple[int, ...] = (400, 401), body: Schema | None = None, multipart: bool = False,
               params: tuple[str, ...] = (), query: tuple[str, ...] = (), optional_query: tuple[str, ...] = (),
               headers: tuple[str, ...] = (), body_required: bool = True,
               description: str | None = None, content_type: str = "application/json", wrapped: bool = True) -> Schema:
    status, data = ok
    answer: Schema = {"description": "success"}
    if data is not None:
        schema = _obj({"data": data}) if wrapped else data
        answer["content"] = {content_type: {"schema": schema}}
    operation: Schema = {
        "summary": summary, "tags": [tag], "operationId": _operation_id(summary),
        "responses": {str(status): answer, **{str(code): {"$ref": f"#/components/responses/E{code}"} for code in errors}},
        "security": [{security: []}] if security else [],
    }
    if description:
        operation["description"] = description
    parameters = [_parameter(name, "path", True) for name in params]
    parameters += [_parameter(name, "query", True) for name in query]
    parameters += [_parameter(name, "query", False) for name in optional_query]
    parameters += [_parameter(name, "header", False) for name in headers]
    if parameters:
        operation["parameters"] = parameters
    if body is not None:  # a body whose every field is optional may be left out
        operation["requestBody"] = {"required": body_required, "content": {
            "multipart/form-data" if multipart else "application/json": {"schema": body}}}
    return operation


def _parameter(name: str, where: str, required: bool) -> Schema:
    return {"name": name, "in": where, "required": required, "schema": PARAMETERS.get(name, _STR)}


def _operation_id(summary: str) -> str:
    words = "".join(c if c.isalnum() else " " for c in summary).split()
    return words[0].lower() + "".join(w.capitalize() for w in words[1:])


def _leaf_paths() -> dict[str, dict[str, Schema]]:
    leaf = functools.partial(_operation, tag="leaf", security="leafBearer")
    upload_body = _obj(
        {"file": {"type": "string", "format": "binary",
                  "description": "NPZ archive: layer_0..n-1 and weighting; in a scaffold branch also control_0..n-1 "
                                 "(SCAFFOLD's control update; optional there, refused elsewhere)"}},
        {"data": {"type": "string", "description": 'JSON text {"leaf_name": ..., "metadata": ...}; branchkey-local: '
                                                   '"delta_base": an aggregation id, when the layers are the '
                                                   "difference from it (float32 layers as uint32 XOR bits or float32 "
                                                   "w - base; others whole)"}},
    )
    return {
        RUN_PATH: {"get": leaf("Run details", ok=(200, _ref("RunDetails")), errors=(400, 401, 403, 404),
                               params=("branch_id",))},
        UPLOAD_PATH: {"post": leaf(
            "Upload weights", ok=(201, _ref("UploadAccepted")), errors=(400, 401, 404, 409, 413),
            body=upload_body, multipart=True, headers=(FILE_SIZE_HEADER, FILE_DIGEST_HEADER, IDEMPOTENCY_KEY_HEADER),
            description="Counted in the branch's open round; run_number and round_index (branchkey-local) name it. "
                        "A refused body (400, 413) is shown to the branch's leaves by the round route. A delta upload "
                        "whose delta_base is not the branch's latest aggregate is refused with 409 naming both ids "
                        "(send the full weights instead).")},
        DOWNLOAD_PATH: {"get": leaf("Download URL", ok=(200, _ref("DownloadUrl")), errors=(400, 401, 403, 404, 410),
                                    params=("file_id",), optional_query=("codec",),
                                    description="codec (branchkey-local): an aggregate encoded with a codec the "
                                                "branch advertises, the same bytes for every leaf that asks")},
        BLOB_PATH: {"get": _operation(
            "Download blob", tag="leaf", security=None, ok=(200, {"type": "string", "format": "binary"}), wrapped=False,
            errors=(400, 403, 404, 410), params=("file_id",), query=("expires", "signature"), optional_query=("codec",),
            content_type="application/octet-stream", description="The signed, expiring URL a download answers.")},
        METRICS_PATH: {"post": leaf(
            "Send metrics", ok=(201, _ref("Created")), errors=(400, 401, 403, 404, 413, 429),
            body=_ref("MetricsRequest"),
            description=f"A report names an aggregate of the leaf's branch (404 otherwise) or none (then it counts in "
                        f"the branch's latest round); at most {MAX_METRICS_BYTES} bytes (413), at most "
                        f"{MAX_METRICS_PER_ROUND} reports per leaf and round (429).")},
        BRANCH_CONFIG_PATH: {"get": leaf("Branch config", ok=(200, _ref("BranchConfig")), errors=(400, 401, 403, 404),
                                         params=("branch_id",))},
        WS_TICKET_PATH: {"post": leaf("WebSocket ticket", ok=(200, _ref("Ticket")))},
        WS_PATH: {"get": _operation(
            "WebSocket", tag="leaf", security=None, ok=(101, None), errors=(400, 401), query=("ticket", "request_id"),
            description="Upgrades to a WebSocket that carries aggregation_status and run_status messages.")},
        ROUND_PATH: {"get": leaf(
            "Round progress", ok=(200, _ref("RoundProgress")), errors=(400, 401, 403, 404), params=("branch_id",),
            optional_query=("brief",),
            description="branchkey-local: the open round's uploaded, missing and refused leaves (by name; with "
                        "brief=1 only how many uploaded) and the branch's latest aggregate; a leaf of the branch "
                        "only.")},
        OPENAPI_PATH: {"get": _operation("OpenAPI document", tag="meta", security=None, ok=(200, {"type": "object"}),
                                         errors=(), wrapped=False, description="This document.")},
    }


def _admin_paths() -> dict[str, dict[str, Schema]]:
    admin = functools.partial(_operation, tag="admin", security="adminBearer")
    trees, branches = ADMIN_PREFIX + "/trees", ADMIN_PREFIX + "/branches"
    branch = branches + "/{branch_id}"
    found = (400, 401, 404)

    def listing(key: str, what: str) -> Schema:
        return admin(f"List {what}", ok=(200, _list_of(key, {"type": "object"})), errors=found, params=("branch_id",))

    return {
        trees: {"post": admin("Create tree", ok=(201, _ref("Tree")), body=_ref("TreeRequest"), body_required=False),
                "get": admin("List trees", ok=(200, _list_of("trees", _ref("Tree"))), errors=(401,))},
        trees + "/{tree_id}/broker": {"delete": admin(
            "Remove tree broker", ok=(200, _obj({"tree_id": _STR, "amqp": {"type": "boolean"}, "leaves": _INT})),
            errors=(401, 404, 502), params=("tree_id",),
            description="Deletes what the server made for the tree in RabbitMQ; the tree stays.")},
        trees + "/{tree_id}/branches": {"post": admin("Create branch", ok=(201, _ref("Branch")), errors=found,
                                                      params=("tree_id",), body=_ref("BranchRequest"),
                                                      body_required=False)},
        branches: {"get": admin("List branches", ok=(200, _list_of("branches", _ref("Branch"))), errors=(401,))},
        branch: {"get": admin("Get branch", ok=(200, {"allOf": [_ref("Branch"), _obj({
            "leaves": {"type": "array", "items": _ref("Leaf")}, "connected_websockets": _INT,
            "field_ops": _ref("FieldOps"), "codecs": _ref("Codecs")})]}),
            errors=found, params=("branch_id",))},
        branch + "/leaves": {
            "post": admin("Create leaves", ok=(201, _list_of("leaves", _ref("LeafCredentials"))), errors=found,
                          params=("branch_id",), body=_ref("LeavesRequest"), body_required=False),
            "get": admin("List leaves", ok=(200, _list_of("leaves", _ref("Leaf"))), errors=found, params=("branch_id",)),
        },
        branch + "/run": {"post": admin("Set run status", ok=(200, _ref("RunState")), errors=found,
                                        params=("branch_id",), body=_ref("RunRequest"))},
        branch + "/strategy": {"put": admin(
            "Set strategy", ok=(200, _ref("Branch")), errors=(400, 401, 404, 409), params=("branch_id",),
            body=_ref("StrategyRequest"),
            description="Changes the branch's strategy between rounds (409 while the open round holds uploads, "
                        "naming them); the server-optimizer state starts afresh.")},
        branch + "/max-model-bytes": {"put": admin(
            "Set max model bytes", ok=(200, _ref("Branch")), errors=found, params=("branch_id",),
            body=_ref("MaxModelBytesRequest"),
            description="How many bytes an upload to the branch may inflate to (its zip directory's sizes, checked "
                        "before anything is inflated: 413 past it); null learns it from the branch's first aggregate "
                        "(twice its size + 16 MiB).")},
        branch + "/rounds": {"get": listing("rounds", "rounds")},
        branch + "/rounds/open/uploads/{leaf}": {"delete": admin(
            "Drop upload", ok=(200, _ref("DroppedUploads")), errors=found, params=("branch_id", "leaf"),
            body=_obj({}, {"note": _null(_STR)}), body_required=False,
            description="Drops one leaf's upload (leaf id or name) from the open round; the leaf sees the note in "
                        "the round's progress and may upload again, with another layout if it is the only one.")},
        branch + "/rounds/open/reset": {"post": admin(
            "Reset open round", ok=(200, _ref("DroppedUploads")), errors=found, params=("branch_id",),
            body=_obj({}, {"note": _null(_STR)}), body_required=False,
            description="Drops every upload of the open round (same round number); the leaves see the note in "
                        "the round's progress.")},
        branch + "/field-ops": {"put": admin(
            "Set field operations", ok=(200, _obj({"branch_id": _STR, "field_ops": _ref("FieldOps")})), errors=found,
            params=("branch_id",), body=_ref("FieldOpsRequest"),
            description="How analytics rounds combine each named field: sum, min, max or must_match (every leaf "
                        "sends the identical value); null removes one. An analytics upload with a field that has no "
                        "operation (and is no save_analytics bundle entry) is refused with 400 naming it.")},
        branch + "/codecs": {"put": admin(
            "Set accepted codecs", ok=(200, _obj({"branch_id": _STR, "codecs": _ref("Codecs")})), errors=found,
            params=("branch_id",), body=_obj({"codecs": _ref("Codecs")}),
            description="The codecs the branch advertises in its config (service.codecs) and accepts uploads in; "
                        "an upload in another is refused with 400 naming it. Empty: plain NPZ only.")},
        branch + "/analytics": {"get": listing("analytics", "analytics rounds")},
        branch + "/analytics/open/uploads/{leaf}": {"delete": admin(
            "Drop analytics upload", ok=(200, _obj({"dropped": {"type": "array", "items": _STR}, "kind": _KIND})),
            errors=found, params=("branch_id", "leaf"),
            description="Drops one leaf's upload (leaf id or name) from the open analytics round.")},
        branch + "/analytics/open/reset": {"post": admin(
            "Reset analytics round", ok=(200, _obj({"dropped_uploads": _INT, "kind": _KIND})), errors=found,
            params=("branch_id",),
            description="Abandons the open analytics round and drops its uploads; the next analytics upload opens "
                        "the next round.")},
        branch + "/uploads": {"get": listing("uploads", "uploads")},
        branch + "/aggregates": {"get": listing("aggregates", "aggregates")},
        branch + "/metrics": {"get": admin(
            "List metrics", ok=(200, _obj({"metrics": {"type": "array", "items": {"type": "object"}},
                                           "next": _null({**_INT, "description": "?after= of the next page"})})),
            errors=found, params=("branch_id",), optional_query=("limit", "after"),
            description=f"The branch's metrics reports, oldest first, a page at a time: ?limit=N (default "
                        f"{METRICS_PAGE}, at most {MAX_METRICS_PAGE}) after ?after= (the previous page's next; null "
                        "on the last page).")},
    }


def _lifecycle_paths() -> dict[str, dict[str, Schema]]:
    """The leaf lifecycle, the admin token and the audit trail (server/lifecycle.py)."""
    admin = functools.partial(_operation, tag="admin", security="adminBearer")
    leaf = ADMIN_PREFIX + "/branches/{branch_id}/leaves/{leaf}"
    broker = {"type": "string", "description": "done, none (no broker) or failed: why"}
    entry = _obj({"id": _INT, "at": _STR, "action": _STR, "target": _STR, "peer": _STR, "detail": {"type": "object"}})
    return {
        leaf + "/revoke": {"post": admin(
            "Revoke leaf", ok=(200, _obj({"leaf": _ref("Leaf"), "websockets_closed": _INT, "amqp": broker,
                                          "dropped": {"type": "array", "items": _STR},
                                          "aggregated": _null(_STR)})),
            errors=(400, 401, 404), params=("branch_id", "leaf"), body_required=False,
            body=_obj({}, {"drop_upload": {"type": "boolean"}, "note": _null(_STR)}),
            description="Refuses the leaf (id or name) on every leaf route at once, closes its WebSockets, deletes "
                        "its RabbitMQ user and queue, keeps (default) or drops its open-round upload; the open round "
                        "needs one leaf fewer and is aggregated if that completes it.")},
        leaf + "/rotate": {"post": admin(
            "Rotate leaf token", ok=(200, _obj({"leaf": _ref("LeafCredentials"), "websockets_closed": _INT,
                                                "amqp": broker})),
            errors=(400, 401, 404), params=("branch_id", "leaf"),
            description="A new session token, answered in the leaf's credentials; the old one is refused at once.")},
        ADMIN_PREFIX + "/admin-token/rotate": {"post": admin(
            "Rotate admin token", ok=(200, _obj({"token": _STR, "token_file": _STR})), errors=(401,),
            description="A new admin token, answered once and written to <data_dir>/admin_token; the old one is "
                        "refused and dashboard sessions end.")},
        ADMIN_PREFIX + "/audit": {"get": admin(
            "List audit trail", ok=(200, _obj({"entries": {"type": "array", "items": entry},
                                               "next": _null({**_INT, "description": "?after= of the next page"})})),
            errors=(400, 401), optional_query=("after", "limit", "latest"),
            description="Admin actions, oldest first: when, what, on what, from which address; never a secret. "
                        "?latest=N answers the latest N (next: null) instead of a page.")},
    }


#: one server-sent event of the dashboard's stream: ``event: <kind>`` and ``data: <JSON of the event>``
_EVENT: Schema = _obj({
    "event": {"enum": ["hello", *KINDS]},
    "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": _obj(
        {"kind": {"enum": ["hello", *KINDS]}}, {"branch_id": _null(_STR), "at": {"type": "number"}})},
}, {"id": _STR, "retry": _INT})


_STAT: Schema = _null({"type": "number"})
#: the dashboard's analytics result (server/analytics_report.py)
_ANALYTICS_RESULT: Schema = _obj({"branch_id": _STR, "field_ops": _ref("FieldOps"), "result": _null(_obj({
    "kind": _KIND, "run_number": _INT, "round_index": _INT, "aggregation_id": _STR, "aggregated_at": _TIME,
    "contributors": _INT, "field_ops": _ref("FieldOps"),
    "columns": {"type": "object", "additionalProperties": _obj({name: _STAT for name in (
        "count", "sum", "mean", "variance", "std", "min", "max", "range", "nan", "completeness")} | {"leaves": _INT})},
    "fields": {"type": "array", "items": _obj({
        "name": _STR, "op": _null({"enum": list(FIELD_OPS)}), "dtype": _STR, "shape": {"type": "array", "items": _INT},
        "values": {"type": "array", "description": "the first values (strings for non-finite or complex ones)"},
        "truncated": {"type": "boolean"}})},
    "note": _null({**_STR, "description": "why no columns or fields are shown (the file was removed)"})}))})


def _dashboard_paths() -> dict[str, dict[str, Schema]]:
    """The dashboard (server/dashboard.py): its page and files, and the admin JSON it reads."""
    admin = functools.partial(_operation, tag="dashboard", security="adminBearer")
    branch, obj = ADMIN_PREFIX + "/branches/{branch_id}", {"type": "object"}
    page = functools.partial(_operation, tag="dashboard", security=None, wrapped=False, errors=(), content_type="text/html")
    return {
        "/": {"get": page("Dashboard page", ok=(200, {"type": "string"}),
                          description="The dashboard; it shows nothing until given the admin token.")},
        "/dashboard/static/{name}": {"get": page("Dashboard file", ok=(200, {"type": "string"}), params=("name",),
                                                 errors=(400, 404), content_type="text/javascript")},
        ADMIN_PREFIX + "/overview": {"get": admin("Dashboard overview", ok=(200, obj), errors=(401,),
                                                  description="Trees, branches, runs and each open round in brief.")},
        branch + "/live": {"get": admin("Open round live", ok=(200, obj), errors=(400, 401, 404), params=("branch_id",),
                                        description="The open round and every leaf's state and connection.")},
        branch + "/history": {"get": admin("Round history", ok=(200, obj), errors=(400, 401, 404), params=("branch_id",),
                                           optional_query=("run",),
                                           description="Aggregated rounds of one run (?run=N, default the latest).")},
        branch + "/metrics/summary": {"get": admin(
            "Metrics summary", ok=(200, obj), errors=(400, 401, 404), params=("branch_id",), optional_query=("run",),
            description="Per mode and metric: the sample-weighted mean over leaves and each leaf's value, by round.")},
        branch + "/analytics/result": {"get": admin(
            "Analytics result", ok=(200, _ANALYTICS_RESULT), errors=(400, 401, 404), params=("branch_id",),
            description="The branch's latest combined analytics round (null before the first): per column with a "
                        "complete save_analytics bundle the derived statistics (null where a column had no values) "
                        "and how many leaves contributed; every other field with its operation and first values; "
                        "and the branch's field operations.")},
        ADMIN_PREFIX + "/aggregates/{file_id}/download": {"get": admin(
            "Aggregate download URL", ok=(200, _obj({"download_url": _STR})), errors=(400, 401, 404, 410),
            params=("file_id",), description="A signed, expiring URL of a stored aggregate.")},
        ADMIN_PREFIX + "/events": {"get": admin(
            "Event stream", ok=(200, _EVENT), errors=(401,), wrapped=False, content_type="text/event-stream",
            description="Server-sent events (the schema is one event's): hello first, then "
                        f"{', '.join(KINDS)}; comment lines keep the connection alive.")},
        ADMIN_PREFIX + "/dashboard/links": {"post": admin("Dashboard login link", ok=(201, _obj({"url": _STR})),
                                                          errors=(401,))},
        ADMIN_PREFIX + "/dashboard/login": {"post": _operation(
            "Dashboard login", tag="dashboard", security=None, ok=(200, _obj({"token": _STR})), errors=(400, 401, 413),
            body=_obj({"code": _STR}), description="Trades a one-time login code for the admin token.")},
    }


def _document() -> Schema:
    return _document_of(tuple(STRATEGIES.items()))


@functools.lru_cache(maxsize=4)
def _document_of(strategies: tuple[tuple[str, type], ...]) -> Schema:
    """The document for these registered strategies (built once per catalogue)."""
    responses = {f"E{code}": {"description": text, "content": {"application/json": {"schema": _ref("Error")}}}
                 for code, text in {**_ERRORS, 502: "RabbitMQ refused the change"}.items()}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "branchkey-local", "version": __version__,
            "description": "The leaf API of the BranchKey protocol (PROTOCOL.md), branchkey-local's extensions, and "
                           "its admin API. Answers are {\"data\": ...} or {\"error\": text}.",
        },
        "paths": {**_leaf_paths(), **_admin_paths(), **_lifecycle_paths(), **_dashboard_paths()},
        "components": {
            "schemas": schemas(),
            "responses": responses,
            "securitySchemes": {
                "leafBearer": {"type": "http", "scheme": "bearer", "bearerFormat": "{leaf_id}:{session_token}"},
                "adminBearer": {"type": "http", "scheme": "bearer",
                                "description": "the token in <data_dir>/admin_token"},
            },
        },
    }


def openapi_document() -> Schema:
    """The OpenAPI 3.1 document of every route (a fresh copy: callers may change it)."""
    return copy.deepcopy(_document())


async def serve_openapi(request: web.Request) -> web.Response:
    """``GET`` OPENAPI_PATH: the document itself (no authentication; it holds no secret)."""
    return web.json_response(_document())


def add_openapi_route(app: web.Application) -> None:
    app.router.add_get(OPENAPI_PATH, serve_openapi)


__all__ = ["openapi_document", "serve_openapi", "add_openapi_route", "schemas"]
