"""The HTTP side of branchkey-local: the leaf API of PROTOCOL.md, an admin API, and round logic.

Leaf API (``/api/v1``, ``Authorization: Bearer {leaf_id}:{session_token}``):
run details, upload, download (a signed, expiring URL to ``/api/v1/file/blob/{id}``),
metrics, branch config, WebSocket ticket and the WebSocket itself.

Admin API (``/admin/v1``, ``Authorization: Bearer {admin_token}``): trees, branches, leaves,
run status, and read-only views of rounds, uploads, aggregates and metrics.

Rounds: an upload is streamed to a temporary file, decoded and validated with
:mod:`branchkey_integrations.core.wire` off the event loop, then, under the branch's
``asyncio.Lock``, checked against the round's layer layout and committed (the 201 follows
the commit). When the open round holds ``min_leaves`` uploads (default: every leaf), or its
round deadline passes with at least one upload, it is aggregated in a worker thread, the
next round opens, and every leaf of the branch is notified. On start, rounds that were
complete when the server died are aggregated before the server listens. Run semantics
(start, pause, stop) are described in :mod:`branchkey_integrations.server.store`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import mmap
import os
import re
import secrets
import time
import zipfile
import zlib
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

from aiohttp import BodyPartReader, WSCloseCode, web

from ..core import wire
from ..core.errors import (
    AggregationError,
    ArchiveError,
    ArchiveTooLargeError,
    InvalidValueError,
    LocalServerError,
    RecordNotFoundError,
    RoundClosedError,
    RunNotStartedError,
)
from ..core.protocol import METRIC_MODES, is_file_id
from .aggregation import aggregate_files
from ..core.protocol import aggregation_message, run_status_message
from .notify import Notifier
from .store import Branch, Leaf, Store, UploadInput, start_writeback

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MAX_UPLOAD_BYTES = 4 * 1024**3
DEFAULT_DOWNLOAD_TTL_S = 15 * 60
DEFAULT_TICKET_TTL_S = 60
_UNSAFE_PATH = re.compile(r"(^|/)\.\.?(/|$)|%2f|%5c|%2e|\\", re.IGNORECASE)
_CHUNK = 4 << 20
_READ_CHUNK = 1 << 20
_DRAIN_LIMIT = 256 * 1024**2


class HttpProblem(Exception):
    """An error answer: the status and the text for ``{"error": ...}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ServerConfig:
    """Limits and settings of one server; checked once, when the app is created."""

    public_url: str | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_members: int = wire.DEFAULT_MAX_MEMBERS
    max_total_bytes: int = wire.DEFAULT_MAX_TOTAL_BYTES
    download_ttl_s: int = DEFAULT_DOWNLOAD_TTL_S
    ticket_ttl_s: int = DEFAULT_TICKET_TTL_S
    deadline_check_interval_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_members", "max_total_bytes", "download_ttl_s", "ticket_ttl_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected {name} to be an integer >= 1. Received: {name}={value!r}")
        if not 0 < self.deadline_check_interval_s <= 60:
            raise ValueError(
                f"Expected deadline_check_interval_s in (0, 60]. Received: {self.deadline_check_interval_s!r}"
            )
        if self.public_url is not None and not re.match(r"https?://[^/]+", self.public_url):
            raise ValueError(f"Expected public_url like 'http://host:port'. Received: public_url={self.public_url!r}")


@dataclass
class Ticket:
    leaf: Leaf
    request_id: str
    expires_at: float


