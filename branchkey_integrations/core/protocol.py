"""The wire vocabulary of PROTOCOL.md, shared by the leaf client and ``branchkey-local``.

Both sides import these names, so a message type, a run status, a metric mode, the file-id
rule or an API path is defined once: what the server builds, the client parses. The module
needs nothing beyond the standard library.

``branchkey-local`` extensions, which the official clients never see or ignore (they read only the fields
PROTOCOL.md names): an ``aggregation_status`` body also carries the ``run_number`` and ``round_index`` of
the round it closes, so a leaf never takes a late aggregate of an earlier round for the one it waits on;
the upload's 201 answer carries the ``run_number`` and ``round_index`` the upload was accepted into; and
``GET`` :data:`ROUND_PATH` tells a leaf of the branch the open round's progress and the branch's latest
aggregate, which is how a leaf that missed a notification still finds its result. ``round_index`` counts
from 0 within a run, as the admin API does. A branch that advertises codecs says so in its config
(``service.codecs``, and ``service.delta_uploads: true``); only there does a leaf encode members with a codec
(:mod:`.tensor_codecs`) or name a ``delta_base`` in the upload's part ``data`` (:mod:`.delta`).

The :data:`ROUND_PATH` answer (a leaf of that branch only; 403 for any other) is ``{"data": {...}}`` with
``run_status`` and ``run_number`` of the branch; ``round_index`` of the open round (null while the run is
stopped); ``uploaded`` and ``missing``, lists of leaf names (never tokens) with and without an upload that
counts in the open round; ``required``, the uploads that complete it; ``refused``, a list of
``{"leaf", "reason", "at"}`` for uploads refused in the open round (the latest per leaf, gone once that
leaf's later upload is accepted); ``opened_at`` and ``deadline_at`` (ISO 8601 UTC; ``deadline_at`` is null
without a round deadline or before the round's first upload); and ``latest_aggregate``,
``{"aggregation_id", "run_number", "round_index"}`` of the branch's latest aggregate, or null.

Example:
    >>> message = aggregation_message("f00d")
    >>> parse_notification(encode_message(message)).aggregation_id
    'f00d'
    >>> is_file_id("../etc/passwd"), is_file_id("3f2a-9b.npz")
    (False, True)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .errors import ProtocolError

DEFAULT_HOST = "https://app.branchkey.com"

# -- run status -----------------------------------------------------------------------------------
START, PAUSE, STOP = "start", "pause", "stop"
RUN_STATUSES = (START, PAUSE, STOP)

# -- metrics --------------------------------------------------------------------------------------
METRIC_MODES = ("test", "train", "non-federated")

# -- payload kinds (what an upload archive holds; core/payload_kinds.py says how each is checked) -------
#: the archive member, and the upload metadata field (``"kind"``), that name an upload's payload kind
KIND_KEY = "__bk_payload_kind__"
KIND_FEDERATED_LEARNING = "federated_learning"
KIND_FEDERATED_ANALYTICS = "federated_analytics"
PAYLOAD_KINDS = (KIND_FEDERATED_LEARNING, KIND_FEDERATED_ANALYTICS)
#: a model archive's members: its weighting and its layers, ``layer_0``, ``layer_1``, ... in numeric order
WEIGHTING_KEY = "weighting"
LAYER_PATTERN = re.compile(r"layer_(0|[1-9][0-9]*)")
#: SCAFFOLD's control variates (branchkey-local, branches whose algorithm is in :data:`CONTROLLED_ALGORITHMS`
#: only): ``control_<n>`` beside ``layer_<n>``, same shape and dtype. In an upload, the leaf's control update
#: ``delta c_i``; in the aggregate, the server's control variate ``c``. The official clients never send them.
CONTROL_PATTERN = re.compile(r"control_(0|[1-9][0-9]*)")
#: the branch algorithms (``service.algorithm`` of the branch config) whose learning archives carry controls
CONTROLLED_ALGORITHMS = ("scaffold",)

# -- file ids -------------------------------------------------------------------------------------
#: A file id is a plain token: letters, digits, '.', '_' and '-', starting with a letter or digit,
#: at most 128 characters, never '..': it names a file on disk on both sides.
FILE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def is_file_id(text: object) -> bool:
    """Whether ``text`` is a safe file id (see :data:`FILE_ID_PATTERN`)."""
    return isinstance(text, str) and FILE_ID_PATTERN.fullmatch(text) is not None and ".." not in text


# -- API paths ------------------------------------------------------------------------------------
API_PREFIX = "/api/v1"
ADMIN_PREFIX = "/admin/v1"
RUN_PATH = API_PREFIX + "/run/{branch_id}"
UPLOAD_PATH = API_PREFIX + "/file/upload"
DOWNLOAD_PATH = API_PREFIX + "/file/download/{file_id}"
BLOB_PATH = API_PREFIX + "/file/blob/{file_id}"  # branchkey-local's signed download URL
METRICS_PATH = API_PREFIX + "/performance/analysis"
BRANCH_CONFIG_PATH = API_PREFIX + "/config/branch/{branch_id}"
WS_TICKET_PATH = API_PREFIX + "/ws/ticket"
WS_PATH = API_PREFIX + "/ws"
ROUND_PATH = API_PREFIX + "/round/{branch_id}"  # branchkey-local: open round's progress + latest aggregate
OPENAPI_PATH = API_PREFIX + "/openapi.json"  # branchkey-local: the OpenAPI document of every route (no auth)

#: upload headers of the 3.x client, checked by a server that receives them
FILE_SIZE_HEADER = "x-bk-file-size"
FILE_DIGEST_HEADER = "x-bk-file-digest"
#: branchkey-local's upload header (the IETF httpapi draft's name): one key per logical upload, the same on
#: every retry of it, so that a retry of an upload the server already counted (its 201 lost on the way) is
#: answered with that upload's 201 instead of being filed in a later round. The official clients never send it.
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
#: an idempotency key is 1-128 visible ASCII characters (a UUID is what the leaf client sends)
IDEMPOTENCY_KEY_PATTERN = re.compile(r"[!-~]{1,128}")

# -- notifications --------------------------------------------------------------------------------
AGGREGATION_STATUS = "aggregation_status"
RUN_STATUS = "run_status"
MESSAGE_TYPES = (AGGREGATION_STATUS, RUN_STATUS)


@dataclass(frozen=True)
class Notification:
    """One message from the platform: ``message_type`` and its ``body``."""

    message_type: str
    body: dict[str, Any]

    @property
    def aggregation_id(self) -> str | None:
        return self.body.get("aggregation_id") if self.message_type == AGGREGATION_STATUS else None

    @property
    def run_status(self) -> str | None:
        return self.body.get("run_status") if self.message_type == RUN_STATUS else None

    @property
    def run_number(self) -> int | None:
        """The run of the round an aggregate closes (branchkey-local), or None when the platform did not say."""
        return self.body.get("run_number") if self.message_type == AGGREGATION_STATUS else None

    @property
    def round_index(self) -> int | None:
        """The round (from 0 within its run) an aggregate closes (branchkey-local), or None when not said."""
        return self.body.get("round_index") if self.message_type == AGGREGATION_STATUS else None


def aggregation_message(aggregation_id: str, run_number: int | None = None,
                        round_index: int | None = None) -> dict[str, Any]:
    """``aggregation_status``: the aggregate ``aggregation_id`` (of that run and round, when given) is ready."""
    body: dict[str, Any] = {"aggregation_id": aggregation_id}
    if run_number is not None:
        body["run_number"] = run_number
    if round_index is not None:
        body["round_index"] = round_index
    return {"message_type": AGGREGATION_STATUS, "body": body}


def run_status_message(run_status: str) -> dict[str, Any]:
    """``run_status``: the branch's run is now ``run_status``."""
    if run_status not in RUN_STATUSES:
        raise ValueError(f"Expected run_status in {RUN_STATUSES}. Received: run_status={run_status!r}")
    return {"message_type": RUN_STATUS, "body": {"run_status": run_status}}


