"""The leaf API of PROTOCOL.md over HTTP: run details, upload, download, metrics, config, WebSocket.

Every call but the signed blob download and the WebSocket itself carries
``Authorization: Bearer {leaf_id}:{session_token}`` (:mod:`~branchkey_integrations.server.auth`).
The handlers only translate: a request becomes calls on the store, the upload receiver and the
round state machine; their results become ``{"data": ...}``. Refusals of those layers are
domain errors that :mod:`~branchkey_integrations.server.httpio` maps to statuses.

Two delivery rules live here: a leaf whose WebSocket connects is sent the aggregate of the round it
took part in and has not downloaded yet (catch-up: a notification missed while it was away costs
nothing), and downloading an aggregate acknowledges it. Metrics must name an aggregate of the
leaf's branch (404 for an unknown id, 403 for another branch's); a report is at most
:data:`MAX_METRICS_BYTES` (413) and a leaf sends at most :data:`MAX_METRICS_PER_ROUND` per round (429),
so what a leaf's metrics cost the server grows with rounds, not with its requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path

from aiohttp import web

from ..core.delta import DELTA_CONFIG_KEY
from ..core.errors import ArchiveError, InvalidValueError
from ..core.protocol import (
    BLOB_PATH,
    BRANCH_CONFIG_PATH,
    DOWNLOAD_PATH,
    IDEMPOTENCY_KEY_HEADER,
    IDEMPOTENCY_KEY_PATTERN,
    KIND_FEDERATED_ANALYTICS,
    KIND_FEDERATED_LEARNING,
    PAYLOAD_KINDS,
    METRIC_MODES,
    METRICS_PATH,
    ROUND_PATH,
    RUN_PATH,
    UPLOAD_PATH,
    WS_PATH,
    WS_TICKET_PATH,
    aggregation_message,
    encode_message,
    is_file_id,
)
from .codec_policy import check_upload_codecs
from .delta_uploads import base_file, rebuild_upload
from .encoded_aggregates import check_download_codec, encoded_source, send_streamed
from .analytics_rounds import analytics_message
from .connections import GUARD, claim_connection, trust_connection
from .events import events_of
from .httpio import HttpProblem, check_file_id, ok, read_json_object
from .presence import presence_of
from .openapi import add_openapi_route
from .progress import round_progress
from .records import FileRecord, Leaf
from .state import MAX_METRICS_BYTES, MAX_METRICS_PER_ROUND, Server, server_of
from .rounds import AcceptedUpload
from .uploads import decode_upload, drain, receive_upload, storage_errors

logger = logging.getLogger(__name__)


def require_own_branch(leaf: Leaf, branch_id: str) -> None:
    if branch_id != leaf.branch_id:
        raise HttpProblem(403, f"Leaf {leaf.id} belongs to branch {leaf.branch_id}, not {branch_id[:80]!r}.")


def check_not_removed(record: FileRecord) -> None:
    """410 for a file that retention removed (its row stays, so the answer can say what it was)."""
    if record.removed_at:
        what = "aggregate" if record.kind == "aggregate" else "upload"
        raise HttpProblem(410, (
            f"File {record.id} (the {what} of round {record.round_index + 1} of run {record.run_number}) was removed by the "
            f"server's retention at {record.removed_at}: it keeps uploads until their round is aggregated "
            "(serve --keep-uploads keeps them) and the aggregates of the latest rounds (serve --keep-rounds N). "
            f"The branch's latest aggregate is in GET {ROUND_PATH}."))


async def run_details(request: web.Request) -> web.Response:
    server = server_of(request)
    leaf = await server.auth.authenticate(request)
    require_own_branch(leaf, request.match_info["branch_id"])
    branch = await server.blocking(server.store.require_branch, leaf.branch_id)
    return ok({"run_status": branch.run_status, "run_number": branch.run_number})


async def branch_config(request: web.Request) -> web.Response:
    server = server_of(request)
    leaf = await server.auth.authenticate(request)
    require_own_branch(leaf, request.match_info["branch_id"])
    branch = await server.blocking(server.store.require_branch, leaf.branch_id)
    field_ops = await server.blocking(server.store.field_ops, branch.id)
    codecs = await server.blocking(server.store.branch_codecs, branch.id)
    return ok({
        "branch": {"id": branch.id, "name": branch.name, "tree_id": branch.tree_id},
        "service": {
            "algorithm": branch.algorithm,
            "config": {"min_leaves": branch.min_leaves, "round_deadline_s": branch.round_deadline_s,
                       **branch.params},  # the strategy's parameters, as the 3.x platform reports its service's
            "field_ops": field_ops,  # how an analytics round combines each field (bundle entries: by suffix)
            **({"codecs": codecs} if codecs else {}),  # what uploads may be encoded with; absent: plain NPZ only
            **({DELTA_CONFIG_KEY: True} if codecs else {}),  # and that they may be differences (core/delta.py)
        },
        "model_config": {},
        "created_at": branch.created_at,
        "updated_at": branch.updated_at,
    })


def idempotency_key(request: web.Request) -> str | None:
    """The upload's ``Idempotency-Key`` (branchkey-local's leaf client sends one; the official clients do not)."""
    key = request.headers.get(IDEMPOTENCY_KEY_HEADER)
    if key is not None and IDEMPOTENCY_KEY_PATTERN.fullmatch(key) is None:
        raise InvalidValueError(f"{IDEMPOTENCY_KEY_HEADER} must be 1-128 visible ASCII characters (a UUID, say). "
                                f"Received: {key[:140]!r}")
    return key


def declared_kind(metadata: str | None) -> str:
    """The payload kind an upload's metadata declares (3.x sends ``"kind"``): which round a refusal of its body
    belongs to before the archive is read; ``federated_learning`` when it says none (2.7.1, older 3.x)."""
    try:
        kind = json.loads(metadata or "").get("kind")
    except (ValueError, AttributeError, RecursionError):
        return KIND_FEDERATED_LEARNING
    return kind if kind in PAYLOAD_KINDS else KIND_FEDERATED_LEARNING


def upload_answer(accepted: AcceptedUpload, kind: str) -> web.Response:
    # the official clients read file_id only; run_number, round_index and kind are branchkey-local's
    return ok({"file_id": accepted.file_id, "run_number": accepted.run_number, "round_index": accepted.round_index,
               "kind": kind}, status=201)


async def upload_file(request: web.Request) -> web.Response:
    server = server_of(request)
    leaf = await server.auth.authenticate(request)
    key = idempotency_key(request)
    for rounds, kind in ((server.rounds, KIND_FEDERATED_LEARNING), (server.analytics, KIND_FEDERATED_ANALYTICS)):
        if (counted := await rounds.counted_upload(leaf, key)) is not None:  # a retry whose 201 was lost
            await drain(request, server.config.upload_limits.max_upload_bytes)
            await asyncio.shield(counted.folded)
            return upload_answer(counted, kind)
    branch = await server.blocking(server.store.require_branch, leaf.branch_id)
    server.rounds.check_accepting(branch)  # refuse before reading a body of hundreds of MB
    limits = server.config.upload_limits
    temp = server.store.new_temp_path()
    kind = KIND_FEDERATED_LEARNING  # until the metadata (3.x sends "kind"), then the archive, says otherwise
    try:
        upload = await receive_upload(request, temp, limits, server.workers,
                                      idle_timeout_s=request.app[GUARD].limits.upload_idle_timeout_s)
        kind = declared_kind(upload.metadata)
        base = None if upload.delta_base is None else await server.blocking(  # 409 before the body is decoded
            base_file, server.store, branch.id, upload.delta_base)
        accepted_codecs = await server.blocking(server.store.branch_codecs, branch.id)
        await server.blocking(check_upload_codecs, upload.path, accepted_codecs)  # from the directory: nothing inflated
        model_limit = await server.blocking(server.store.model_size_limit, branch.id)  # refused before inflating
        archive = await decode_upload(upload.path, limits, server.workers, model_limit)
        if base is not None:  # rewritten as the full upload, piece by piece: every reader sees full weights
            with storage_errors():  # it writes the upload's size again
                upload, archive = await server.workers.blocking(rebuild_upload, upload, base, archive)
        kind = archive.kind
        rounds = server.analytics if kind == KIND_FEDERATED_ANALYTICS else server.rounds
        try:
            with storage_errors():  # the commit's fsync and rename may meet a full disk too
                accepted = await rounds.accept_upload(
                    leaf, archive, upload.path, size=upload.size, sha256=upload.sha256.hex(), metadata=upload.metadata,
                    key=key,
                )
        finally:
            archive.layers.clear()  # views of the upload's memory map: unmap before the file is removed
    except (InvalidValueError, ArchiveError) as exc:  # a refused body (400/413): the round's progress shows it
        if kind == KIND_FEDERATED_ANALYTICS:  # never in the learning round's refusals: its leaves would read them
            logger.warning("analytics upload of leaf %s (%s) to branch %s refused: %s", leaf.name, leaf.id,
                           leaf.branch_id, exc)
        else:
            await server.rounds.record_refusal(leaf, str(exc))
        events_of(request).emit("refused", leaf.branch_id, leaf=leaf.name, reason=str(exc)[:500], payload_kind=kind)
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
    events_of(request).emit("upload", leaf.branch_id, leaf=leaf.name, run_number=accepted.run_number,
                            round_index=accepted.round_index, payload_kind=kind)
    # answered once folded: what follows a round's last answer is writing the mean, O(model), however many
    # uploads finished with it; sockets are read meanwhile (a budget owed until folds stalled receipt)
    await asyncio.shield(accepted.folded)
    return upload_answer(accepted, kind)


async def round_status(request: web.Request) -> web.Response:
    """``GET /api/v1/round/{branch_id}`` (branchkey-local): the open round's progress and the latest aggregate.

    Only a leaf of the branch may ask (403 otherwise). The answer's ``data``:

    - ``run_status``, ``run_number``: the branch's run; ``round_index``: the open round (from 0 within the
      run), null while no round is open (run stopped);
    - ``uploaded``, ``missing``: leaf names whose upload counts in the open round, and those without one;
      ``required``: how many uploads complete the round (``min_leaves``, else every leaf);
    - ``refused``: ``[{"leaf", "reason", "at"}]``, uploads refused in the open round (the latest per leaf,
      gone once that leaf's later upload is accepted);
    - ``opened_at``: when the round opened; ``deadline_at``: when a round deadline aggregates it (null without
      a deadline or before its first upload), both ISO 8601 UTC;
    - ``latest_aggregate``: ``{"aggregation_id", "run_number", "round_index", "strategy", "strategy_note"}``
      of the branch's latest aggregate, or null: a leaf that missed a notification finds its result here;
      ``strategy`` says what aggregated it and ``strategy_note``, when it was not the branch's strategy, why;
    - ``strategy``, ``strategy_params``: how the branch aggregates (docs/guides/strategies.md).

    With ``?brief=1`` the leaves are counted, not named: ``uploaded_count`` instead of ``uploaded``,
    ``missing`` and ``refused`` (the same in ``analytics``): what a waiting leaf's check for a missed aggregate
    needs, at a cost that does not grow with the branch's leaves.
    """
    server = server_of(request)
    leaf = await server.auth.authenticate(request)
    require_own_branch(leaf, request.match_info["branch_id"])
    brief = request.query.get("brief", "0")
    if brief not in ("0", "1"):
        raise HttpProblem(400, f"brief={brief[:20]!r}; expected 1 (leaves counted, not named) or 0.")
    progress = await server.blocking(round_progress, server.store, leaf.branch_id, brief=brief == "1")
    return ok(progress.to_dict())


async def download_file(request: web.Request) -> web.Response:
    server = server_of(request)
    leaf = await server.auth.authenticate(request)
    file_id = check_file_id(request.match_info["file_id"])
    record = await server.blocking(server.store.get_file, file_id)
    if record is None or record.branch_id != leaf.branch_id:
        raise HttpProblem(404, f"No file {file_id} in branch {leaf.branch_id}; expected an aggregation id or your own upload id.")
    if record.kind == "upload" and record.leaf_id != leaf.id:
        raise HttpProblem(403, f"File {file_id} is another leaf's upload; a leaf may download aggregates and its own uploads.")
    check_not_removed(record)
    codec = request.query.get("codec")  # a leaf that asks gets the aggregate in a codec its branch advertises
    if codec is not None:
        codec = check_download_codec(codec, await server.blocking(server.store.branch_codecs, record.branch_id))
    if record.kind == "aggregate":  # the leaf has this result: no catch-up will send it again
        await server.blocking(server.store.acknowledge, leaf.id, file_id)
    url = signed_download_url(server, request, file_id)
    return ok({"download_url": url if codec is None or record.kind != "aggregate" else f"{url}&codec={codec}"})


def signed_download_url(server: Server, request: web.Request, file_id: str) -> str:
    """The blob URL of ``file_id``, signed and valid for the server's ``download_ttl_s``."""
    expires = int(time.time()) + server.config.download_ttl_s
    base = public_base_url(server, request)
    return f"{base}{BLOB_PATH.format(file_id=file_id)}?expires={expires}&signature={server.auth.sign(file_id, expires)}"


def public_base_url(server: Server, request: web.Request) -> str:
    """Where clients reach this server: the configured ``public_url``, else the address this connection
    was accepted on (the listening address; a wildcard bind's the interface the client dialled).

    Never the request's ``Host`` header: a client chooses that, and a URL built from it would send a
    leaf's download (or the admin's login link) wherever the client said.
    """
    if server.config.public_url:
        return server.config.public_url.rstrip("/")
    sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
    if not isinstance(sockname, tuple) or len(sockname) < 2:
        raise HttpProblem(500, "This server listens on no TCP address it can name; start it with a public URL "
                               "(serve --public-url http://host:port).")
    host = str(sockname[0])
    host = f"[{host}]" if ":" in host else host
    return f"{request.scheme}://{host}:{sockname[1]}"


async def download_blob(request: web.Request) -> web.StreamResponse:
    server = server_of(request)
    file_id = check_file_id(request.match_info["file_id"])
    server.auth.check_signature(file_id, request.query.get("expires", ""), request.query.get("signature", ""))
    trust_connection(request)  # a valid signed URL: a leaf's download keeps its connection
    record = await server.blocking(server.store.get_file, file_id)
    if record is None:
        raise HttpProblem(404, f"No file {file_id}.")
    check_not_removed(record)
    path, codec = server.store.file_path(record), request.query.get("codec")
    headers = {"Content-Type": "application/octet-stream",
               "Content-Disposition": f'attachment; filename="{file_id}.npz"'}
    if codec is not None and record.kind == "aggregate":  # one encoding, made once: every leaf gets the same bytes
        codec = check_download_codec(codec, await server.blocking(server.store.branch_codecs, record.branch_id))
        if codec is not None:
            source = await server.blocking(encoded_source, server.store, record, codec)
            if not isinstance(source, Path):  # being made: sent as it is encoded
                return await send_streamed(request, source, headers)
            path = source
    return web.FileResponse(path, headers=headers)


async def performance_analysis(request: web.Request) -> web.Response:
    server = server_of(request)
    leaf = await server.auth.authenticate(request)
    body = await read_json_object(request, MAX_METRICS_BYTES)
    mode = body.get("mode")
    if mode not in METRIC_MODES:
        raise HttpProblem(400, f"Expected mode in {list(METRIC_MODES)}. Received: mode={mode!r}")
    for key, own in (("leaf_id", leaf.id), ("branch_id", leaf.branch_id), ("tree_id", leaf.tree_id)):
        if body.get(key) != own:
            raise HttpProblem(403, f"{key} {str(body.get(key))[:80]!r} does not match the authenticated leaf ({own}).")
    data = body.get("data")
    if isinstance(data, str):
        try:
            json.loads(data)
        except json.JSONDecodeError as exc:
            raise HttpProblem(400, f"'data' is not JSON text ({exc}); expected e.g. '{{\"accuracy\": 0.9}}'.") from exc
    elif isinstance(data, (dict, list)):
        data = json.dumps(data)
    else:
        raise HttpProblem(400, f"Expected 'data' to be JSON text of the metrics. Received: {type(data).__name__}")
    aggregation_id = body.get("aggregation_id")
    aggregation_id = None if aggregation_id in (None, "") else str(aggregation_id)
    if aggregation_id is not None:
        await check_own_aggregate(server, leaf, aggregation_id)
    metric_id = await server.blocking(server.store.add_metric, mode=mode, aggregation_id=aggregation_id, leaf=leaf,
                                      data=data, max_per_round=MAX_METRICS_PER_ROUND)
    events_of(request).emit("metrics", leaf.branch_id, leaf=leaf.name, mode=mode, aggregation_id=aggregation_id)
    return ok({"id": metric_id}, status=201)


async def check_own_aggregate(server: Server, leaf: Leaf, aggregation_id: str) -> None:
    """Metrics name an aggregate of the leaf's branch: 404 for an unknown id, 403 for another branch's."""
    record = await server.blocking(server.store.get_file, aggregation_id) if is_file_id(aggregation_id) else None
    if record is None or record.kind != "aggregate":
        raise HttpProblem(404, f"No aggregate with id {aggregation_id[:80]!r}; metrics name the aggregation id "
                               "the leaf was sent (aggregation_status), or none.")
    if record.branch_id != leaf.branch_id:
        raise HttpProblem(403, f"Aggregate {aggregation_id} belongs to another branch, not to leaf {leaf.id}'s "
                               f"branch {leaf.branch_id}.")


async def ws_ticket(request: web.Request) -> web.Response:
    server = server_of(request)
    ticket = server.auth.issue_ticket(await server.auth.authenticate(request))
    expires_iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ticket.expires_at))
    return ok({"ticket_id": ticket.id, "request_id": ticket.request_id, "expires_at": expires_iso})