def ok(data: Any, status: int = 200) -> web.Response:
    return web.json_response({"data": data}, status=status)


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class Server:
    """State shared by the handlers: the store, notifier, worker threads, locks and tickets."""

    def __init__(self, store: Store, notifier: Notifier, executor: ThreadPoolExecutor, config: ServerConfig) -> None:
        self.store = store
        self.notifier = notifier
        self.executor = executor
        self.config = config
        self.tickets: dict[str, Ticket] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._dummy_token = secrets.token_urlsafe(32)

    async def blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run blocking work (SQLite, archives, aggregation) in a worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Run ``coro`` in the background; kept referenced so shutdown can wait for it."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("background task failed", exc_info=task.exception())

    async def wait_for_tasks(self, timeout: float = 60.0) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    def lock(self, branch_id: str) -> asyncio.Lock:
        return self._locks[branch_id]

    # -- authentication -------------------------------------------------------------------

    async def authenticate(self, request: web.Request) -> Leaf:
        """The leaf of ``Authorization: Bearer {leaf_id}:{session_token}``, compared timing-safe."""
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        leaf_id, sep, token = value.strip().partition(":")
        if scheme.lower() != "bearer" or not sep or not leaf_id or not token or not header.isascii():
            raise HttpProblem(401, "Missing or malformed Authorization header; expected 'Bearer <leaf_id>:<session_token>'.")
        leaf = await self.blocking(self.store.get_leaf, leaf_id) if len(leaf_id) <= 128 else None
        expected = leaf.session_token if leaf is not None else self._dummy_token
        if not hmac.compare_digest(token.encode(), expected.encode()) or leaf is None:
            raise HttpProblem(401, "Unknown leaf id or wrong session token; use the leaf's credentials file.")
        return leaf

    def authenticate_admin(self, request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not header.isascii() \
                or not hmac.compare_digest(token.strip().encode(), self.store.admin_token.encode()):
            raise HttpProblem(401, "Admin API needs 'Authorization: Bearer <admin token>' (see <data_dir>/admin_token).")

    # -- signed download URLs -------------------------------------------------------------

    def sign(self, file_id: str, expires: int) -> str:
        return hmac.new(self.store.secret, f"{file_id}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def check_signature(self, file_id: str, expires: str, signature: str) -> None:
        if not is_decimal(expires) or not hmac.compare_digest(self.sign(file_id, int(expires)).encode(), signature.encode()):
            raise HttpProblem(403, "Download URL signature is invalid; ask /api/v1/file/download/{file_id} for a new URL.")
        if int(expires) < time.time():
            raise HttpProblem(403, "Download URL has expired; ask /api/v1/file/download/{file_id} for a new one.")

    # -- rounds ---------------------------------------------------------------------------

    async def accept_upload(self, leaf: Leaf, archive: wire.Archive, upload: "ReceivedUpload", metadata: str | None) -> str:
        """Check an upload against its round and commit it; aggregation follows in the background."""
        async with self.lock(leaf.branch_id):
            branch = await self.blocking(self.store.require_branch, leaf.branch_id)
            current = await self.blocking(self.store.open_round, branch.id)
            if branch.run_status != "start" or current is None:
                raise HttpProblem(409, run_blocked_message(branch))
            expected = await self.blocking(
                self.store.expected_specs, branch.id, current.run_number, current.round_index
            )
            specs, weighting = archive.specs, float(archive.weighting or 0)
            try:
                await self.blocking(wire.validate_upload, archive, expected)
            except ArchiveError as exc:
                raise HttpProblem(400, f"Upload rejected: {exc}") from exc
            finally:
                archive.layers.clear()  # they may view a memory map of the upload: unmap it before the rename
            try:
                file_id, replaced = await self.blocking(
                    self.store.commit_upload, upload.path, leaf=leaf, run_number=current.run_number,
                    round_index=current.round_index, weighting=weighting, specs=specs,
                    size=upload.size, sha256=upload.sha256.hex(), metadata=metadata,
                )
            except (RunNotStartedError, RoundClosedError) as exc:
                raise HttpProblem(409, str(exc)) from exc
        logger.info("leaf %s uploaded %s to branch %s run %d round %d", leaf.id, file_id, branch.id,
                    current.run_number, current.round_index)
        if replaced:
            self.spawn(self.blocking(self.store.remove_files, replaced))
        self.spawn(self.aggregate_if_ready(branch.id))
        return file_id

    async def aggregate_if_ready(self, branch_id: str, *, deadline: bool = False) -> str | None:
        """Aggregate the branch's open round if it is complete (or past its deadline); returns the id."""
        async with self.lock(branch_id):
            plan = await self.blocking(self._aggregation_plan, branch_id, deadline)
            if plan is None:
                return None
            branch, run_number, round_index, uploads = plan
            temp = self.store.new_temp_path()
            specs = uploads[0].specs
            try:
                size, digest = await self.blocking(
                    aggregate_files, [(u.path, u.weighting) for u in uploads], specs, temp, branch.algorithm
                )
                aggregate_id = await self.blocking(
                    self.store.commit_aggregate, temp, branch_id=branch_id, run_number=run_number,
                    round_index=round_index, specs=specs, size=size, sha256=digest,
                )
            except (AggregationError, LocalServerError, OSError) as exc:
                logger.error("aggregating branch %s run %d round %d failed: %s", branch_id, run_number, round_index, exc)
                return None
            finally:
                with contextlib.suppress(FileNotFoundError):
                    temp.unlink()
        await self.notifier.publish(branch.tree_id, branch_id, aggregation_message(aggregate_id))
        return aggregate_id

    def _aggregation_plan(self, branch_id: str, deadline: bool) -> tuple[Branch, int, int, list[UploadInput]] | None:
        """What to aggregate now, or None. Runs in a worker thread (several queries)."""
        branch = self.store.get_branch(branch_id)
        current = self.store.open_round(branch_id) if branch is not None else None
        if branch is None or current is None:
            return None
        uploads = self.store.round_uploads(branch_id, current.run_number, current.round_index)
        if not uploads:
            return None
        if deadline:
            due = branch.round_deadline_s is not None and current.first_upload_at is not None \
                and current.first_upload_at + branch.round_deadline_s <= time.time()
            if not due or branch.run_status != "start":
                return None
        elif len(uploads) < self.store.required_uploads(branch):
            return None
        return branch, current.run_number, current.round_index, uploads

    async def set_run_status(self, branch_id: str, status: str) -> Branch:
        async with self.lock(branch_id):
            branch = await self.blocking(self.store.set_run_status, branch_id, status)
        await self.notifier.publish(branch.tree_id, branch.id, run_status_message(status))
        if status == "start":
            self.spawn(self.aggregate_if_ready(branch.id))
        return branch

    async def recover(self) -> None:
        """Aggregate rounds that were complete when the server stopped; drop stray temp files."""
        await self.blocking(self.store.cleanup_stray_files)
        for branch in await self.blocking(self.store.list_branches):
            try:
                aggregate_id = await self.aggregate_if_ready(branch.id)
            except Exception:  # one broken branch must not keep the server from starting
                logger.exception("recovering branch %s failed; it stays as it was", branch.id)
                continue
            if aggregate_id:
                logger.info("recovered a complete round of branch %s as aggregate %s", branch.id, aggregate_id)

    async def deadline_loop(self) -> None:
        """Aggregate rounds whose deadline passed, checked every ``deadline_check_interval_s``."""
        while True:
            await asyncio.sleep(self.config.deadline_check_interval_s)
            try:
                for branch_id in await self.blocking(self.store.rounds_past_deadline):
                    await self.aggregate_if_ready(branch_id, deadline=True)
            except Exception:  # the loop must outlive one bad round
                logger.exception("round deadline check failed")


def run_blocked_message(branch: Branch) -> str:
    state = {"pause": "paused", "stop": "stopped"}.get(branch.run_status, branch.run_status)
    return (
        f"run is {state} (run_status {branch.run_status!r}, run {branch.run_number}); uploads are accepted only while run_status is "
        f"'start'. Wait for the run to start (the admin sets it with 'branchkey-local run start')."
    )


SERVER = web.AppKey("server", Server)


def server_of(request: web.Request) -> Server:
    return request.app[SERVER]


def is_decimal(text: str) -> bool:
    """ASCII digits only (``str.isdigit`` accepts '²', which ``int`` refuses)."""
    return text.isascii() and text.isdigit()


def check_file_id(file_id: str) -> str:
    if not is_file_id(file_id):
        raise HttpProblem(400, f"Invalid file id {file_id[:80]!r}; expected a plain token such as a UUID.")
    return file_id


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The raw body as a JSON object, whatever the Content-Type (the metrics call sends none)."""
    raw = await request.read()
    try:
        body = json.loads(raw.decode("utf-8")) if raw else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HttpProblem(400, f"Body is not JSON ({exc}); expected a JSON object.") from exc
    if not isinstance(body, dict):
        raise HttpProblem(400, f"Body is JSON {type(body).__name__}; expected a JSON object.")
    return body


def require_own_branch(leaf: Leaf, branch_id: str) -> None:
    if branch_id != leaf.branch_id:
        raise HttpProblem(403, f"Leaf {leaf.id} belongs to branch {leaf.branch_id}, not {branch_id[:80]!r}.")


# -- middleware -----------------------------------------------------------------------------


@web.middleware
async def error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every failure becomes ``{"error": text}`` with its status; unexpected ones are logged as 500."""
    try:
        if _UNSAFE_PATH.search(request.raw_path.split("?", 1)[0]):
            raise HttpProblem(400, "Request path holds '.', '..' or an encoded separator; ids are plain tokens.")
        return await handler(request)
    except HttpProblem as exc:
        return error_response(exc.status, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, f"{exc.reason}: {request.method} {request.path}. {_route_hint(exc.status)}")
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "Internal server error; the server log has the details.")


def _route_hint(status: int) -> str:
    if status == 404:
        return "Expected a route of PROTOCOL.md under /api/v1 or the admin API under /admin/v1."
    if status == 405:
        return "The route exists but not for this method."
    if status == 413:
        return "The body is larger than the server accepts."
    return ""


# -- leaf API -------------------------------------------------------------------------------


async def run_details(request: web.Request) -> web.Response:
    server = server_of(request)
    leaf = await server.authenticate(request)
    require_own_branch(leaf, request.match_info["branch_id"])
    branch = await server.blocking(server.store.require_branch, leaf.branch_id)
    return ok({"run_status": branch.run_status, "run_number": branch.run_number})


async def branch_config(request: web.Request) -> web.Response:
    server = server_of(request)
    leaf = await server.authenticate(request)
    require_own_branch(leaf, request.match_info["branch_id"])
    branch = await server.blocking(server.store.require_branch, leaf.branch_id)
    return ok({
        "branch": {"id": branch.id, "name": branch.name, "tree_id": branch.tree_id},
        "service": {
            "algorithm": branch.algorithm,
            "config": {"min_leaves": branch.min_leaves, "round_deadline_s": branch.round_deadline_s},
        },
        "model_config": {},
        "created_at": branch.created_at,
        "updated_at": branch.updated_at,
    })


@dataclass
class ReceivedUpload:
    path: Path
    size: int
    sha256: bytes
    data_text: str | None


async def upload_file(request: web.Request) -> web.Response:
    server = server_of(request)
    leaf = await server.authenticate(request)
    branch = await server.blocking(server.store.require_branch, leaf.branch_id)
    if branch.run_status != "start":
        raise HttpProblem(409, run_blocked_message(branch))
    declared_size, declared_digest = parse_integrity_headers(request, server.config.max_upload_bytes)
    temp = server.store.new_temp_path()
    try:
        upload = await receive_multipart(request, server, temp)
        check_integrity(upload, declared_size, declared_digest)
        metadata = parse_data_part(upload.data_text)
        archive = await decode_upload(server, upload.path)
        try:
            file_id = await server.accept_upload(leaf, archive, upload, metadata)
        finally:
            archive.layers.clear()  # views of the upload's memory map: unmap before the file is removed
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
    return ok({"file_id": file_id}, status=201)


def parse_integrity_headers(request: web.Request, limit: int) -> tuple[int | None, bytes | None]:
    """``x-bk-file-size`` and ``x-bk-file-digest: sha256=<base64>`` (3.x sends them; both optional)."""
    size: int | None = None
    digest: bytes | None = None
    raw_size = request.headers.get("x-bk-file-size")
    if raw_size is not None:
        if not is_decimal(raw_size.strip()):
            raise HttpProblem(400, f"x-bk-file-size must be a byte count. Received: {raw_size[:40]!r}")
        size = int(raw_size)
        if size > limit:
            raise HttpProblem(413, f"Upload of {size} bytes is larger than this server's limit of {limit} bytes.")
    raw_digest = request.headers.get("x-bk-file-digest")
    if raw_digest is not None:
        algorithm, _, encoded = raw_digest.strip().partition("=")
        try:
            digest = base64.b64decode(encoded, validate=True)
        except ValueError:
            digest = b""
        if algorithm.lower() != "sha256" or len(digest) != 32:
            raise HttpProblem(400, f"x-bk-file-digest must be 'sha256=<base64 of the SHA-256>'. Received: {raw_digest[:80]!r}")
    return size, digest


async def receive_multipart(request: web.Request, server: Server, temp: Path) -> ReceivedUpload:
    """Stream part ``file`` to ``temp`` (hashing as it goes) and read the small part ``data``."""
    if not request.content_type.startswith("multipart/"):
        raise HttpProblem(400, f"Expected a multipart/form-data body with parts 'file' and 'data'. Received: {request.content_type!r}")
    received: ReceivedUpload | None = None
    data_text: str | None = None
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or part.name not in ("file", "data"):
                await part.release()
            elif part.name == "file":
                if received is not None:
                    raise HttpProblem(400, "The multipart body holds part 'file' twice; expected it once.")
                received = await stream_part_to_file(request, part, server, temp)
            else:
                data_text = await read_small_part(part, 1 << 20)
    except ValueError as exc:  # aiohttp's multipart parser reports a malformed body as ValueError
        raise HttpProblem(400, f"Malformed multipart body ({exc}); expected multipart/form-data with parts 'file' and 'data'.") from exc
    if received is None:
        raise HttpProblem(400, "The multipart body has no part 'file'; expected the NPZ bytes in part 'file'.")
    received.data_text = data_text
    return received


async def stream_part_to_file(request: web.Request, part: BodyPartReader, server: Server, temp: Path) -> ReceivedUpload:
    """Write while reading: each batch of chunks goes to disk in a worker while the next one arrives.

    Chunks are read at 1 MiB (aiohttp copies each into a window with the previous one to find
    the boundary: small chunks keep those copies in cache) and handed over as a list, not joined.
    """
    limit = server.config.max_upload_bytes
    digest = hashlib.sha256()
    size = batched = 0
    batch: list[bytes] = []
    pending: asyncio.Future[None] | None = None
    with open(temp, "wb") as out:
        try:
            while chunk := await part.read_chunk(_READ_CHUNK):
                size += len(chunk)
                if size > limit:
                    await drain(request)
                    raise HttpProblem(413, f"Upload is larger than this server's limit of {limit} bytes.")
                batch.append(chunk)
                batched += len(chunk)
                if batched >= _CHUNK:
                    if pending is not None:
                        await pending
                    pending = asyncio.ensure_future(server.blocking(_write_and_hash, out, digest, batch))
                    batch, batched = [], 0
        finally:
            if pending is not None:
                await pending
        await server.blocking(_write_and_hash, out, digest, batch)
    return ReceivedUpload(temp, size, digest.digest(), None)


def _write_and_hash(out: Any, digest: Any, chunks: list[bytes]) -> None:
    for chunk in chunks:
        digest.update(chunk)
    out.writelines(chunks)
    out.flush()
    start_writeback(out.fileno())


async def drain(request: web.Request) -> None:
    """Read and drop the rest of a refused body so the client sees our answer, not a reset."""
    dropped = 0
    while dropped < _DRAIN_LIMIT and (chunk := await request.content.readany()):
        dropped += len(chunk)


async def read_small_part(part: BodyPartReader, limit: int) -> str:
    data = bytearray()
    while chunk := await part.read_chunk(65536):
        data += chunk
        if len(data) > limit:
            raise HttpProblem(400, f"Part {part.name!r} is larger than {limit} bytes; expected a small JSON text.")
    try:
        return data.decode(part.get_charset(default="utf-8"))
    except (UnicodeDecodeError, LookupError) as exc:
        raise HttpProblem(400, f"Part {part.name!r} is not UTF-8 text: {exc}") from exc


def check_integrity(upload: ReceivedUpload, size: int | None, digest: bytes | None) -> None:
    if size is not None and size != upload.size:
        raise HttpProblem(400, f"x-bk-file-size says {size} bytes but part 'file' holds {upload.size}; the upload is incomplete or altered.")
    if digest is not None and not hmac.compare_digest(digest, upload.sha256):
        raise HttpProblem(
            400, f"x-bk-file-digest does not match part 'file' (received sha256={base64.b64encode(upload.sha256).decode()}); "
            "the upload was altered in transit."
        )


def parse_data_part(text: str | None) -> str | None:
    """The upload's metadata as text: a string as sent (2.7.1 sends non-JSON), anything else as JSON."""
    if text is None:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HttpProblem(400, f"Part 'data' is not JSON ({exc}); expected {{\"leaf_name\": ..., \"metadata\": ...}}.") from exc
    if not isinstance(data, dict):
        raise HttpProblem(400, "Part 'data' must be a JSON object {\"leaf_name\": ..., \"metadata\": ...}.")
    metadata = data.get("metadata")
    if metadata is None or isinstance(metadata, str):
        return metadata
    return json.dumps(metadata)


async def decode_upload(server: Server, path: Path) -> wire.Archive:
    config = server.config
    try:
        return await server.blocking(
            _decode_mapped, path, max_members=config.max_members, max_total_bytes=config.max_total_bytes
        )
    except ArchiveTooLargeError as exc:
        raise HttpProblem(413, f"Upload rejected: {exc}") from exc
    except ArchiveError as exc:
        raise HttpProblem(400, f"Upload rejected: {exc}") from exc
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError, OSError) as exc:
        # wire.decode translates only BadZipFile; a corrupt deflate stream or an encrypted member lands here.
        raise HttpProblem(400, f"Upload rejected: not a readable NPZ archive ({type(exc).__name__}: {exc}).") from exc


