"""Delta uploads against a real branchkey-local and the real client: sent as the difference from the aggregate the
leaf downloaded last where the branch takes them, rebuilt by the server into full weights (the aggregate is NumPy's
weighted mean of them, bit for bit), refused when the base is stale (the client then sends the full weights and
says so), and never sent to a branch that advertises no codecs."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from branchkey_integrations import Client
from branchkey_integrations.core import wire
from branchkey_integrations.core.float_codecs import SHUFFLE_ZSTD

needs_zstd = pytest.mark.skipif(SHUFFLE_ZSTD is None, reason="shuffle-zstd needs the [zstd] extra (zstandard)")


def _advertise(server, branch_id: str, codecs: list[str]) -> None:
    answer = server.admin("PUT", f"/admin/v1/branches/{branch_id}/codecs", json={"codecs": codecs})
    assert answer.status_code == 200, answer.text


def _start(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((300, 200)).astype(np.float32) * 0.05, rng.standard_normal(64).astype(np.float32),
            np.array([7, 3], np.int64)]  # an integer counter travels whole


def _trained(layers: list[np.ndarray], seed: int, step: float = 1e-3) -> list[np.ndarray]:
    """``layers`` after a few steps of training: each float moved by a little, counters unchanged."""
    rng = np.random.default_rng(seed)
    return [(layer + step * rng.standard_normal(layer.shape)).astype(np.float32) if layer.dtype == np.float32
            else layer.copy() for layer in layers]


def _mean(uploads: list[list[np.ndarray]], weightings: tuple[float, ...]) -> list[np.ndarray]:
    """The weighted mean the NumPy way, in float64, cast back (what the server's fold must equal, bit for bit)."""
    total = sum(weightings)
    return [(sum(layers[i].astype(np.float64) * w for layers, w in zip(uploads, weightings)) / total).astype(
        uploads[0][i].dtype) if uploads[0][i].dtype == np.float32 else uploads[0][i] for i in range(len(uploads[0]))]


@needs_zstd
def test_a_lossless_delta_round_is_bit_exact_and_smaller_than_the_full_upload(inprocess_server, tmp_path) -> None:
    server, credentials = inprocess_server(2)
    clients = [Client(c, host=server.url, transport="none", compression="shuffle-zstd", output_dir=tmp_path / c["name"])
               for c in credentials]
    try:
        _advertise(server, clients[0].branch_id, ["shuffle-zstd"])
        for client, seed in zip(clients, (1, 2)):  # round 1: no aggregate held, so full uploads
            client.upload_weights(1.0 if seed == 1 else 3.0, _start(seed))
            assert client.encoding.delta_base is None
        first = clients[0].wait_for_aggregation(30)
        bases = [client.download_aggregate(first).layers for client in clients]
        uploads = [_trained(base, seed, step=1e-4) for base, seed in zip(bases, (3, 4))]
        sizes = []
        for client, layers, weighting in zip(clients, uploads, (1.0, 3.0)):
            sizes.append(client.upload_arrays(weighting, layers).size)
            assert client.encoding.delta_base == first and client.encoding.last_codec == "shuffle-zstd"
        aggregate = clients[0].download_aggregate(clients[0].wait_for_aggregation(30)).layers
    finally:
        for client in clients:
            client.close()
    for got, want in zip(aggregate, _mean(uploads, (1.0, 3.0))):
        np.testing.assert_array_equal(got, want)
    full = wire.prepare(uploads[0], 1.0, compression="shuffle-zstd").size
    assert sizes[0] < 0.85 * full  # the XOR of nearby floats: the high byte planes are mostly zero


def _int8_run(inprocess_server, tmp_path, name: str, delta: bool, rounds: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """One leaf training from each aggregate it downloads (updates of 1e-2) with int8 uploads and error feedback;
    returns the last aggregate's first layer and the same trajectory in float32."""
    server, credentials = inprocess_server(1, name=name)
    reference = _start(5)
    with Client(credentials[0], host=server.url, transport="none", quantize="int8", delta=delta,
                output_dir=tmp_path / name) as client:
        _advertise(server, client.branch_id, ["int8"])
        current = [layer.copy() for layer in reference]
        for number in range(rounds):
            update = _trained([np.zeros_like(layer) for layer in reference], 10 + number, step=1e-2)
            reference = [r + u for r, u in zip(reference, update)]
            client.upload_weights(1.0, [c + u for c, u in zip(current, update)])
            assert (client.encoding.delta_base is not None) == (delta and number > 0)
            current = [np.array(layer, copy=True) for layer in client.download_aggregate(
                client.wait_for_aggregation(30)).layers]
    return current[0], reference[0]


def test_int8_deltas_with_error_feedback_stay_closer_to_float32_than_int8_of_the_weights(inprocess_server,
                                                                                          tmp_path) -> None:
    delta_model, reference = _int8_run(inprocess_server, tmp_path, "delta", delta=True)
    full_model, same_reference = _int8_run(inprocess_server, tmp_path, "full", delta=False)
    np.testing.assert_array_equal(reference, same_reference)
    delta_error, full_error = np.abs(delta_model - reference).max(), np.abs(full_model - reference).max()
    # a block of the difference spans ~4e-2 (updates plus the residual): half a step is ~2e-4; of the weights, ~1e-3
    assert delta_error < 5e-4
    assert delta_error < full_error / 3


@needs_zstd
def test_a_stale_base_is_refused_and_the_client_sends_the_full_weights_saying_so(inprocess_server, tmp_path,
                                                                                 caplog) -> None:
    server, credentials = inprocess_server(1)
    options = {"host": server.url, "transport": "none", "compression": "shuffle-zstd", "output_dir": tmp_path}
    with Client(credentials[0], **options) as client, Client(credentials[0], **options) as elsewhere:
        _advertise(server, client.branch_id, ["shuffle-zstd"])
        client.upload_weights(1.0, _start(6))
        first = client.wait_for_aggregation(30)
        base = client.download_aggregate(first).layers.copy()
        elsewhere.upload_weights(1.0, _start(7))  # the branch moves on without this client (another of its processes)
        second = elsewhere.wait_for_aggregation(30)
        final = _trained(base, 8)
        with caplog.at_level(logging.WARNING, logger="branchkey_integrations.core.client"):
            receipt = client.upload_arrays(1.0, final)  # a delta from the first aggregate: stale
        aggregate = client.download_aggregate(client.wait_for_aggregation(30)).layers
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "difference from aggregate" in r.message]
    assert len(warnings) == 1, caplog.text
    assert first in warnings[0].message and second in warnings[0].message and "full weights" in warnings[0].message
    assert receipt.round == (1, 2) and client.encoding.delta_base is None  # the re-sent full upload counted
    for got, want in zip(aggregate, final):  # one leaf: the aggregate is its upload, exactly
        np.testing.assert_array_equal(got, want)


def test_a_branch_that_advertises_no_codecs_gets_full_uploads_as_before(inprocess_server, tmp_path) -> None:
    server, credentials = inprocess_server(1)
    with Client(credentials[0], host=server.url, transport="none", compression="deflate", delta=True,
                output_dir=tmp_path) as client:
        assert "delta_uploads" not in client.get_branch_config()["service"]
        client.upload_weights(1.0, _start(9))
        base = client.download_aggregate(client.wait_for_aggregation(30)).layers
        assert client.encoding.delta.base_id is not None  # a base is held, but the branch takes no deltas
        layers = _trained(base, 10)
        client.upload_weights(1.0, layers)
        assert client.encoding.delta_base is None
        aggregate = client.download_aggregate(client.wait_for_aggregation(30)).layers
    for got, want in zip(aggregate, layers):
        np.testing.assert_array_equal(got, want)


def test_with_delta_auto_a_leaf_of_a_branch_without_deltas_keeps_no_copy_of_the_aggregate(inprocess_server,
                                                                                         tmp_path) -> None:
    server, credentials = inprocess_server(1)
    with Client(credentials[0], host=server.url, transport="none", quantize="int8", output_dir=tmp_path) as client:
        client.upload_weights(1.0, _start(11))  # the branch advertises nothing: plain NPZ, as to the hosted platform
        client.download_aggregate(client.wait_for_aggregation(30))
        assert client.encoding.takes_deltas is False and client.encoding.delta.base_id is None


def test_a_new_client_that_downloads_before_it_uploads_sends_a_delta(inprocess_server, tmp_path) -> None:
    """As a simulation's turn does: a fresh client downloads the aggregate, trains, uploads."""
    server, credentials = inprocess_server(1)
    with Client(credentials[0], host=server.url, transport="none", quantize="int8", output_dir=tmp_path) as client:
        _advertise(server, client.branch_id, ["int8"])
        client.upload_weights(1.0, _start(12))
        first = client.wait_for_aggregation(30)
    with Client(credentials[0], host=server.url, transport="none", quantize="int8", output_dir=tmp_path) as client:
        base = client.download_aggregate(first).layers
        client.upload_weights(1.0, _trained(base, 13))
        assert client.encoding.delta_base == first
