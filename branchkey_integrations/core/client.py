"""The BranchKey REST client, with the method names and semantics of the official client.

A user of ``branchkey`` 2.7.1 finds the same calls here (``save_weights``,
``file_upload``, ``file_download``, ``send_performance_metrics``, ``queue``, ...),
plus what 3.x added (retries with backoff, timeouts, integrity headers, ``output_dir``,
``get_branch_config``, ``get_latest_aggregation_id``) and both notification transports.
Differences, on purpose: errors are typed (:mod:`.errors`) instead of bare ``Exception``,
and the client logs instead of printing.

Every HTTP call goes through :meth:`Client._request`, the one place where ``requests``
errors become :class:`BranchKeyError` subclasses.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import ipaddress
import json
import logging
import mmap
import os
import queue as queue_module
import secrets
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from http import HTTPStatus
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence, Union
from urllib.parse import urlsplit

import numpy as np
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from . import wire
from .credentials import Credentials, CredentialsLike
from .errors import (
    AggregationTimeoutError,
    ApiError,
    AuthenticationError,
    BranchKeyError,
    NotFoundError,
    PermissionDeniedError,
    ProtocolError,
    RequestRejectedError,
    RunBlockedError,
    ServerError,
    TransportError,
)
from .notifications import AmqpTransport, NotificationTransport, WebSocketTransport
from .protocol import (
    AGGREGATION_STATUS,
    DEFAULT_HOST,
    METRIC_MODES,
    RUN_STATUS,
    RUN_STATUSES,
    Notification,
    is_file_id,
)

logger = logging.getLogger(__name__)

DEFAULT_OUTPUT_DIR = "./aggregated_output"
TRANSPORTS = ("auto", "amqp", "websocket", "none")
RETRY_STATUSES = (408, 429, 500, 502, 503, 504)
_CHUNK = 1024 * 1024
Buffer = Union[bytes, memoryview]


def _client_version() -> str:
    from .. import __version__

    return __version__


def _error_class(status: int) -> type[ApiError]:
    if status == HTTPStatus.UNAUTHORIZED:
        return AuthenticationError
    if status == HTTPStatus.FORBIDDEN:
        return PermissionDeniedError
    if status == HTTPStatus.NOT_FOUND:
        return NotFoundError
    if status >= 500:
        return ServerError
    return RequestRejectedError


def _is_local_host(hostname: str) -> bool:
    """Loopback or private-network hosts: links fast enough that compressing costs more than it saves."""
    if hostname == "localhost" or hostname.endswith((".localhost", ".local")):
        return True
    try:
        address = ipaddress.ip_address(hostname)
    except ValueError:
        return False
    return address.is_loopback or address.is_private or address.is_link_local


def _file_chunks(path: str | os.PathLike) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk


class DownloadBuffer:
    """Memory for downloads that is kept from one round to the next.

    Writing into fresh memory is slow: 376 MB cost 0.2 s more here to download into new memory
    than into memory already written once. Pass one buffer to :meth:`Client.download_aggregate`
    round after round (:class:`~branchkey_integrations.core.federation.Federation` does): the
    arrays of each aggregate are views of it, valid until the next download into it, so copy
    what you keep.
    """

    def __init__(self) -> None:
        self._array: np.ndarray | None = None

    def take(self, size: int) -> memoryview:
        """``size`` writable bytes: the kept memory when it is large enough, else new memory (kept)."""
        if self._array is None or self._array.nbytes < size:
            self._array = None  # never hold the old and the new buffer at once
            self._array = _new_memory(size)
        return memoryview(self._array)[:size]

    @property
    def nbytes(self) -> int:
        return 0 if self._array is None else self._array.nbytes


def _new_memory(size: int) -> np.ndarray:
    """``size`` bytes of anonymous memory, its pages mapped in one call where the OS can (Linux).

    Measured at 376 MB: pages faulted in one by one as a ``bytearray`` is filled cost ~0.3 s;
    NumPy's huge pages cost 0.05 s or, when memory is fragmented, up to 1 s of compaction;
    ``MAP_POPULATE`` costs 0.15-0.2 s, every time.
    """
    populate = getattr(mmap, "MAP_POPULATE", None)
    if populate is None or size == 0:
        return np.empty(size, dtype=np.uint8)
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
    return np.frombuffer(region, dtype=np.uint8)  # the array keeps the mapping alive


class MultipartBody:
    """The upload's ``multipart/form-data`` body, produced while it is sent.

    It yields the preamble (part ``data``, then the headers of part ``file``), the archive's
    bytes straight from ``payload()`` (views of the arrays, or a file read in 1 MiB chunks),
    and the epilogue. ``len()`` is known in advance, so ``requests`` sends a Content-Length
    rather than chunked encoding; every ``iter()`` starts over, so a retried request sends
    the whole body again.
    """

    def __init__(self, data: str, filename: str, payload: Callable[[], Iterable[Buffer]], size: int) -> None:
        boundary = secrets.token_hex(16)
        self.content_type = f"multipart/form-data; boundary={boundary}"
        self._preamble = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="data"\r\n\r\n{data}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        self._epilogue = f"\r\n--{boundary}--\r\n".encode()
        self._payload = payload
        self._size = size

    def __len__(self) -> int:
        return len(self._preamble) + self._size + len(self._epilogue)

    def __iter__(self) -> Iterator[Buffer]:
        yield self._preamble
        yield from self._payload()
        yield self._epilogue


class Client:
    """A BranchKey leaf: REST calls plus a background notification consumer.

    Args:
        credentials: :class:`Credentials`, a dict of the six fields, a path to a JSON file,
            or None to read ``BRANCHKEY_*`` environment variables.
        host: the API host, ``https://app.branchkey.com`` or a ``branchkey-local`` URL.
        rbmq_host, rbmq_port: the RabbitMQ endpoint for AMQP notifications (default: the
            API host's hostname, port 5672), as in the official 2.7.1 client.
        ssl: verify TLS certificates.
        wait_for_run: when the run is paused or stopped, ``file_upload`` waits for
            ``start`` instead of raising :class:`RunBlockedError`.
        run_check_interval_s: how often a waiting upload re-reads the run status.
        proxies: a ``requests`` proxies dict.
        transport: ``"auto"`` (WebSocket where the platform offers tickets, else AMQP),
            ``"amqp"``, ``"websocket"`` or ``"none"`` (REST only).
        output_dir: where :meth:`file_download` writes ``{file_id}.npz``.
        timeout: seconds for each HTTP request (connect and read).
        max_retries, backoff_factor: retries on 408/429/5xx and connection errors,
            with exponential backoff ``backoff_factor * 2**n`` seconds.

    Raises:
        CredentialsError: a credential field is missing or malformed.
        ValueError: an argument has a value outside what is listed above.
        BranchKeyError: the run details could not be read (wrong host or token).

    Example:
        >>> from branchkey_integrations import Client
        >>> with Client("leaf_1.json", host="http://127.0.0.1:8080") as client:  # doctest: +SKIP
        ...     path = client.save_weights("model", weighting=120, parameters=[w, b])
        ...     client.file_upload(path)
        ...     aggregation_id = client.wait_for_aggregation(timeout=600)
        ...     client.file_download(aggregation_id)
    """

    def __init__(
        self,
        credentials: CredentialsLike | None,
        host: str = DEFAULT_HOST,
        rbmq_host: str | None = None,
        rbmq_port: int = 5672,
        ssl: bool = True,
        wait_for_run: bool = False,
        run_check_interval_s: float = 30,
        proxies: dict[str, str] | None = None,
        *,
        transport: str = "auto",
        output_dir: str | os.PathLike = DEFAULT_OUTPUT_DIR,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff_factor: float = 0.5,
    ) -> None:
        self._credentials = Credentials.load(credentials)
        self._api_host = self._checked_host(host)
        if transport not in TRANSPORTS:
            raise ValueError(f"Expected transport in {TRANSPORTS}. Received: transport={transport!r}")
        if not (isinstance(rbmq_port, int) and 0 < rbmq_port < 65536):
            raise ValueError(f"Expected rbmq_port between 1 and 65535. Received: rbmq_port={rbmq_port!r}")
        for name, value in (("run_check_interval_s", run_check_interval_s), ("timeout", timeout)):
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"Expected {name} > 0 seconds. Received: {name}={value!r}")
        if not (isinstance(max_retries, int) and max_retries >= 0):
            raise ValueError(f"Expected max_retries >= 0. Received: max_retries={max_retries!r}")
        self._rbmq_host = rbmq_host or urlsplit(self._api_host).hostname or "localhost"
        self._rbmq_port = rbmq_port
        self._verify = ssl
        self.proxies = proxies
        self._wait_for_run = wait_for_run
        self._run_check_interval_s = float(run_check_interval_s)
        self._output_dir = Path(output_dir)
        self._timeout = float(timeout)
        self._max_retries = max_retries
        self._session = self._make_session(max_retries, backoff_factor)

        self.queue: queue_module.LifoQueue[str] = queue_module.LifoQueue(maxsize=1)
        self._run_lock = threading.Condition()
        self._run_status: str | None = None
        self._run_number: int | None = None
        self._authenticated = False
        self._transport: NotificationTransport | None = None

        self.get_run_details()
        self._authenticated = True
        self._start_notifications(transport)

    # ----------------------------------------------------------------- set-up
    @staticmethod
    def _checked_host(host: str) -> str:
        parts = urlsplit(host or "")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"Expected host like 'https://app.branchkey.com' or 'http://127.0.0.1:8080'. Received: host={host!r}")
        return host.rstrip("/")

    @staticmethod
    def _make_session(max_retries: int, backoff_factor: float) -> requests.Session:
        retry = Retry(
            total=max_retries,
            connect=max_retries,
            read=max_retries,
            status=max_retries,
            backoff_factor=backoff_factor,
            status_forcelist=RETRY_STATUSES,
            allowed_methods=frozenset({"GET", "POST", "PUT"}),
            raise_on_status=False,
            respect_retry_after_header=True,
        )
        session = requests.Session()
        adapter = HTTPAdapter(max_retries=retry)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session

    def _start_notifications(self, transport: str) -> None:
        if transport == "auto":
            transport = self._detect_transport()
        if transport == "none":
            return
        if transport == "websocket":
            self._transport = WebSocketTransport(self._api_host, self.request_ws_ticket, verify_ssl=self._verify)
        else:
            c = self._credentials
            self._transport = AmqpTransport(self._rbmq_host, self._rbmq_port, c.id, c.session_token, c.tree_id)
        self._transport.start(self._on_notification)

    def _detect_transport(self) -> str:
        """WebSocket where the platform issues tickets (3.x, branchkey-local), else AMQP (2.x)."""
        try:
            self.request_ws_ticket()
        except (NotFoundError, RequestRejectedError) as exc:
            logger.info("transport=auto picked AMQP (%s:%s): the platform offers no WebSocket tickets (%s)",
                        self._rbmq_host, self._rbmq_port, exc.status_code)
            return "amqp"
        logger.info("transport=auto picked WebSocket: %s issues WebSocket tickets", self._api_host)
        return "websocket"

    # ------------------------------------------------------------------- HTTP
    def _headers(self, accept: str = "application/json") -> dict[str, str]:
        c = self._credentials
        return {"Authorization": f"Bearer {c.id}:{c.session_token}", "accept": accept, "LEAF": "true"}

    def _request(self, method: str, path: str, *, expected: int = HTTPStatus.OK,
                 accept: str = "application/json", **kwargs: Any) -> requests.Response:
        """Send one authenticated request; translate every failure into a BranchKeyError."""
        url = self._api_host + path
        headers = {**self._headers(accept), **kwargs.pop("headers", {})}
        try:
            response = self._session.request(method, url, headers=headers, verify=self._verify,
                                             proxies=self.proxies, timeout=self._timeout, **kwargs)
        except requests.exceptions.RetryError as exc:
            raise ServerError(f"{method} {path} kept failing after retries: {exc}", 503) from exc
        except requests.exceptions.RequestException as exc:
            raise TransportError(f"{method} {url} failed: {exc}") from exc
        if response.status_code != expected:
            text = self._error_text(response)
            if response.status_code in RETRY_STATUSES:
                text += f" (still failing after {self._max_retries} retries)"
            raise _error_class(response.status_code)(f"{method} {path}: {text}", response.status_code)
        return response

    @staticmethod
    def _error_text(response: requests.Response) -> str:
        try:
            body = response.json()
        except ValueError:
            return response.text[:300] or response.reason
        if isinstance(body, dict) and "error" in body:
            return str(body["error"])
        return str(body)[:300]

    @staticmethod
    def _data(response: requests.Response, context: str) -> dict[str, Any]:
        try:
            data = response.json()["data"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ProtocolError(f"{context}: expected JSON {{'data': {{...}}}}, got {response.text[:200]!r}") from exc
        if not isinstance(data, dict):
            raise ProtocolError(f"{context}: 'data' is not an object: {data!r}")
        return data

    # ------------------------------------------------------------- run status
    def get_run_details(self) -> dict[str, Any]:
        """Read the run status and number of this leaf's branch (and remember them)."""
        data = self._data(self._request("GET", f"/api/v1/run/{self.branch_id}"), "run details")
        if data.get("run_status") not in RUN_STATUSES or not isinstance(data.get("run_number"), int):
            raise ProtocolError(f"run details: unexpected answer {data!r}")
        self._set_run_status(data["run_status"], data["run_number"])
        return data

    def _set_run_status(self, status: str, number: int | None = None) -> None:
        with self._run_lock:
            changed = status != self._run_status
            self._run_status = status
            if number is not None:
                self._run_number = number
            self._run_lock.notify_all()
        if changed:
            logger.info("Run of branch %s is now %r (run %s)", self.branch_id, status, self._run_number)

    def wait_for_run_start(self, timeout: float | None = None) -> None:
        """Block until the run is in ``start``; re-read it every ``run_check_interval_s``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._run_lock:
            while self._run_status != "start":
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise RunBlockedError(f"run is blocked: still {self._run_status!r} after {timeout} s")
                logger.info("run is %r: waiting for start (re-checking every %.0f s)",
                            self._run_status, self._run_check_interval_s)
                interval = self._run_check_interval_s if remaining is None else min(remaining, self._run_check_interval_s)
                if self._run_lock.wait(interval):
                    continue
                self._run_lock.release()
                try:
                    self.get_run_details()
                finally:
                    self._run_lock.acquire()

    def _ensure_run_started(self) -> None:
        if self._run_status == "start":
            return
        if not self._wait_for_run:
            raise RunBlockedError(
                f"run is blocked: branch {self.branch_id} is {self._run_status!r}. Start the run, or create the "
                "client with wait_for_run=True to wait for it."
            )
        self.wait_for_run_start()

    # ----------------------------------------------------------- notifications
    def _on_notification(self, notification: Notification) -> None:
        if notification.message_type == AGGREGATION_STATUS:
            self._put_latest(notification.body["aggregation_id"])
        elif notification.message_type == RUN_STATUS:
            status = notification.body["run_status"]
            self._set_run_status(status)
            if status == "start":
                try:
                    self.get_run_details()  # the run number may have moved on
                except BranchKeyError as exc:
                    logger.warning("Could not re-read the run details after 'start': %s", exc)

    def _put_latest(self, aggregation_id: str) -> None:
        """Keep only the newest aggregation id, as the official client's LIFO queue of size 1 does."""
        while True:
            try:
                self.queue.put_nowait(aggregation_id)
                break
            except queue_module.Full:
                try:
                    dropped = self.queue.get_nowait()
                    logger.debug("Replacing unread aggregation %s with %s", dropped, aggregation_id)
                except queue_module.Empty:
                    pass
        logger.info("Aggregation %s is ready", aggregation_id)

    def get_latest_aggregation_id(self) -> str | None:
        """The newest aggregation id received and not yet taken, or None (does not block)."""
        try:
            return self.queue.get_nowait()
        except queue_module.Empty:
            return None

    def wait_for_aggregation(self, timeout: float | None = None) -> str:
        """Block until an aggregation id arrives; :class:`AggregationTimeoutError` after ``timeout`` s."""
        try:
            return self.queue.get(timeout=timeout)
        except queue_module.Empty:
            raise AggregationTimeoutError(
                f"No aggregate for branch {self.branch_id} within {timeout} s "
                f"(notifications: {self.transport or 'none'})."
            ) from None

    def request_ws_ticket(self) -> tuple[str, str]:
        """``POST /api/v1/ws/ticket``: a fresh single-use ticket for the WebSocket."""
        data = self._data(self._request("POST", "/api/v1/ws/ticket"), "WebSocket ticket")
        try:
            return str(data["ticket_id"]), str(data["request_id"])
        except KeyError as exc:
            raise ProtocolError(f"WebSocket ticket: missing {exc} in {sorted(data)}") from None

    # ------------------------------------------------------------------ files
    def convert_pytorch_numpy(self, model: Iterable[Any], weighting: float = 1) -> tuple[float, list[np.ndarray]]:
        """Turn ``model.named_parameters()`` into ``(weighting, [arrays])``; bf16 becomes float32."""
        params = []
        for item in model:
            tensor = item[1] if isinstance(item, tuple) else item
            tensor = tensor.detach().cpu()
            if str(tensor.dtype) == "torch.bfloat16":
                tensor = tensor.float()
            params.append(tensor.numpy())
        return weighting, params

    def save_weights(self, file_path: str | os.PathLike, weighting: float,
                     parameters: Sequence[np.ndarray], *, compression: str = "deflate") -> str:
        """Write a BranchKey NPZ (``.npz`` is appended when missing) and return its path."""
        path = str(file_path)
        if not path.endswith(".npz"):
            path += ".npz"
        wire.encode(parameters, weighting, path, compression=compression)
        return path

    def validate_weight_shape(self, file: BinaryIO) -> bool:
        """Check an upload archive before sending it (as the official client does); rewinds ``file``."""
        wire.validate_upload(wire.decode(file))
        file.seek(0)
        return True

    def file_upload(self, file_path: str | os.PathLike) -> str:
        """Upload an NPZ written by :meth:`save_weights`; return the platform's ``file_id``."""
        self._ensure_run_started()
        with open(file_path, "rb") as f:
            self.validate_weight_shape(f)
            size, digest = self._size_and_digest(f)
        return self._post_upload(functools.partial(_file_chunks, file_path), Path(file_path).name, size, digest)

    def upload_weights(self, weighting: float, parameters: Sequence[np.ndarray], *, compression: str = "auto",
                       compresslevel: int | None = None) -> str:
        """Encode and upload in one step, streaming from the arrays themselves; return the ``file_id``.

        ``compression="auto"`` stores members on loopback and private-network hosts, and
        deflates them at level 1 elsewhere when isal is installed. Deflate saves ~7.5 % of the
        bytes of float weights; with isal on 2 cores it pays off below ~50 MB/s (~400 Mbit/s)
        of upload bandwidth, with plain zlib only below ~4 MB/s, so without isal "auto" stores.
        ``"none"`` or ``"deflate"`` (with ``compresslevel``) force a choice. The arrays must not
        change until this returns: the body is sent from them directly.
        """
        self._ensure_run_started()
        wire.check_weighting(weighting)
        archive = wire.prepare(parameters, weighting, compression=self._compression_for(compression),
                               compresslevel=compresslevel)
        # The digest header must precede the body, so hashing is on the critical path; the finite check
        # runs beside it (both release the GIL), which hides it on a machine with two cores.
        with ThreadPoolExecutor(max_workers=1) as pool:
            hashing = pool.submit(archive.sha256)
            wire.check_finite(parameters)
            digest = base64.b64encode(hashing.result()).decode()
        return self._post_upload(archive.chunks, "weights.npz", archive.size, digest)

    def _compression_for(self, compression: str) -> str:
        if compression not in ("auto", *wire.COMPRESSIONS):
            raise ValueError(f"Expected compression in ('auto', 'deflate', 'none'). Received: compression={compression!r}")
        if compression != "auto":
            return compression
        if wire.FAST_DEFLATE and not _is_local_host(urlsplit(self._api_host).hostname or ""):
            return "deflate"
        return "none"

    @staticmethod
    def _size_and_digest(f: BinaryIO) -> tuple[int, str]:
        sha, size = hashlib.sha256(), 0
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            sha.update(chunk)
            size += len(chunk)
        f.seek(0)
        return size, base64.b64encode(sha.digest()).decode()

    def _post_upload(self, payload: Callable[[], Iterable[Buffer]], filename: str, size: int, digest: str) -> str:
        metadata = {
            "client_version": f"branchkey-integrations/{_client_version()}",
            "timestamp": datetime.now(timezone.utc).isoformat(),
            "file_size": size,
            "file_digest": f"sha256={digest}",
            "kind": wire.KIND_FEDERATED_LEARNING,
        }
        data = json.dumps({"leaf_name": self.name, "metadata": json.dumps(metadata)})
        body = MultipartBody(data, filename, payload, size)
        headers = {"x-bk-file-size": str(size), "x-bk-file-digest": f"sha256={digest}",
                   "Content-Type": body.content_type}
        response = self._request("POST", "/api/v1/file/upload", expected=HTTPStatus.CREATED, headers=headers,
                                 data=body)
        file_id = self._data(response, "upload").get("file_id")
        if not isinstance(file_id, str) or not file_id:
            raise ProtocolError(f"upload: no file_id in {response.text[:200]!r}")
        logger.info("Uploaded %s (%.2f MB) as %s", filename, size / 1e6, file_id)
        return file_id

    @staticmethod
    def _checked_file_id(file_id: str) -> str:
        if not is_file_id(file_id):
            raise ValueError(
                f"Invalid file_id {file_id!r}: expected letters, digits, '.', '_' or '-' only "
                "(no path separators or '..')."
            )
        return file_id

    def _download_url(self, file_id: str) -> str:
        response = self._request("GET", f"/api/v1/file/download/{file_id}", accept="*/*")
        url = self._data(response, "download").get("download_url")
        if not isinstance(url, str) or not url:
            raise ProtocolError(f"download: no download_url in {response.text[:200]!r}")
        return url

    @contextlib.contextmanager
    def _get_blob(self, url: str) -> Iterator[requests.Response]:
        """GET the signed URL (no auth headers), streamed; HTTP and transport errors become BranchKeyErrors."""
        try:
            with self._session.get(url, stream=True, verify=self._verify, proxies=self.proxies,
                                   timeout=self._timeout) as response:
                if response.status_code != HTTPStatus.OK:
                    raise _error_class(response.status_code)(f"GET download_url: {self._error_text(response)}",
                                                             response.status_code)
                yield response
        except requests.exceptions.RequestException as exc:
            raise TransportError(f"Downloading {urlsplit(url).path} failed: {exc}") from exc

    def _stream(self, url: str, sink: BinaryIO) -> int:
        """GET the signed URL into ``sink`` in 1 MiB chunks; return the byte count."""
        size = 0
        with self._get_blob(url) as response:
            for chunk in response.iter_content(_CHUNK):
                sink.write(chunk)
                size += len(chunk)
        if size == 0:
            raise ProtocolError("download: file not received (empty body)")
        return size

    def _fetch(self, url: str, buffer: DownloadBuffer) -> memoryview:
        """GET the signed URL into ``buffer``, sized from Content-Length, in 1 MiB chunks."""
        with self._get_blob(url) as response:
            declared = response.headers.get("Content-Length", "")
            if not declared.isdigit() or "Content-Encoding" in response.headers:  # size unknown: grow
                grown = bytearray()
                for chunk in response.iter_content(_CHUNK):
                    grown += chunk
                view, size = memoryview(grown), len(grown)
            else:
                view = buffer.take(int(declared))
                size = 0
                for chunk in response.iter_content(_CHUNK):
                    if size + len(chunk) > len(view):
                        raise ProtocolError(f"download: more bytes than the declared {declared}")
                    view[size:size + len(chunk)] = chunk
                    size += len(chunk)
        if size == 0:
            raise ProtocolError("download: file not received (empty body)")
        if size != len(view):
            raise TransportError(f"download: received {size} of {declared} bytes; the connection was cut")
        return view

    def file_download(self, file_id: str) -> str:
        """Download an aggregate to ``{output_dir}/{file_id}.npz``; return that path.

        The file id is checked before anything touches the disk, so an id such as
        ``../x`` can never write outside ``output_dir``. The file appears atomically.
        """
        self._checked_file_id(file_id)
        url = self._download_url(file_id)
        self._output_dir.mkdir(parents=True, exist_ok=True)
        target = self._output_dir / f"{file_id}.npz"
        fd, tmp = tempfile.mkstemp(dir=self._output_dir, prefix=".download-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as sink:
                size = self._stream(url, sink)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        logger.info("Downloaded %s (%.2f MB) to %s", file_id, size / 1e6, target)
        return str(target)

    def download_aggregate(self, file_id: str, *, buffer: DownloadBuffer | None = None) -> wire.Archive:
        """Download and decode an aggregate in memory (no file left behind).

        The layers of a stored aggregate are views of the one download buffer: no copies. Give a
        :class:`DownloadBuffer` to reuse its memory (the previous download's layers are then
        overwritten); without one, each call downloads into new memory.
        """
        self._checked_file_id(file_id)
        return wire.decode(self._fetch(self._download_url(file_id), buffer or DownloadBuffer()))

    # ---------------------------------------------------------------- metrics
    def send_performance_metrics(self, aggregation_id: str, data: str | dict[str, Any], mode: str) -> bool:
        """Send metrics for an aggregation; return False (and log why) when the platform refused them."""
        if mode not in METRIC_MODES:
            raise ValueError(f"Expected mode in {METRIC_MODES}. Received: mode={mode!r}")
        text = data if isinstance(data, str) else json.dumps(data)
        c = self._credentials
        payload = json.dumps({"mode": mode, "aggregation_id": aggregation_id, "leaf_id": c.id,
                              "branch_id": c.branch_id, "tree_id": c.tree_id, "data": text})
        try:
            self._request("POST", "/api/v1/performance/analysis", expected=HTTPStatus.CREATED, data=payload)
        except BranchKeyError as exc:
            logger.error("Sending performance metrics for aggregation %s failed: %s", aggregation_id, exc)
            return False
        return True

    def get_branch_config(self) -> dict[str, Any]:
        """``GET /api/v1/config/branch/{branch_id}``: branch, service and model_config."""
        return self._data(self._request("GET", f"/api/v1/config/branch/{self.branch_id}"), "branch config")

    def disable_ssl_verification(self, enabled: bool = False) -> bool:
        """Turn certificate verification off (or on again); kept for parity with the official client."""
        warnings.warn("[BranchKey] We highly recommend enabling ssl verification. Use this at your own risk.",
                      stacklevel=2)
        self._verify = enabled
        return self._verify

    # ------------------------------------------------------------- properties
    @property
    def credentials(self) -> Credentials:
        return self._credentials

    @property
    def leaf_id(self) -> str:
        return self._credentials.id

    @property
    def name(self) -> str:
        return self._credentials.name

    @property
    def branch_id(self) -> str:
        return self._credentials.branch_id

    @property
    def tree_id(self) -> str:
        return self._credentials.tree_id

    @property
    def user_id(self) -> str:
        return self._credentials.owner_id

    @property
    def host(self) -> str:
        return self._api_host

    @property
    def ssl(self) -> bool:
        return self._verify

    @property
    def output_dir(self) -> str:
        return str(self._output_dir)

    @property
    def is_authenticated(self) -> bool:
        return self._authenticated

    @property
    def run_status(self) -> str | None:
        return self._run_status

    @property
    def run_number(self) -> int | None:
        return self._run_number

    @property
    def transport(self) -> str | None:
        """``"amqp"``, ``"websocket"``, or None when notifications are off."""
        return self._transport.name if self._transport else None

    @property
    def notifications(self) -> NotificationTransport | None:
        return self._transport

    def __repr__(self) -> str:
        return (f"Client(leaf={self.name!r}, id={self.leaf_id!r}, branch={self.branch_id!r}, "
                f"host={self._api_host!r}, transport={self.transport!r})")

    # -------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Stop the notification consumer and release connections; safe to call twice."""
        if self._transport is not None:
            self._transport.close()
        self._session.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


__all__ = ["Client", "DownloadBuffer", "MultipartBody", "TRANSPORTS"]