def _decode_mapped(path: Path, **limits: int) -> wire.Archive:
    """Decode from a read-only memory map: stored layers are views of the page cache, not copies.

    Validation reads each layer once anyway; copying a 400 MB upload into fresh memory first
    cost more than the validation itself. ``accept_upload`` drops the views before the file is
    renamed, which unmaps it.
    """
    with open(path, "rb") as handle:
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)  # an empty file: ValueError
    return wire.decode(memoryview(mapping), **limits)


async def download_file(request: web.Request) -> web.Response:
    server = server_of(request)
    leaf = await server.authenticate(request)
    file_id = check_file_id(request.match_info["file_id"])
    record = await server.blocking(server.store.get_file, file_id)
    if record is None or record.branch_id != leaf.branch_id:
        raise HttpProblem(404, f"No file {file_id} in branch {leaf.branch_id}; expected an aggregation id or your own upload id.")
    if record.kind == "upload" and record.leaf_id != leaf.id:
        raise HttpProblem(403, f"File {file_id} is another leaf's upload; a leaf may download aggregates and its own uploads.")
    expires = int(time.time()) + server.config.download_ttl_s
    base = (server.config.public_url or f"{request.scheme}://{request.host}").rstrip("/")
    url = f"{base}/api/v1/file/blob/{file_id}?expires={expires}&signature={server.sign(file_id, expires)}"
    return ok({"download_url": url})


