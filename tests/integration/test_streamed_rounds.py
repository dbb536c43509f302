"""Rounds whose uploads are encoded while they are sent (int8 on a branch that advertises it) against a real
in-process branchkey-local: the aggregate is the NumPy mean of what the codec decodes, bit for bit; a connection
cut in the middle of a streamed body counts nothing, and the leaf's retry (the same bytes, its residual settled
once) completes the round; an aggregate asked encoded is the same bytes for both leaves, as the whole encoder
writes them."""

from __future__ import annotations

import logging
import socket
import threading

import numpy as np
import requests

from branchkey_integrations import Client
from branchkey_integrations.core import wire
from branchkey_integrations.core.float_codecs import FRAME_VALUES, INT8

from ..answer_cutter import AnswerCutter, close_socket

UPLOAD = b"POST /api/v1/file/upload"


def _layers(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 0.02, (64, 3, 3, 3)).astype(np.float32), rng.normal(0, 0.02, 3 * FRAME_VALUES + 5).astype(
        np.float32), rng.normal(0, 0.02, 10).astype(np.float32)]


def _numpy_mean(uploads: list[tuple[list[np.ndarray], float]]) -> list[np.ndarray]:
    """FedAvg as the server folds: the float64 sum of the decoded uploads over the weightings' sum, as float32."""
    total = sum(weighting for _, weighting in uploads)
    means = []
    for index in range(len(uploads[0][0])):
        acc = np.zeros(uploads[0][0][index].shape, np.float64)
        for layers, weighting in uploads:
            acc += np.multiply(INT8.dequantized(layers[index]), weighting, dtype=np.float64)
        means.append((acc / total).astype(np.float32))
    return means


def _advertise(server, branch_id: str) -> None:
    answer = server.admin("PUT", f"/admin/v1/branches/{branch_id}/codecs", json={"codecs": ["int8"]})
    assert answer.status_code == 200, answer.text


def _round(server, credentials, tmp_path, hosts: list[str], caplog) -> tuple[list[Client], str, list[np.ndarray]]:
    """Both leaves upload in int8 (leaf 0 through ``hosts[0]``): the clients, the aggregation id and the stored
    aggregate, checked against NumPy."""
    clients = [Client(c, host=host, transport="none", quantize="int8", download_codec="int8", backoff_factor=0,
                      output_dir=tmp_path / c["name"]) for c, host in zip(credentials, hosts)]
    _advertise(server, clients[0].branch_id)
    uploads = [(_layers(seed), weighting) for seed, weighting in ((1, 10.0), (2, 11.0))]
    with caplog.at_level(logging.INFO, logger="branchkey_integrations.core.streamed_upload"):
        for client, (layers, weighting) in zip(clients, uploads):
            client.upload_weights(weighting, layers)
    assert caplog.text.count("Uploads travel as 'int8', encoded while they are sent") == 2
    aggregation_id = clients[0].wait_for_aggregation(30)
    stored = clients[0]._downloads.archive(aggregation_id, clients[0]._downloads.limits())
    return clients, aggregation_id, _check_mean(stored, uploads)


def _check_mean(stored: wire.Archive, uploads: list[tuple[list[np.ndarray], float]]) -> list[np.ndarray]:
    for got, want in zip(stored.layers, _numpy_mean(uploads)):
        np.testing.assert_array_equal(got, want)
    return [np.array(layer) for layer in stored.layers]


def test_a_streamed_round_aggregates_to_the_numpy_mean_and_both_leaves_get_the_same_encoded_bytes(
        inprocess_server, tmp_path, caplog) -> None:
    server, credentials = inprocess_server(2)
    clients, aggregation_id, mean = _round(server, credentials, tmp_path, [server.url, server.url], caplog)
    try:
        urls = [client._downloads.url(aggregation_id, "int8") for client in clients]
        bodies: list[bytes] = [b"", b""]

        def fetch(index: int) -> None:  # both at once, while the copy is being made
            bodies[index] = requests.get(urls[index], timeout=30).content

        threads = [threading.Thread(target=fetch, args=(i,)) for i in range(2)]
        with caplog.at_level(logging.INFO, logger="branchkey_integrations.server.encoded_aggregates"):
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        assert bodies[0] == bodies[1] == wire.prepare(mean, None, compression="int8").getvalue()
        assert caplog.text.count("encoded as int8 for download") == 1  # made once, for both
        assert requests.get(urls[0], timeout=30).content == bodies[0]  # later: from the file, the same bytes
        for client in clients:
            got = client.download_aggregate(aggregation_id).layers
            for layer, want in zip(got, mean):
                np.testing.assert_array_equal(layer, INT8.dequantized(want))
    finally:
        for client in clients:
            client.close()


class BodyCutter(AnswerCutter):
    """Forwards 127.0.0.1:<port> to ``target_port`` (:class:`AnswerCutter`'s proxy); closes the first upload's
    connection once ``after`` bytes of it went through (the body is then being sent), so the server sees a body
    that ends midway. ``body_cut`` is set once it did."""

    def __init__(self, target_port: int, after: int) -> None:
        self.after = after
        self.body_cut = threading.Event()
        super().__init__(target_port)

    def _pump(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        seen = -1  # bytes of an upload request forwarded on this connection (-1: none seen yet)
        try:
            while chunk := source.recv(1 << 16):
                if not answers and not self.body_cut.is_set():
                    at = chunk.find(UPLOAD)
                    if seen < 0 and at >= 0:
                        seen, chunk_start = 0, at
                    else:
                        chunk_start = 0
                    if seen >= 0:
                        seen += len(chunk) - chunk_start
                        if seen > self.after:
                            self.body_cut.set()
                            break
                sink.sendall(chunk)
        except OSError:
            pass
        close_socket(source)
        close_socket(sink)


def test_a_connection_cut_mid_body_counts_nothing_and_the_leafs_retry_completes_the_round(
        inprocess_server, tmp_path, caplog) -> None:
    server, credentials = inprocess_server(2)
    cutter = BodyCutter(int(server.url.rsplit(":", 1)[1]), after=200_000)  # of a ~1.2 MB body
    try:
        clients, _, _ = _round(server, credentials, tmp_path, [cutter.url, server.url], caplog)
        assert cutter.body_cut.is_set()  # the first try was cut; the mean above holds each upload once
        residual = clients[0].encoding.feedback.residual
        for layer, held in zip(_layers(1), residual):  # settled once, though the body was read twice
            np.testing.assert_array_equal(held, layer - INT8.dequantized(layer))
        for client in clients:
            client.close()
    finally:
        cutter.close()
