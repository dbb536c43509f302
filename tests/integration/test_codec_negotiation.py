"""The client's codec choice against a real branchkey-local: ``quantize=`` and ``compression=`` are used only where
the branch advertises the codec, error feedback carries the quantization residual into the next upload, and the
federation's checkpoint holds that residual."""

from __future__ import annotations

import numpy as np
import pytest
import requests

from branchkey_integrations import Client
from branchkey_integrations.core.federation import Federation
from branchkey_integrations.core.float_codecs import INT8, SHUFFLE_ZSTD


def _advertise(server, branch_id: str, codecs: list[str]) -> None:
    answer = server.admin("PUT", f"/admin/v1/branches/{branch_id}/codecs", json={"codecs": codecs})
    assert answer.status_code == 200, answer.text


def _layers(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((40, 30)).astype(np.float32), rng.standard_normal(7).astype(np.float32)]


def test_quantize_applies_only_where_the_branch_advertises_the_codec(inprocess_server, tmp_path) -> None:
    server, credentials = inprocess_server(1)
    # delta=False: these uploads quantize the weights themselves (tests/integration/test_delta_uploads.py: differences)
    with Client(credentials[0], host=server.url, transport="none", quantize="int8", output_dir=tmp_path,
                delta=False) as client:
        client.upload_weights(1.0, _layers(0))
        assert client.encoding.last_codec == "none"  # a branch that advertises nothing: plain NPZ, as always
        aggregate = client.download_aggregate(client.wait_for_aggregation(30))
        np.testing.assert_array_equal(aggregate.layers[0], _layers(0)[0])
        _advertise(server, client.branch_id, ["int8"])
        client.upload_weights(1.0, _layers(1))
        assert client.encoding.last_codec == "int8"
        residual = client.encoding.feedback.residual[0]
        assert 0 < np.abs(residual).max() <= np.abs(_layers(1)[0]).max() / 127  # at most half a step per block
        aggregate = client.download_aggregate(client.wait_for_aggregation(30))
        np.testing.assert_array_equal(aggregate.layers[0], INT8.dequantized(_layers(1)[0]))


def test_error_feedback_sends_the_layers_plus_the_last_residual(inprocess_server, tmp_path) -> None:
    server, credentials = inprocess_server(1)
    with Client(credentials[0], host=server.url, transport="none", quantize="int8", output_dir=tmp_path,
                delta=False) as client:
        _advertise(server, client.branch_id, ["int8"])
        layers = _layers(2)
        client.upload_weights(1.0, layers)
        first = client.download_aggregate(client.wait_for_aggregation(30)).layers[0].copy()
        residual = client.encoding.feedback.residual[0].copy()
        client.upload_weights(1.0, layers)
        second = client.download_aggregate(client.wait_for_aggregation(30)).layers[0]
    np.testing.assert_array_equal(second, INT8.dequantized(layers[0] + residual))
    # over the two rounds the mean of what was sent is closer to the layers than one quantization alone
    assert np.abs((first + second) / 2 - layers[0]).mean() < np.abs(first - layers[0]).mean()


def test_without_error_feedback_the_same_layers_quantize_the_same(inprocess_server, tmp_path) -> None:
    server, credentials = inprocess_server(1)
    with Client(credentials[0], host=server.url, transport="none", quantize="int8", error_feedback=False,
                output_dir=tmp_path) as client:
        _advertise(server, client.branch_id, ["int8"])
        client.upload_weights(1.0, _layers(3))
        assert client.encoding.feedback.residual == []
        aggregate = client.download_aggregate(client.wait_for_aggregation(30))
    np.testing.assert_array_equal(aggregate.layers[0], INT8.dequantized(_layers(3)[0]))


@pytest.mark.skipif(SHUFFLE_ZSTD is None, reason="shuffle-zstd needs the [zstd] extra (zstandard)")
def test_compression_auto_picks_shuffle_zstd_off_the_local_link_only_where_advertised(inprocess_server) -> None:
    from branchkey_integrations.core.codec_choice import choose_codec

    assert choose_codec("auto", None, "app.example.com", ["shuffle-zstd"]) == "shuffle-zstd"
    assert choose_codec("auto", None, "127.0.0.1", ["shuffle-zstd"]) == "none"  # loopback: CPU is the cost
    assert choose_codec("shuffle-zstd", None, "127.0.0.1", ["shuffle-zstd"]) == "shuffle-zstd"  # asked for
    assert choose_codec("shuffle-zstd", None, "app.example.com", None) in ("deflate", "none")  # not advertised


def test_the_federation_checkpoint_holds_the_residual_and_gives_it_back(inprocess_server) -> None:
    server, credentials = inprocess_server(1)
    federation = Federation(credentials[0], host=server.url, transport="none", timeout=30,
                            client_options={"quantize": "int8"})
    with federation.connect() as client:
        _advertise(server, client.branch_id, ["int8"])
        federation.run_round(_layers(4), weighting=1.0)
        state = federation.state_dict()
    assert [r.shape for r in state["error_feedback"]] == [(40, 30), (7,)]
    restored = Federation(credentials[0], host=server.url, transport="none", client_options={"quantize": "int8"})
    restored.load_state_dict(state)
    with restored.connect() as client:
        np.testing.assert_array_equal(client.encoding.feedback.residual[0], state["error_feedback"][0])


def test_an_aggregate_asked_encoded_is_the_same_bytes_for_every_leaf_and_decodes_to_the_codec(inprocess_server,
                                                                                               tmp_path) -> None:
    server, credentials = inprocess_server(2)
    clients = [Client(c, host=server.url, transport="none", quantize="int8", download_codec="int8",
                      output_dir=tmp_path / c["name"]) for c in credentials]
    try:
        _advertise(server, clients[0].branch_id, ["int8"])
        for client, seed in zip(clients, (5, 6)):
            client.upload_weights(1.0, _layers(seed))
        aggregation_id = clients[0].wait_for_aggregation(30)
        urls = [client._downloads.url(aggregation_id, "int8") for client in clients]
        bodies = [requests.get(url, timeout=30).content for url in urls]
        assert bodies[0] == bodies[1] and b"int8" in bodies[0]  # one encoding, every leaf: marked int8 members
        plain = requests.get(clients[0]._downloads.url(aggregation_id), timeout=30).content
        assert len(bodies[0]) < 0.4 * len(plain)  # a quarter of the values' bytes, plus headers of a tiny model
        got = clients[1].download_aggregate(aggregation_id).layers[0]
        stored = clients[0]._downloads.archive(aggregation_id, clients[0]._downloads.limits()).layers[0]
        np.testing.assert_array_equal(got, INT8.dequantized(stored))
        asked = requests.get(f"{server.url}/api/v1/file/download/{aggregation_id}?codec=fp16",
                                           headers=_leaf_auth(credentials[0]), timeout=30)
        assert asked.status_code == 200 and "codec=" not in asked.json()["data"]["download_url"]  # not advertised: as stored
        bad = requests.get(f"{server.url}/api/v1/file/download/{aggregation_id}?codec=", headers=_leaf_auth(credentials[0]),
                           timeout=30)
        assert bad.status_code == 400 and "Expected codec to be a codec name" in bad.text
    finally:
        for client in clients:
            client.close()


def _leaf_auth(leaf: dict[str, str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {leaf['id']}:{leaf['session_token']}", "LEAF": "true"}