async def download_blob(request: web.Request) -> web.StreamResponse:
    server = server_of(request)
    file_id = check_file_id(request.match_info["file_id"])
    server.check_signature(file_id, request.query.get("expires", ""), request.query.get("signature", ""))
    record = await server.blocking(server.store.get_file, file_id)
    if record is None:
        raise HttpProblem(404, f"No file {file_id}.")
    return web.FileResponse(
        server.store.file_path(record),
        headers={"Content-Type": "application/octet-stream",
                 "Content-Disposition": f'attachment; filename="{file_id}.npz"'},
    )


async def performance_analysis(request: web.Request) -> web.Response:
    server = server_of(request)
    leaf = await server.authenticate(request)
    body = await read_json_object(request)
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
    aggregation_id = None if aggregation_id is None else str(aggregation_id)
    metric_id = await server.blocking(server.store.add_metric, mode=mode, aggregation_id=aggregation_id, leaf=leaf, data=data)
    return ok({"id": metric_id}, status=201)


async def ws_ticket(request: web.Request) -> web.Response:
    server = server_of(request)
    leaf = await server.authenticate(request)
    now = time.time()
    for ticket_id in [t for t, v in server.tickets.items() if v.expires_at < now]:
        del server.tickets[ticket_id]
    ticket_id, request_id = secrets.token_urlsafe(24), secrets.token_urlsafe(12)
    expires_at = now + server.config.ticket_ttl_s
    server.tickets[ticket_id] = Ticket(leaf, request_id, expires_at)
    expires_iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires_at))
    return ok({"ticket_id": ticket_id, "request_id": request_id, "expires_at": expires_iso})


