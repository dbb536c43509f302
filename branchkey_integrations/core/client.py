"""The BranchKey protocol calls of a leaf, with the method names and semantics of the official client.

A user of ``branchkey`` 2.7.1 finds the same calls here (``save_weights``,
``file_upload``, ``file_download``, ``send_performance_metrics``, ``queue``, ...),
plus what 3.x added (retries with backoff, timeouts, integrity headers, ``output_dir``,
``get_branch_config``, ``get_latest_aggregation_id``, federated analytics' ``save_fields`` and
``save_analytics``: :class:`~.client_payloads.PayloadCalls`) and both notification transports.
Differences, on purpose: errors are typed (:mod:`.errors`) instead of bare ``Exception``,
and the client logs instead of printing.

This module owns the calls of PROTOCOL.md and their bodies, and nothing under them: HTTP
(session, retries, error translation) is :mod:`.http`, moving bytes (the streamed upload body,
download memory) is :mod:`.transfer`, what a download may cost is :mod:`.download`, the run status
and aggregation ids it waits on are a :class:`~.waiter.RoundWaiter`, and its settings are a
:class:`~.client_options.ClientOptions`, checked once when made; its read-only properties are
:class:`~.client_properties.ClientProperties`.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import logging
import os
import time
import uuid
import warnings
from datetime import datetime, timezone
from http import HTTPStatus
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence
from urllib.parse import urlsplit

import numpy as np

from . import wire
from .client_options import TRANSPORTS, ClientOptions, check_client_options, check_host
from .credentials import Credentials, CredentialsLike
from .download import Downloads, checked_file_id
from .client_payloads import PayloadCalls
from .client_properties import ClientProperties
from .delta import DELTA_BASE_KEY
from .errors import (AggregationTimeoutError, BranchKeyError, NotFoundError, ProtocolError, RequestRejectedError,
                     RunBlockedError)
from .http import Away, HttpSession
from .notifications import NotificationTransport, start_transport
from .protocol import (
    AGGREGATION_STATUS, BRANCH_CONFIG_PATH, DEFAULT_HOST, FILE_DIGEST_HEADER, FILE_SIZE_HEADER, IDEMPOTENCY_KEY_HEADER,
    KIND_FEDERATED_ANALYTICS, KIND_FEDERATED_LEARNING, METRIC_MODES, METRICS_PATH, ROUND_PATH, RUN_PATH, RUN_STATUS,
    RUN_STATUSES, START, UPLOAD_PATH, WS_TICKET_PATH, Notification, is_file_id,
)
from .progress import RoundView, UploadReceipt, parse_round_view
from .transfer import Buffer, DownloadBuffer, MultipartBody, file_chunks, size_and_digest
from .streamed_archive import StreamedArchive
from .streamed_upload import UploadArchive, encode_upload
from .upload_encoding import UploadEncoding
from .version import __version__
from .waiter import Every, RoundWaiter
from .watch import find_missed_aggregate

logger = logging.getLogger(__name__)


class Client(ClientProperties, PayloadCalls):
    """A BranchKey leaf: REST calls plus a background notification consumer.

    Args:
        credentials: :class:`Credentials`, a dict of the six fields, a path to a JSON file,
            or None to read ``BRANCHKEY_*`` environment variables.
        host: the API host, ``https://app.branchkey.com`` or a ``branchkey-local`` URL.
        rbmq_host, rbmq_port: the RabbitMQ endpoint for AMQP notifications (default: the API host's hostname,
            port 5672), as in 2.7.1; ``rbmq_host="amqps://host[:5671]"``: AMQP over TLS, verified as ``ssl`` says.
        ssl: verify TLS certificates (or the path of a CA bundle to verify them with).
        cert: a client certificate for mutual TLS, ``(certificate file, key file)`` (REST, WebSocket, amqps).
        wait_for_run: when the run is paused or stopped, ``file_upload`` waits for
            ``start`` instead of raising :class:`RunBlockedError`.
        run_check_interval_s: how often a waiting upload re-reads the run status.
        proxies: a ``requests`` proxies dict.
        transport: ``"auto"`` (WebSocket where the platform offers tickets, else AMQP),
            ``"amqp"``, ``"websocket"`` or ``"none"`` (REST only).
        output_dir: where :meth:`file_download` writes ``{file_id}.npz``.
        request_timeout: seconds for each HTTP request (connect and read).
        max_retries, backoff_factor: retries on 408/429/5xx and connection errors,
            with exponential backoff ``backoff_factor * 2**n`` seconds (for longer, see :meth:`retrying_until`).
        max_download_bytes: the most an aggregate may hold; None: 4 times what this leaf uploaded plus
            1 MiB (see :class:`~.download.Downloads`). Beyond it a download is refused (``ArchiveTooLargeError``).
        download_timeout: seconds a whole download may take (``DownloadTimeoutError`` after).
        compression, quantize, error_feedback, download_codec: how uploads (and aggregates, download_codec) are
            encoded: lossless by link, lossy only when asked and the branch accepts it (:mod:`~.codec_choice`).
        delta: ``"auto"``, True or False: uploads as the difference from the aggregate downloaded last, where the
            branch takes them (``"auto"``: with a codec other than stored and deflate; :mod:`~.delta`).
        timeout: the old name of ``request_timeout`` (a ``DeprecationWarning``).

    The defaults are :class:`ClientOptions`'; after an upload, :attr:`last_upload` is its :class:`UploadReceipt`.

    Raises:
        CredentialsError: a credential field is missing or malformed.
        ValueError: an argument has a value outside what is listed above
            (see :func:`~.client_options.check_client_options`).
        BranchKeyError: the run details could not be read (wrong host or token).

    Example (skipped: it needs a running branchkey-local and credentials; tests/integration runs it):
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
        host: str = ClientOptions.host,
        rbmq_host: str | None = ClientOptions.rbmq_host,
        rbmq_port: int = ClientOptions.rbmq_port,
        ssl: bool = ClientOptions.ssl,
        wait_for_run: bool = ClientOptions.wait_for_run,
        run_check_interval_s: float = ClientOptions.run_check_interval_s,
        proxies: dict[str, str] | None = ClientOptions.proxies,
        *,
        transport: str = ClientOptions.transport,
        output_dir: str | os.PathLike = ClientOptions.output_dir,
        request_timeout: float = ClientOptions.request_timeout,
        max_retries: int = ClientOptions.max_retries,
        backoff_factor: float = ClientOptions.backoff_factor,
        max_download_bytes: int | None = ClientOptions.max_download_bytes,
        download_timeout: float = ClientOptions.download_timeout,
        cert: str | tuple[str, str] | None = ClientOptions.cert,
        compression: str = ClientOptions.compression,
        quantize: str | None = ClientOptions.quantize,
        error_feedback: bool = ClientOptions.error_feedback,
        download_codec: str | None = ClientOptions.download_codec,
        delta: str | bool = ClientOptions.delta,
        timeout: float | None = None,
    ) -> None:
        options = {"host": host, "rbmq_host": rbmq_host, "rbmq_port": rbmq_port, "ssl": ssl, "wait_for_run": wait_for_run,
                   "run_check_interval_s": run_check_interval_s, "proxies": proxies, "transport": transport,
                   "output_dir": output_dir, "request_timeout": request_timeout, "max_retries": max_retries,
                   "backoff_factor": backoff_factor, "max_download_bytes": max_download_bytes,
                   "download_timeout": download_timeout, "cert": cert, "compression": compression,
                   "quantize": quantize, "error_feedback": error_feedback, "download_codec": download_codec,
                   "delta": delta}
        if timeout is not None:  # the old name: ClientOptions.checked warns (and refuses both names at once)
            options = {**{k: v for k, v in options.items() if k != "request_timeout" or v != ClientOptions.request_timeout},
                       "timeout": timeout}
        self._start(Credentials.load(credentials), ClientOptions.checked(options))

    @classmethod
    def from_options(cls, credentials: CredentialsLike | None, options: ClientOptions) -> Client:
        """A client of ``options``, checked when they were made (:class:`~.federation.Federation` connects so)."""
        client = cls.__new__(cls)
        client._start(Credentials.load(credentials), options)
        return client

    def _start(self, credentials: Credentials, settings: ClientOptions) -> None:
        self._credentials = c = credentials
        self.options = settings  # read-only: checked when made
        self._api_host = settings.host
        self._output_dir = Path(settings.output_dir)
        self._http = HttpSession(self._api_host, {"Authorization": f"Bearer {c.id}:{c.session_token}", "LEAF": "true"},
                                 **settings.http_settings())
        self._downloads = Downloads(self._http, self._output_dir, max_bytes=settings.max_download_bytes,
                                    timeout_s=settings.download_timeout)
        self._waiter = RoundWaiter(c.branch_id)
        self.queue = self._waiter.queue  # 2.7.1's LifoQueue(maxsize=1): the newest unread aggregation id
        self._authenticated = False
        self._transport: NotificationTransport | None = None
        self._round_endpoint = True  # False once the platform answered 404: it has no round view
        self._upload_mark = 0  # aggregation ids received before the last upload
        self._upload_round: tuple[int, int] | None = None  # the round wait_for_aggregation waits on, if said
        self.last_upload: UploadReceipt | None = None  # what the last upload was, and where it went
        self.encoding = UploadEncoding(settings, urlsplit(self._api_host).hostname or "", self.get_branch_config)

        self.get_run_details()
        self._authenticated = True
        self._start_notifications(settings.transport)

    # ----------------------------------------------------------------- set-up
    def _start_notifications(self, transport: str) -> None:
        c = self._credentials
        self._transport = start_transport(
            transport, self.options, self.request_ws_ticket, verify_ssl=self.ssl,
            amqp_login=(c.id, c.session_token, c.tree_id), handler=self._on_notification,
            # after a (re)connect, waits ask the server at once: a notification sent while away may be lost
            on_connect=self._waiter.request_refresh)

    # ------------------------------------------------------------- run status
    def get_run_details(self, *, once: bool = False) -> dict[str, Any]:
        """Read the run status and number of this leaf's branch (and remember them); ``once``: no retries."""
        data = self._http.request_data("GET", RUN_PATH.format(branch_id=self.branch_id), "run details", once=once)
        if data.get("run_status") not in RUN_STATUSES or not isinstance(data.get("run_number"), int):
            raise ProtocolError(f"run details: unexpected answer {data!r}")
        self._set_run_status(data["run_status"], data["run_number"])
        return data

    def _set_run_status(self, status: str, number: int | None = None) -> None:
        if self._waiter.set_run(status, number):
            logger.info("Run of branch %s is now %r (run %s)", self.branch_id, status, self.run_number)

    def wait_for_run_start(self, timeout: float | None = None) -> None:
        """Block until the run is in ``start``; re-read it every ``run_check_interval_s``.

        A ``start`` notification ends the wait at once; :class:`RunBlockedError` after ``timeout`` s.
        """
        if self.run_status == START:
            return
        logger.info("run is %r: waiting for start (re-checking every %.0f s)", self.run_status,
                    self.options.run_check_interval_s)
        deadline = None if timeout is None else time.monotonic() + timeout
        recheck = Every(self.options.run_check_interval_s, lambda waited: self.get_run_details())
        if not self._waiter.wait_for_start(deadline, [recheck]):
            raise RunBlockedError(f"run is blocked: still {self.run_status!r} after {timeout} s")

    def _ensure_run_started(self) -> None:
        if self.run_status == START:
            return
        if not self.options.wait_for_run:
            raise RunBlockedError(
                f"run is blocked: branch {self.branch_id} is {self.run_status!r}. Start the run, or create the "
                "client with wait_for_run=True to wait for it."
            )
        self.wait_for_run_start()

    # ----------------------------------------------------------- notifications
    def _on_notification(self, notification: Notification) -> None:
        if notification.message_type == AGGREGATION_STATUS:
            aggregation_id, kind = notification.body["aggregation_id"], notification.body.get("kind")
            if kind not in (None, KIND_FEDERATED_LEARNING, KIND_FEDERATED_ANALYTICS):  # never taken for a model
                logger.warning("Ignoring aggregate %s of payload kind %r, which this version does not know",
                               aggregation_id, kind)
            elif self._waiter.add_aggregation(aggregation_id, notification.run_number, notification.round_index,
                                              kind=kind or KIND_FEDERATED_LEARNING):
                logger.info("Aggregation %s (%s) is ready", aggregation_id, kind or KIND_FEDERATED_LEARNING)
        elif notification.message_type == RUN_STATUS:
            status = notification.body["run_status"]
            self._set_run_status(status)
            if status == START:
                try:
                    self.get_run_details()  # the run number may have moved on
                except BranchKeyError as exc:
                    logger.warning("Could not re-read the run details after 'start': %s", exc)

    def get_latest_aggregation_id(self) -> str | None:
        """The newest aggregation id received and not yet taken, or None (does not block)."""
        return self._waiter.take_latest()

    def wait_for_aggregation(self, timeout: float | None = None, *, check_every_s: float = 5.0) -> str:
        """Block until an aggregation id arrives; :class:`AggregationTimeoutError` after ``timeout`` s.

        After an upload into a round the platform named (branchkey-local): that round's aggregate (an earlier
        round's is ignored), also asked of the platform every ``check_every_s`` s and after a reconnect of the
        notifications; else the newest unread id, as the official client does. ``waiter.interrupt`` ends it.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        target = self._upload_round  # kept until its aggregate came: a wait that timed out may be tried again
        if target is None:
            aggregation_id = self._waiter.wait_for_unread(deadline)
        else:
            safety_net = Every(check_every_s, lambda waited: find_missed_aggregate(self, target),
                               first=check_every_s, on_refresh=True)
            aggregation_id = self._waiter.wait_for_aggregate_after(self._upload_mark, deadline, [safety_net],
                                                                   stopped=None, target=target)
            self._upload_round = None if aggregation_id is not None else target
        if aggregation_id is None:
            raise AggregationTimeoutError(f"No aggregate for branch {self.branch_id} within {timeout} s "
                                          f"(notifications: {self.transport or 'none'}).")
        return aggregation_id

    def get_round(self, *, brief: bool = False) -> RoundView | None:
        """``GET /api/v1/round/{branch_id}`` (branchkey-local): the open round's progress and the latest aggregate
        (``brief``: leaves counted, not named), asked once (no retries); None on a platform without it (404 once)."""
        if not self._round_endpoint:
            return None
        try:
            data = self._http.request_data("GET", ROUND_PATH.format(branch_id=self.branch_id) + "?brief=1" * brief,
                                           "round progress", once=True)
        except NotFoundError as exc:
            self._round_endpoint = False
            logger.info("%s offers no round progress (%s); relying on notifications alone", self._api_host, exc)
            return None
        return parse_round_view(data)

    def request_ws_ticket(self) -> tuple[str, str]:
        """``POST /api/v1/ws/ticket``: a fresh single-use ticket for the WebSocket."""
        data = self._http.request_data("POST", WS_TICKET_PATH, "WebSocket ticket")
        try:
            return str(data["ticket_id"]), str(data["request_id"])
        except KeyError as exc:
            raise ProtocolError(f"WebSocket ticket: missing {exc} in {sorted(data)}") from None

    # ------------------------------------------------------------------ files
    def file_upload(self, file_path: str | os.PathLike) -> str:
        """Upload an NPZ written by :meth:`save_weights` (or ``save_fields``, ``save_analytics``: its kind is sent as
        the archive declares it); return the platform's ``file_id`` (see :attr:`last_upload`)."""
        self._ensure_run_started()
        with open(file_path, "rb") as f:
            archive = wire.decode(f)
            wire.validate_upload(archive)
            f.seek(0)
            size, digest = size_and_digest(f)
        return self._post_upload(functools.partial(file_chunks, file_path), Path(file_path).name, size, digest,
                                 archive.kind).file_id

    def upload_weights(self, weighting: float, parameters: Sequence[np.ndarray], *, compression: str | None = None,
                       compresslevel: int | None = None) -> str:
        """Encode and upload in one step, streaming from the arrays themselves; return the ``file_id``
        (:meth:`upload_arrays` returns the whole :class:`UploadReceipt`).

        ``compression`` (None: the client's option, ``"auto"`` unless set) and the client's ``quantize`` choose
        the codec (:func:`~.codec_choice.choose_codec`: stored on local links, else the best the branch accepts). The arrays must not change until this returns: the body is sent
        from them directly. The weighting and every value are checked before a byte is sent.
        """
        return self.upload_arrays(weighting, parameters, compression=compression, compresslevel=compresslevel).file_id

    def upload_arrays(self, weighting: float, parameters: Sequence[np.ndarray], *, compression: str | None = None,
                      compresslevel: int | None = None, values_checked: bool = False,
                      controls: Sequence[np.ndarray] = ()) -> UploadReceipt:
        """:meth:`upload_weights`, returning what was uploaded into which run and round (:class:`UploadReceipt`).

        ``values_checked=True``: the caller already checked the weighting (:func:`~.wire.check_weighting`) and that
        every value is finite (:func:`~.wire.check_finite`), as :meth:`Federation.run_round` does when a round
        begins, so neither is checked twice. ``controls``: SCAFFOLD's control update (``control_<n>``; SCAFFOLD
        branches only).
        """
        self._ensure_run_started()
        archive, sha = encode_upload(self.encoding, weighting, parameters, compression=compression,
                                     compresslevel=compresslevel, values_checked=values_checked, controls=controls)
        base = self.encoding.delta_base
        try:
            return self.upload_encoded(archive, "weights.npz", sha256=sha, delta_base=base)
        except RequestRejectedError as exc:  # a delta from an aggregate that is no longer the branch's latest
            if base is None or exc.status_code != HTTPStatus.CONFLICT:
                raise
            logger.warning("The server refused this upload as a difference from aggregate %s (%s); sending the full "
                           "weights instead", base, exc.message)
            self.encoding.delta.forget()
        return self.upload_arrays(weighting, parameters, compression=compression, compresslevel=compresslevel,
                                  values_checked=True, controls=controls)

    def upload_encoded(self, archive: UploadArchive, filename: str, *, kind: str = KIND_FEDERATED_LEARNING,
                       sha256: bytes | None = None, delta_base: str | None = None) -> UploadReceipt:
        """Upload an archive laid out by ``wire.prepare`` or ``wire.prepare_fields`` (or a ``StreamedArchive``,
        sent while it is encoded, without a digest) as ``kind``; retried with one ``Idempotency-Key`` as every
        upload is. ``sha256``: its digest, when the caller computed it already. ``delta_base``: the aggregate its
        layers are a difference from (:mod:`~.delta`)."""
        self._ensure_run_started()
        streamed = isinstance(archive, StreamedArchive)
        digest = None if streamed else base64.b64encode(archive.sha256() if sha256 is None else sha256).decode()
        return self._post_upload(archive.chunks, filename, archive.size, digest, kind, delta_base)

    def _post_upload(self, payload: Callable[[], Iterable[Buffer]], filename: str, size: int, digest: str | None,
                     kind: str = KIND_FEDERATED_LEARNING, delta_base: str | None = None) -> UploadReceipt:
        metadata = {"client_version": f"branchkey-integrations/{__version__}",
                    "timestamp": datetime.now(timezone.utc).isoformat(), "file_size": size,
                    "file_digest": f"sha256={digest}", "kind": kind}
        if digest is None:  # streamed: no digest until every byte is made; the server checks each member's CRC
            del metadata["file_digest"]
        data = json.dumps({"leaf_name": self.name, "metadata": json.dumps(metadata),
                           **({DELTA_BASE_KEY: delta_base} if delta_base is not None else {})})
        body = MultipartBody(data, filename, payload, size)
        # one key for every try: a retry of a counted upload (its 201 lost) gets that 201, not the next round
        headers = {FILE_SIZE_HEADER: str(size), **({} if digest is None else {FILE_DIGEST_HEADER: f"sha256={digest}"}),
                   IDEMPOTENCY_KEY_HEADER: uuid.uuid4().hex, "Content-Type": body.content_type}
        mark = self._waiter.received_of(kind)  # its round's aggregate is one received after it
        answer = self._http.request_data("POST", UPLOAD_PATH, "upload", expected=HTTPStatus.CREATED, headers=headers,
                                         data=body)
        file_id = answer.get("file_id")
        if not is_file_id(file_id):
            raise ProtocolError(f"upload: the answer's file_id is not a plain token: {str(answer)[:200]}")
        run, index = answer.get("run_number"), answer.get("round_index")
        tagged = isinstance(run, int) and isinstance(index, int) and min(run, index) >= 0
        self._downloads.record_upload(size)  # the aggregate is sized after it
        self.last_upload = UploadReceipt(str(file_id), run if tagged else None, index if tagged else None, size, mark,
                                         kind)
        if kind == KIND_FEDERATED_LEARNING:  # what wait_for_aggregation waits on: a model's round
            self._upload_mark, self._upload_round = mark, self.last_upload.round
        logger.info("Uploaded %s (%.2f MB) as %s", filename, size / 1e6, file_id)
        return self.last_upload

    def file_download(self, file_id: str, *, timeout: float | None = None) -> str:
        """Download an aggregate to ``{output_dir}/{file_id}.npz``; return that path.

        The file id is checked before anything touches the disk, so an id such as
        ``../x`` can never write outside ``output_dir``. The file appears atomically. The body is
        limited as :meth:`download_aggregate`'s is, without the archive checks.
        """
        checked_file_id(file_id)
        return str(self._downloads.to_file(file_id, self._downloads.limits(timeout=timeout)))

    def download_aggregate(self, file_id: str, *, buffer: DownloadBuffer | None = None,
                           expected_bytes: int | None = None, timeout: float | None = None) -> wire.Archive:
        """Download and decode an aggregate in memory (no file left behind).

        The layers of a stored aggregate are views of the one download buffer: no copies. Give a
        :class:`DownloadBuffer` to reuse its memory (the previous download's layers are then
        overwritten); without one, each call downloads into new memory. The server is not trusted
        (:mod:`.download`): ``ArchiveTooLargeError`` past ``max_download_bytes`` (default: 4 times
        ``expected_bytes``, the model's size as the caller knows it, else what this leaf uploaded) or the
        compression-ratio limit; ``DownloadTimeoutError`` when it takes over ``timeout`` s (``download_timeout``).
        """
        checked_file_id(file_id)
        limits = self._downloads.limits(expected_bytes=expected_bytes, timeout=timeout)
        codec = self.encoding.download_codec()
        archive = self._downloads.archive(file_id, limits, buffer, codec)
        if archive.kind == KIND_FEDERATED_LEARNING:  # the base of the next delta upload, where it is exact
            self.encoding.delta.remember(file_id, archive.layers, download_codec=codec,
                                         branch_takes=lambda: self.encoding.takes_deltas)
        return archive

    @contextlib.contextmanager
    def retrying_until(self, deadline: float | None, on_away: Callable[[Away], None] | None = None) -> Iterator[None]:
        """Within this block, a call of this thread that finds the platform away (refused, reset, 502-504: a
        restart) tries again until ``deadline`` (``time.monotonic()``; None: until it answers), not only
        ``max_retries`` times; ``on_away`` hears of each try. ``waiter.interrupt`` ends it. Example (not run):
        ``with client.retrying_until(time.monotonic() + 600): client.file_upload(path)``.
        """
        with self._http.patience(deadline, sleep=self._waiter.sleep, on_away=on_away):
            yield

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
            self._http.request("POST", METRICS_PATH, expected=HTTPStatus.CREATED, data=payload)
        except BranchKeyError as exc:
            logger.error("Sending performance metrics for aggregation %s failed: %s", aggregation_id, exc)
            return False
        return True

    def get_branch_config(self) -> dict[str, Any]:
        """``GET /api/v1/config/branch/{branch_id}``: branch, service and model_config."""
        return self._http.request_data("GET", BRANCH_CONFIG_PATH.format(branch_id=self.branch_id), "branch config")

    def disable_ssl_verification(self, enabled: bool = False) -> bool:
        """Turn certificate verification off (or on again); kept for parity with the official client."""
        warnings.warn("[BranchKey] We highly recommend enabling ssl verification. Use this at your own risk.",
                      stacklevel=2)
        self._http.verify = enabled
        return enabled

    def __repr__(self) -> str:
        return (f"Client(leaf={self.name!r}, id={self.leaf_id!r}, branch={self.branch_id!r}, "
                f"host={self._api_host!r}, transport={self.transport!r})")

    # -------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Stop the notification consumer and release connections; safe to call twice."""
        if self._transport is not None:
            self._transport.close()
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


__all__ = ["Client", "ClientOptions", "UploadReceipt", "DownloadBuffer", "MultipartBody", "TRANSPORTS", "check_client_options", "check_host"]
