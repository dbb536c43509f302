"""Client round trip: upload this round's weights, download the aggregate, have it as arrays.

Measured on a 2-leaf branch where only leaf 1 uploads in the measured round (each upload
replaces its previous one), so no aggregation runs in the background; the download is of
the previous round's aggregate, which has the same layout. The round trip is therefore
the client's own share of a round: encode + upload until the server's 201 (which includes
the server's receive, validation and fsync) + download + decode. Four paths side by side:

- ``ours``: ``Client.upload_weights`` + ``Client.download_aggregate`` into a ``DownloadBuffer``
  kept from one repetition to the next, which is what ``Federation`` (so both callbacks) does;
- ``ours_fresh``: the same, downloading into new memory each time (``download_aggregate``'s
  default, and every leaf's first round): mapping a fresh model-sized buffer is included;
- ``official``: what ``branchkey`` 2.7.1 does, in-process with this venv's numpy and requests:
  ``np.savez_compressed`` to a file, ``np.load`` of every member (its validate_weight_shape),
  ``requests.post(files=...)``, GET the download URL, ``requests.get`` of the blob into
  ``resp.content``, write it to a file, ``np.load`` of every layer;
- ``floor``: the loopback floor: a stored archive and its whole multipart body prepared in
  advance, one raw ``http.client`` POST, one raw GET into a buffer allocated and written in
  advance, and ``np.frombuffer`` views at offsets known in advance.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import numpy as np
import requests

from branchkey_integrations.core import wire
from branchkey_integrations.core.client import Client, DownloadBuffer, MultipartBody
from branchkey_integrations.core.protocol import DOWNLOAD_PATH

from .common import Bench, count, local_server, make_layers, median, timed, wait_for_aggregate

logger = logging.getLogger(__name__)
METHODS = ("ours", "ours_fresh", "official", "floor")


def api_headers(client: Client) -> dict[str, str]:
    """The headers of a leaf's API call (PROTOCOL.md, "Identity"), for the raw requests below."""
    c = client.credentials
    return {"Authorization": f"Bearer {c.id}:{c.session_token}", "LEAF": "true", "accept": "application/json"}


def official_round_trip(client: Client, layers: list[np.ndarray], aggregate_id: str, workdir: Path) -> None:
    """The official 2.7.1 client's save_weights + file_upload + file_download + np.load, step for step."""
    path = workdir / "official-upload.npz"
    np.savez_compressed(path, weighting=np.array([10.0], dtype=np.float64),
                        **{f"layer_{i}": a for i, a in enumerate(layers)})
    headers = api_headers(client)
    with open(path, "rb") as f:
        data = np.load(f, allow_pickle=False)  # validate_weight_shape reads every member
        assert data["weighting"].size == 1 and all(isinstance(data[k], np.ndarray) for k in data.files)
        f.seek(0)
        body = {"data": json.dumps({"leaf_name": client.name, "metadata": "{'key1':'value1', 'key2':'value2'}"})}
        response = requests.post(client.host + "/api/v1/file/upload", files={"file": f}, data=body, headers=headers)
        assert response.status_code == 201, response.text
    response = requests.get(client.host + f"/api/v1/file/download/{aggregate_id}", headers={**headers, "accept": "*/*"})
    blob = requests.get(response.json()["data"]["download_url"])
    target = workdir / f"{aggregate_id}.npz"
    target.write_bytes(blob.content)
    with np.load(target, allow_pickle=False) as npz:
        loaded = [npz[f"layer_{i}"] for i in range(len(npz.files))]
    assert len(loaded) == len(layers)