async def websocket(request: web.Request) -> web.WebSocketResponse:
    server = server_of(request)
    ticket = server.tickets.pop(request.query.get("ticket", ""), None)
    if ticket is None or ticket.expires_at < time.time() or not hmac.compare_digest(
        request.query.get("request_id", "").encode(), ticket.request_id.encode()
    ):
        raise HttpProblem(401, "WebSocket needs a valid, unused, unexpired ticket; get one from POST /api/v1/ws/ticket.")
    socket = web.WebSocketResponse(heartbeat=30)
    await socket.prepare(request)
    server.notifier.register(ticket.leaf, socket)
    try:
        async for _ in socket:
            pass  # clients only listen; anything they send is ignored
    finally:
        server.notifier.unregister(ticket.leaf, socket)
    return socket


# -- admin API ------------------------------------------------------------------------------


def admin(handler: Callable[[web.Request, Server], Awaitable[web.Response]]) -> Callable[[web.Request], Awaitable[web.Response]]:
    """Wrap an admin handler: check the admin token, map store errors to 404/400."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.Response:
        server = server_of(request)
        server.authenticate_admin(request)
        try:
            return await handler(request, server)
        except RecordNotFoundError as exc:
            raise HttpProblem(404, str(exc)) from exc
        except InvalidValueError as exc:
            raise HttpProblem(400, str(exc)) from exc

    return wrapped


@admin
async def admin_create_tree(request: web.Request, server: Server) -> web.Response:
    body = await read_json_object(request)
    tree = await server.blocking(server.store.create_tree, body.get("name", "local"), body.get("owner_id"))
    return ok(tree, status=201)


@admin
async def admin_list_trees(request: web.Request, server: Server) -> web.Response:
    return ok({"trees": await server.blocking(server.store.list_trees)})


@admin
async def admin_create_branch(request: web.Request, server: Server) -> web.Response:
    body = await read_json_object(request)
    branch = await server.blocking(
        server.store.create_branch, request.match_info["tree_id"], body.get("name", "main"),
        min_leaves=body.get("min_leaves"), round_deadline_s=body.get("round_deadline_s"),
    )
    return ok(branch.to_dict(), status=201)


@admin
async def admin_list_branches(request: web.Request, server: Server) -> web.Response:
    branches = await server.blocking(server.store.list_branches)
    return ok({"branches": [b.to_dict() for b in branches]})


@admin
async def admin_get_branch(request: web.Request, server: Server) -> web.Response:
    branch = await server.blocking(server.store.require_branch, request.match_info["branch_id"])
    leaves = await server.blocking(server.store.list_leaves, branch.id)
    return ok({**branch.to_dict(), "leaves": [leaf.public() for leaf in leaves],
               "connected_websockets": server.notifier.connected(branch.id)})


@admin
async def admin_create_leaves(request: web.Request, server: Server) -> web.Response:
    body = await read_json_object(request)
    leaves = await server.blocking(
        server.store.create_leaves, request.match_info["branch_id"], body.get("count", 1),
        name_prefix=str(body.get("name_prefix", "leaf")),
    )
    await server.notifier.provision(leaves)
    return ok({"leaves": [leaf.credentials() for leaf in leaves]}, status=201)


@admin
async def admin_list_leaves(request: web.Request, server: Server) -> web.Response:
    branch = await server.blocking(server.store.require_branch, request.match_info["branch_id"])
    return ok({"leaves": [leaf.public() for leaf in await server.blocking(server.store.list_leaves, branch.id)]})


@admin
async def admin_set_run(request: web.Request, server: Server) -> web.Response:
    body = await read_json_object(request)
    branch = await server.set_run_status(request.match_info["branch_id"], body.get("run_status"))
    return ok({"branch_id": branch.id, "run_status": branch.run_status, "run_number": branch.run_number})


def _admin_listing(name: str, fetch: Callable[[Store, str], Any]) -> Callable[[web.Request], Awaitable[web.Response]]:
    @admin
    async def handler(request: web.Request, server: Server) -> web.Response:
        branch = await server.blocking(server.store.require_branch, request.match_info["branch_id"])
        return ok({name: await server.blocking(fetch, server.store, branch.id)})

    handler.__name__ = f"admin_list_{name}"
    return handler


# -- application ----------------------------------------------------------------------------


def create_app(
    data_dir: str | os.PathLike,
    *,
    amqp_url: str | None = None,
    amqp_management_url: str | None = None,
    public_url: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_members: int = wire.DEFAULT_MAX_MEMBERS,
    max_total_bytes: int = wire.DEFAULT_MAX_TOTAL_BYTES,
    download_ttl_s: int = DEFAULT_DOWNLOAD_TTL_S,
    ticket_ttl_s: int = DEFAULT_TICKET_TTL_S,
    deadline_check_interval_s: float = 1.0,
    workers: int = 8,
) -> web.Application:
    """Build the branchkey-local application over the store in ``data_dir`` (created if missing).

    Example:
        >>> import tempfile
        >>> app = create_app(tempfile.mkdtemp())
        >>> sorted(r.resource.canonical for r in app.router.routes() if r.method == "GET")[:2]
        ['/admin/v1/branches', '/admin/v1/branches/{branch_id}']
    """
    config = ServerConfig(public_url, max_upload_bytes, max_members, max_total_bytes, download_ttl_s,
                          ticket_ttl_s, deadline_check_interval_s)
    if amqp_url is not None and not amqp_url.startswith(("amqp://", "amqps://")):
        raise ValueError(f"Expected amqp_url like 'amqp://user:pass@host:5672/'. Received a value starting {amqp_url[:8]!r}")
    store = Store(data_dir)
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="branchkey-local")
    server = Server(store, Notifier(executor, amqp_url, amqp_management_url), executor, config)
    app = web.Application(middlewares=[error_middleware], client_max_size=16 * 1024**2)
    app[SERVER] = server
    add_routes(app)
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_close_websockets)
    return app


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/run/{branch_id}", run_details)
    app.router.add_post("/api/v1/file/upload", upload_file)
    app.router.add_get("/api/v1/file/download/{file_id}", download_file)
    app.router.add_get("/api/v1/file/blob/{file_id}", download_blob)
    app.router.add_post("/api/v1/performance/analysis", performance_analysis)
    app.router.add_get("/api/v1/config/branch/{branch_id}", branch_config)
    app.router.add_post("/api/v1/ws/ticket", ws_ticket)
    app.router.add_get("/api/v1/ws", websocket)
    app.router.add_post("/admin/v1/trees", admin_create_tree)
    app.router.add_get("/admin/v1/trees", admin_list_trees)
    app.router.add_post("/admin/v1/trees/{tree_id}/branches", admin_create_branch)
    app.router.add_get("/admin/v1/branches", admin_list_branches)
    app.router.add_get("/admin/v1/branches/{branch_id}", admin_get_branch)
    app.router.add_post("/admin/v1/branches/{branch_id}/leaves", admin_create_leaves)
    app.router.add_get("/admin/v1/branches/{branch_id}/leaves", admin_list_leaves)
    app.router.add_post("/admin/v1/branches/{branch_id}/run", admin_set_run)
    app.router.add_get("/admin/v1/branches/{branch_id}/rounds", _admin_listing("rounds", Store.list_rounds))
    app.router.add_get("/admin/v1/branches/{branch_id}/uploads", _admin_listing("uploads", Store.list_uploads))
    app.router.add_get("/admin/v1/branches/{branch_id}/aggregates",
                       _admin_listing("aggregates", lambda s, b: s.list_files(b, "aggregate")))
    app.router.add_get("/admin/v1/branches/{branch_id}/metrics", _admin_listing("metrics", Store.list_metrics))


async def _lifecycle(app: web.Application):  # type: ignore[no-untyped-def]
    """Startup: broker, recovery, deadline loop. Cleanup: wait for aggregations, release everything."""
    server = app[SERVER]
    try:
        await server.notifier.start(await server.blocking(server.store.list_leaves))
        await server.recover()
        deadlines = asyncio.ensure_future(server.deadline_loop())
    except BaseException:
        await _release(server)
        raise
    yield
    deadlines.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await deadlines
    await server.wait_for_tasks()
    await _release(server)


async def _release(server: Server) -> None:
    await server.notifier.close()
    server.executor.shutdown(wait=True)
    server.store.close()


async def _close_websockets(app: web.Application) -> None:
    for socket in app[SERVER].notifier.all_sockets():
        await socket.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")


__all__ = ["create_app", "ServerConfig", "Server", "HttpProblem", "SERVER"]
