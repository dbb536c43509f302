"""The server takes uploads whose members use a codec registered from outside the package, and refuses a
payload kind it does not handle yet with a 400 that says so."""

from __future__ import annotations

import io

import numpy as np

from branchkey_integrations.core import tensor_codecs as codecs, wire
from branchkey_integrations.core.errors import ArchiveError
from branchkey_integrations.core.payload_kinds import FEDERATED_ANALYTICS, validate_upload

from ..toy_codec import Bz2Codec


def test_a_round_of_uploads_in_a_registered_codec_aggregates_to_the_weighted_mean(live) -> None:
    codec = codecs.register_codec(Bz2Codec())
    try:
        branch, leaves = live.make_branch(2)
        live.admin("PUT", f"/admin/v1/branches/{branch['id']}/codecs", {"codecs": [codec.name]}, expect=200)
        uploads = [([np.full((3, 4), value, np.float32), np.arange(5.0) * value], weighting)
                   for value, weighting in ((1.0, 1.0), (4.0, 3.0))]
        for leaf, (layers, weighting) in zip(leaves, uploads):
            answer = live.upload(leaf, wire.encode(layers, weighting, compression=codec.name))
            assert answer.status_code == 201, answer.text
        aggregate = live.fetch(leaves[0], live.wait_aggregate(branch["id"]))
    finally:
        codecs.unregister_codec(codec.name)
    np.testing.assert_allclose(aggregate.layers[0], np.full((3, 4), 3.25, np.float32))
    np.testing.assert_allclose(aggregate.layers[1], np.arange(5.0) * 3.25)
    stored = live.upload(leaves[0], wire.encode(uploads[0][0], 1.0, compression="none"))
    assert stored.status_code == 201, stored.text  # the next round goes on with official clients' archives


def test_an_upload_in_a_codec_the_server_does_not_know_is_a_400_naming_it(live) -> None:
    codec = codecs.register_codec(Bz2Codec())
    try:
        content = wire.encode([np.ones(3, np.float32)], 1.0, compression=codec.name)
    finally:
        codecs.unregister_codec(codec.name)
    _, leaves = live.make_branch(1)
    answer = live.upload(leaves[0], content)
    assert answer.status_code == 400
    assert "encoded with codec 'bz2-toy', which this reader does not know" in answer.json()["error"]


def test_a_federated_analytics_upload_goes_to_the_analytics_round_not_the_learning_one(live) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, __bk_payload_kind__=np.array("federated_analytics"), weighting=np.array([0.0]),
             loss_n=np.array([3.0]), loss_sum=np.array([1.5]))
    branch, leaves = live.make_branch(2)
    answer = live.upload(leaves[0], buffer.getvalue())
    assert answer.status_code == 201 and answer.json()["data"]["kind"] == "federated_analytics"
    assert live.rounds(branch["id"])[0]["upload_count"] == 0