class Floor:
    """Everything but the transfers prepared in advance: the least a round trip can cost here."""

    def __init__(self, client: Client, layers: list[np.ndarray], aggregate_id: str) -> None:
        archive = wire.prepare(layers, 10.0, compression="none")
        digest = "sha256=" + base64.b64encode(archive.sha256()).decode()
        data = json.dumps({"leaf_name": client.name, "metadata": "{}"})
        multipart = MultipartBody(data, "w.npz", archive.chunks, archive.size)
        self.body = b"".join(multipart)
        self.headers = {**api_headers(client), "Content-Type": multipart.content_type,
                        "x-bk-file-size": str(archive.size), "x-bk-file-digest": digest}
        answer = requests.get(client.host + DOWNLOAD_PATH.format(file_id=aggregate_id), headers=api_headers(client))
        self.url = urlsplit(answer.json()["data"]["download_url"])
        host = urlsplit(client.host)
        self.address = (host.hostname, host.port)
        self.members, size = self._members(client, aggregate_id)
        self.buffer = np.zeros(size, dtype=np.uint8)  # allocated and touched in advance

    @staticmethod
    def _members(client: Client, aggregate_id: str) -> tuple[list[tuple[np.dtype, tuple[int, ...], int]], int]:
        """(dtype, shape, data offset) of each stored member of the aggregate, and its size, read in advance."""
        path = Path(client.file_download(aggregate_id))  # into the client's output_dir
        size = path.stat().st_size
        raw = path.read_bytes()
        members = []
        with zipfile.ZipFile(path) as zf, np.load(path) as npz:
            for info in zf.infolist():
                name_len, extra_len = np.frombuffer(raw, "<u2", 2, info.header_offset + 26)
                start = info.header_offset + 30 + int(name_len) + int(extra_len)
                array = npz[info.filename[:-4]]
                members.append((array.dtype, array.shape, start + info.file_size - array.nbytes))
        path.unlink()
        return members, size

    def round_trip(self) -> None:
        connection = http.client.HTTPConnection(*self.address)
        try:
            connection.request("POST", "/api/v1/file/upload", body=self.body, headers=self.headers)
            response = connection.getresponse()
            assert response.status == 201, response.read()
            response.read()
            connection.request("GET", f"{self.url.path}?{self.url.query}")
            response = connection.getresponse()
            buffer = self.buffer
            assert int(response.getheader("Content-Length")) == buffer.nbytes
            view, got = memoryview(buffer), 0
            while got < len(buffer):
                got += response.readinto(view[got:got + (1 << 20)])
            [np.frombuffer(buffer, dtype, int(np.prod(shape)), offset).reshape(shape)
             for dtype, shape, offset in self.members]
        finally:
            connection.close()


def prepare_branch(bench: Bench, layers: list[np.ndarray]) -> tuple[Client, str]:
    """Round 0 uploaded by both leaves (so an aggregate of this layout exists); returns leaf 1 and its id."""
    clients = [Client(path, host=bench.server.url, transport="none", output_dir=bench.workdir / "downloads")
               for path in bench.credentials]
    for weighting, client in enumerate(clients, start=1):
        client.upload_weights(weighting, layers)
    aggregate_id = wait_for_aggregate(bench)
    clients[1].close()
    return clients[0], aggregate_id


def measure_size(params: int, repeat: int, methods: tuple[str, ...] = METHODS) -> dict[str, Any]:
    """Median seconds per round trip of each method, the methods interleaved in every repetition."""
    layers = make_layers(params)
    with local_server(2) as bench:
        client, aggregate_id = prepare_branch(bench, layers)
        floor = Floor(client, layers, aggregate_id)

        kept = DownloadBuffer()

        def ours(buffer: DownloadBuffer | None) -> None:
            client.upload_weights(10.0, layers)
            client.download_aggregate(aggregate_id, buffer=buffer)

        runs: dict[str, Callable[[], None]] = {
            "ours": lambda: ours(kept),
            "ours_fresh": lambda: ours(None),
            "official": lambda: official_round_trip(client, layers, aggregate_id, bench.workdir),
            "floor": floor.round_trip,
        }
        times: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(repeat):
            for name in methods:
                os.sync()  # flush the last method's dirty files, or the next fsync on the server pays for them
                times[name].append(timed(runs[name]))
        client.close()
    result: dict[str, Any] = {"params": count(layers), "layers": len(layers), "model_mb": sum(a.nbytes for a in layers) / 1e6,
                              "repeat": repeat, "seconds": {name: median(values) for name, values in times.items()},
                              "all_seconds": times}
    seconds = result["seconds"]
    if "official" in seconds:
        result["speedup_vs_official"] = seconds["official"] / seconds["ours"]
        if "ours_fresh" in seconds:
            result["fresh_speedup_vs_official"] = seconds["official"] / seconds["ours_fresh"]
    if "floor" in seconds:
        result["ours_over_floor"] = seconds["ours"] / seconds["floor"]
    return result


def check_correctness(params: int) -> bool:
    """Ours and the official path see the same aggregate, bit for bit."""
    layers = make_layers(params)
    with local_server(2) as bench:
        client, aggregate_id = prepare_branch(bench, layers)
        ours = client.download_aggregate(aggregate_id).layers
        with np.load(client.file_download(aggregate_id), allow_pickle=False) as npz:
            same = all(np.array_equal(npz[f"layer_{i}"], a) and np.array_equal(a, l)
                       for i, (a, l) in enumerate(zip(ours, layers)))
        client.close()
    return same
