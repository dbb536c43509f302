"""The client distrusts the server: sizes, pace, file ids and JSON from a hostile HTTP server in the test.

Each server here lies in one way (a declared length it never sends, a body far over the limit, chunked or
gzip-encoded, a zip bomb, bytes that trickle, a file id that is a path, JSON nested past the recursion
limit); the client must refuse it with a typed error before spending the memory or the time the lie asks for.
"""

from __future__ import annotations

import json
import threading
import time
import tracemalloc
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import numpy as np
import pytest

from branchkey_integrations import Client
from branchkey_integrations.core import wire
from branchkey_integrations.core.errors import (
    ArchiveTooLargeError,
    DownloadTimeoutError,
    ProtocolError,
    ServerError,
)
from branchkey_integrations.core.federation import Federation
from branchkey_integrations.core.protocol import parse_notification
from branchkey_integrations.core.transfer import DownloadBuffer

from ..conftest import SHORT_CREDS as CREDS

RUN = {"data": {"run_status": "start", "run_number": 1}}
MiB = 1024**2
HUGE_BODY = 256 * MiB  # what a lying server would send when nobody stops it: far over any limit here
NESTED = b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # valid JSON, past Python's recursion limit

Route = Callable[["Handler"], None]


class Hostile(ThreadingHTTPServer):
    """Answers each path with a route function (``Handler -> None``); counts the body bytes it sent."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, routes: dict[str, Route]) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.routes = {"/api/v1/run/b": json_route(RUN), **routes}
        self.sent = 0
        self.uploaded = 0  # the x-bk-file-size of the last upload
        self.done = threading.Event()  # set at the end of the test: a trickle stops

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hangs up on a lie is the point of these tests


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # chunked bodies

    def _route(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.server.uploaded = int(self.headers.get("x-bk-file-size") or self.server.uploaded)
        route = self.server.routes.get(self.path) or json_route({"error": "no route"}, 404)
        try:
            route(self)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading: what this test wants

    do_GET = do_POST = _route

    def head(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def send(self, data: bytes) -> None:
        self.wfile.write(data)
        self.server.sent += len(data)

    def log_message(self, *args: object) -> None:
        pass


def json_route(body: object, status: int = 200) -> Route:
    def route(handler: Handler) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        handler.head(status, {"Content-Length": str(len(data)), "Content-Type": "application/json"})
        handler.send(data)
    return route


def declares(length: int) -> Route:
    """Headers that declare ``length`` bytes, then nothing until the client goes away."""
    def route(handler: Handler) -> None:
        handler.head(200, {"Content-Length": str(length), "Content-Type": "application/octet-stream"})
        handler.wfile.flush()
        handler.rfile.read(1)  # returns once the client closes the connection
        handler.close_connection = True
    return route


def chunked(total: int) -> Route:
    """A chunked body of ``total`` zero bytes, 1 MiB a chunk, for as long as the client reads."""
    def route(handler: Handler) -> None:
        handler.head(200, {"Transfer-Encoding": "chunked", "Content-Type": "application/octet-stream"})
        piece = bytes(MiB)
        for _ in range(total // MiB):
            handler.send(b"%x\r\n" % len(piece) + piece + b"\r\n")
        handler.send(b"0\r\n\r\n")
    return route


def gzipped(total: int) -> Route:
    """A gzip-encoded body that inflates to ``total`` zero bytes (about 1000:1), with its Content-Length."""
    packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    piece = bytes(MiB)
    data = b"".join(packer.compress(piece) for _ in range(total // MiB)) + packer.flush()

    def route(handler: Handler) -> None:
        handler.head(200, {"Content-Length": str(len(data)), "Content-Encoding": "gzip",
                           "Content-Type": "application/octet-stream"})
        handler.send(data)
    return route


def trickle(length: int, every_s: float) -> Route:
    """Declares ``length`` bytes and sends one every ``every_s`` seconds (each read returns in time)."""
    def route(handler: Handler) -> None:
        handler.head(200, {"Content-Length": str(length), "Content-Type": "application/octet-stream"})
        for _ in range(length):
            handler.send(b"\0")
            handler.wfile.flush()
            if handler.server.done.wait(every_s):
                return
    return route


def sends(data: bytes) -> Route:
    def route(handler: Handler) -> None:
        handler.head(200, {"Content-Length": str(len(data)), "Content-Type": "application/octet-stream"})
        handler.send(data)
    return route


@pytest.fixture
def hostile():
    servers: list[Hostile] = []

    def make(routes: dict[str, Route]) -> Hostile:
        server = Hostile(routes)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.done.set()
        server.shutdown()
        server.server_close()


def serving_download(body: Route, file_id: str = "agg-1", **routes: Route) -> dict[str, Route]:
    """Routes of a server whose aggregate ``file_id`` is ``body``: the download call answers its signed URL."""
    def download_call(handler: Handler) -> None:
        url = f"http://127.0.0.1:{handler.server.server_address[1]}/blob/{file_id}"
        json_route({"data": {"download_url": url}})(handler)
    return {f"/api/v1/file/download/{file_id}": download_call, f"/blob/{file_id}": body, **routes}


def uploaded(client: Client, server: Hostile) -> int:
    """Upload a 4 KiB model (the server answers 201); return the limit an aggregate then has: 4 times the
    archive uploaded, plus 1 MiB."""
    assert client.upload_weights(1.0, [np.zeros(1024, np.float32)]) == "up-1"
    assert 4096 < server.uploaded < 8192
    return 4 * server.uploaded + MiB


UPLOAD_OK = {"/api/v1/file/upload": json_route({"data": {"file_id": "up-1", "run_number": 1, "round_index": 0}}, 201)}


def client_for(server: Hostile, **kwargs: object) -> Client:
    return Client(CREDS, host=server.url, transport="none", backoff_factor=0, max_retries=0, request_timeout=5, **kwargs)


def zip_bomb(inflated: int) -> bytes:
    """A valid aggregate whose one layer deflates ``inflated`` zero bytes to about a thousandth of that."""
    return wire.prepare([np.zeros(inflated // 4, np.float32)], 1.0, compression="deflate").getvalue()


# --------------------------------------------------------------------------------------------- sizes
def test_a_declared_2_gb_body_is_refused_before_any_memory_is_taken(hostile):
    server = hostile({**UPLOAD_OK, **serving_download(declares(2 * 1024**3))})
    client = client_for(server)
    limit = uploaded(client, server)
    buffer = DownloadBuffer()
    started = time.monotonic()
    with pytest.raises(ArchiveTooLargeError, match=f"declares 2147483648 bytes; the limit for this download is {limit}"):
        client.download_aggregate("agg-1", buffer=buffer)
    assert buffer.nbytes == 0  # nothing mapped, let alone 2 GB
    assert time.monotonic() - started < 4  # refused from the headers: no read waited for the body


def test_a_declared_100_tb_body_is_a_typed_error_even_before_any_upload(hostile):
    server = hostile(serving_download(declares(100 * 1024**4)))
    with pytest.raises(ArchiveTooLargeError, match="declares 109951162777600 bytes"):
        client_for(server).download_aggregate("agg-1")  # no upload yet: the server's own 16 GiB limit applies


@pytest.mark.parametrize("body", [chunked(HUGE_BODY), gzipped(HUGE_BODY)], ids=["chunked", "gzip"])
def test_a_body_without_a_usable_length_is_stopped_at_the_limit(hostile, body):
    server = hostile({**UPLOAD_OK, **serving_download(body)})
    client = client_for(server)
    limit = uploaded(client, server)
    sent_before = server.sent
    tracemalloc.start()
    try:
        with pytest.raises(ArchiveTooLargeError, match=f"more than {limit} bytes, the limit"):
            client.download_aggregate("agg-1")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB, peak  # the limit (1 MiB) and a piece or two: never the 256 MiB the server offers
    assert server.sent - sent_before < 64 * MiB or "gzip" in str(body)  # the client stopped reading early


def test_file_download_writes_no_more_than_the_limit_either(hostile, tmp_path):
    server = hostile(serving_download(chunked(HUGE_BODY)))
    client = client_for(server, output_dir=tmp_path, max_download_bytes=2 * MiB)
    with pytest.raises(ArchiveTooLargeError, match="more than 2097152 bytes"):
        client.file_download("agg-1")
    assert list(tmp_path.iterdir()) == []  # the partial file is gone


def test_a_zip_bomb_aggregate_is_refused_by_size_and_by_ratio_before_it_inflates(hostile):
    bomb = zip_bomb(80 * MiB)
    assert len(bomb) < MiB  # inflates ~1000:1
    server = hostile({**UPLOAD_OK, **serving_download(sends(bomb))})
    client = client_for(server)
    limit = uploaded(client, server)
    tracemalloc.start()
    try:
        with pytest.raises(ArchiveTooLargeError, match=rf"decompress to 8388\d{{4}} bytes; the limit is {limit} bytes"):
            client.download_aggregate("agg-1")
        roomy = client_for(server, max_download_bytes=1024**3)  # the size limit allows it: the ratio does not
        with pytest.raises(ArchiveTooLargeError, match="compression bomb"):
            roomy.download_aggregate("agg-1")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB, peak  # nothing inflated


def test_an_aggregate_of_the_uploaded_size_still_downloads(hostile):
    layers = [np.arange(300_000, dtype=np.float32), np.ones((3, 4), np.float64)]
    data = wire.prepare(layers, 1.0, compression="deflate").getvalue()
    server = hostile({**UPLOAD_OK, **serving_download(sends(data))})
    client = client_for(server)
    assert client.upload_weights(1.0, layers, compression="deflate") == "up-1"
    archive = client.download_aggregate("agg-1")
    assert [a.tolist() for a in archive.layers] == [a.tolist() for a in layers]


# ---------------------------------------------------------------------------------------------- time
def test_a_trickling_body_ends_at_the_download_deadline(hostile):
    server = hostile(serving_download(trickle(1000, every_s=0.2)))
    client = client_for(server)
    started = time.monotonic()
    with pytest.raises(DownloadTimeoutError, match="bytes received when its deadline passed") as error:
        client.download_aggregate("agg-1", timeout=1.0)
    assert isinstance(error.value, TimeoutError)
    assert 1.0 <= time.monotonic() - started < 3  # one byte every 0.2 s would take 200 s


def test_the_rounds_timeout_covers_the_download(hostile):
    """Federation: an aggregate that trickles in ends the round at its timeout, as a TransportError (so
    ``on_timeout="continue"`` skips the round), not 200 s later."""
    view = {"run_status": "start", "run_number": 1, "round_index": 0, "uploaded": [], "missing": [], "required": 1,
            "refused": [], "latest_aggregate": None}
    done = {**view, "round_index": 1, "latest_aggregate": {"aggregation_id": "agg-1", "run_number": 1,
                                                           "round_index": 0}}
    views = iter([view] + [done] * 100)
    server = hostile({**UPLOAD_OK, **serving_download(trickle(1000, every_s=0.2)),
                      "/api/v1/round/b": lambda handler: json_route({"data": next(views)})(handler)})
    federation = Federation(CREDS, host=server.url, transport="none", timeout=2.0, on_timeout="continue",
                            check_every_s=0.1, client_options={"max_retries": 0})
    federation.connect()
    try:
        started = time.monotonic()
        result = federation.run_round([np.zeros(1000, np.float32)], 1.0)
        assert result.skipped == "unreachable"
        assert time.monotonic() - started < 5
    finally:
        federation.close()


# ------------------------------------------------------------------------------------ ids and JSON
def test_a_file_id_that_is_a_path_is_a_protocol_error_wherever_the_server_sends_it(hostile):
    view = {"run_status": "start", "run_number": 1, "round_index": 1, "uploaded": [], "missing": [], "required": 1,
            "refused": [], "latest_aggregate": {"aggregation_id": "../../x", "run_number": 1, "round_index": 0}}
    server = hostile({"/api/v1/file/upload": json_route({"data": {"file_id": "../../x"}}, 201),
                      "/api/v1/round/b": json_route({"data": view})})
    client = client_for(server)
    with pytest.raises(ProtocolError, match="file_id is not a plain token"):
        client.upload_weights(1.0, [np.zeros(4, np.float32)])
    with pytest.raises(ProtocolError, match="aggregation_id that is a plain token"):
        client.get_round()
    with pytest.raises(ProtocolError, match="plain token"):
        parse_notification(json.dumps({"message_type": "aggregation_status", "body": {"aggregation_id": "../../x"}}))


def test_json_nested_past_the_recursion_limit_is_a_protocol_error(hostile):
    server = hostile({"/api/v1/run/b": json_route(NESTED), "/api/v1/config/branch/b": json_route(NESTED, 503)})
    with pytest.raises(ProtocolError, match="expected JSON"):
        client_for(server)
    server.routes["/api/v1/run/b"] = json_route(RUN)
    client = client_for(server)
    with pytest.raises(ServerError) as error:  # an error answer nested so deep still says what it was
        client.get_branch_config()
    assert error.value.status_code == 503
    with pytest.raises(ProtocolError, match="not JSON"):
        parse_notification(NESTED)


@pytest.mark.parametrize("module", ["http", "transfer", "download", "backoff"])
def test_the_docstring_examples_run_as_written(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"branchkey_integrations.core.{module}"))
    assert result.attempted > 0 and result.failed == 0