async def websocket(request: web.Request) -> web.WebSocketResponse:
    server = server_of(request)
    leaf = server.auth.redeem_ticket(request.query.get("ticket", ""), request.query.get("request_id", ""))
    claim_connection(request, leaf.id)
    socket = web.WebSocketResponse(heartbeat=30)
    await socket.prepare(request)
    server.notifier.register(leaf, socket)
    current = await server.blocking(server.store.get_leaf, leaf.id)
    if current is None or current.session_token != leaf.session_token:  # revoked or rotated while it connected
        server.notifier.unregister(leaf, socket)
        await socket.close(code=1008, message=b"leaf credentials revoked or rotated")
        return socket
    try:  # a catch-up that fails or is cancelled (the leaf left) must not leave the socket registered
        await catch_up(server, leaf, socket)
        presence_of(request).websocket_opened(leaf)
        try:
            async for _ in socket:
                pass  # clients only listen; anything they send is ignored
        finally:
            presence_of(request).websocket_closed(leaf)
    finally:
        server.notifier.unregister(leaf, socket)
    return socket


async def catch_up(server: Server, leaf: Leaf, socket: web.WebSocketResponse) -> None:
    """Send a (re)connected leaf the aggregate of the round it took part in and has not downloaded (of each kind).

    Registered first, then looked up: an aggregate committed in between reaches the leaf twice at
    worst, never not at all (a repeat is harmless; the official clients keep the newest id).
    """
    missed = await server.blocking(server.store.unacknowledged_aggregate, leaf)
    if missed is not None:
        logger.info("leaf %s (%s) connected after aggregate %s of run %d round %d: sending it (catch-up)",
                    leaf.name, leaf.id, *missed)
        with contextlib.suppress(ConnectionError, RuntimeError):  # the leaf went away again
            await socket.send_str(encode_message(aggregation_message(*missed)))
    combined = await server.blocking(server.store.unacknowledged_analytics, leaf)
    if combined is not None:
        logger.info("leaf %s (%s) connected after analytics aggregate %s of run %d round %d: sending it (catch-up)",
                    leaf.name, leaf.id, *combined)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await socket.send_str(encode_message(analytics_message(*combined)))


def add_leaf_routes(app: web.Application) -> None:
    app.router.add_get(RUN_PATH, run_details)
    app.router.add_post(UPLOAD_PATH, upload_file)
    app.router.add_get(DOWNLOAD_PATH, download_file)
    app.router.add_get(BLOB_PATH, download_blob)
    app.router.add_post(METRICS_PATH, performance_analysis)
    app.router.add_get(BRANCH_CONFIG_PATH, branch_config)
    app.router.add_post(WS_TICKET_PATH, ws_ticket)
    app.router.add_get(WS_PATH, websocket)
    app.router.add_get(ROUND_PATH, round_status)
    add_openapi_route(app)


__all__ = ["add_leaf_routes", "signed_download_url", "public_base_url"]