def encode_message(message: dict[str, Any]) -> str:
    """The JSON text a transport carries."""
    return json.dumps(message)


def parse_notification(raw: bytes | str) -> Notification:
    """Parse and check one message; raise :class:`ProtocolError` naming what is wrong.

    Fields a body carries beyond the ones checked here are kept (the official clients ignore them).
    """
    try:
        message = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise ProtocolError(f"Notification is not JSON: {exc!r}") from exc
    if not isinstance(message, dict) or not isinstance(message.get("body"), dict):
        raise ProtocolError(f"Expected {{'message_type': ..., 'body': {{...}}}}. Received: {str(raw)[:200]!r}")
    message_type = message.get("message_type")
    body = message["body"]
    if message_type == AGGREGATION_STATUS:
        if not is_file_id(body.get("aggregation_id")):
            raise ProtocolError(f"aggregation_status without an aggregation_id that is a plain token (a file id): "
                                f"{str(body)[:200]}")
        for name in ("run_number", "round_index"):
            value = body.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ProtocolError(f"aggregation_status with {name}={value!r}; expected an integer >= 0.")
    elif message_type == RUN_STATUS:
        if body.get("run_status") not in RUN_STATUSES:
            raise ProtocolError(f"run_status must be one of {RUN_STATUSES}. Received: {body!r}")
    else:
        raise ProtocolError(f"Unknown message_type {message_type!r}; expected one of {MESSAGE_TYPES}.")
    return Notification(message_type, body)


__all__ = [
    "DEFAULT_HOST", "START", "PAUSE", "STOP", "RUN_STATUSES", "METRIC_MODES", "KIND_KEY", "KIND_FEDERATED_LEARNING",
    "KIND_FEDERATED_ANALYTICS", "PAYLOAD_KINDS", "WEIGHTING_KEY", "LAYER_PATTERN", "CONTROL_PATTERN",
    "CONTROLLED_ALGORITHMS", "FILE_ID_PATTERN", "is_file_id",
    "API_PREFIX", "ADMIN_PREFIX", "RUN_PATH", "UPLOAD_PATH", "DOWNLOAD_PATH", "BLOB_PATH", "METRICS_PATH",
    "BRANCH_CONFIG_PATH", "WS_TICKET_PATH", "WS_PATH", "ROUND_PATH", "OPENAPI_PATH", "FILE_SIZE_HEADER", "FILE_DIGEST_HEADER",
    "IDEMPOTENCY_KEY_HEADER", "IDEMPOTENCY_KEY_PATTERN",
    "AGGREGATION_STATUS", "RUN_STATUS", "MESSAGE_TYPES", "Notification", "aggregation_message",
    "run_status_message", "encode_message", "parse_notification",
]
