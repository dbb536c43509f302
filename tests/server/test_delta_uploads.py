"""Delta uploads at the server's HTTP API: the branch config says the server takes them only where codecs are
advertised; a delta naming anything but the branch's latest aggregate is a 409 naming both ids, given before the
body is decoded; a delta that does not fit its base is a 400; an official client's upload is unchanged."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from branchkey_integrations.core import wire
from branchkey_integrations.core.delta import xor_bits
from branchkey_integrations.core.errors import ArchiveError
from branchkey_integrations.core.float_codecs import FP16, SHUFFLE_ZSTD
from branchkey_integrations.core.npy import npy_member

from .conftest import auth


def _data(leaf: dict[str, str], base: object) -> str:
    return json.dumps({"leaf_name": leaf["name"], "metadata": "{}", "delta_base": base})


def _branch_with_an_aggregate(live, codecs: list[str]) -> tuple[dict, dict[str, str], str, np.ndarray]:
    branch, [leaf] = live.make_branch(1)
    if codecs:
        live.admin("PUT", f"/admin/v1/branches/{branch['id']}/codecs", {"codecs": codecs}, expect=200)
    layer = np.linspace(-1, 1, 500, dtype=np.float32)
    assert live.upload(leaf, wire.encode([layer], 1.0, compression="none")).status_code == 201
    return branch, leaf, live.wait_aggregate(branch["id"]), layer


def test_the_config_says_deltas_are_taken_only_where_codecs_are_advertised(live) -> None:
    branch, [leaf] = live.make_branch(1)
    service = live.session.get(f"{live.url}/api/v1/config/branch/{branch['id']}", headers=auth(leaf)).json()
    assert "delta_uploads" not in service["data"]["service"]  # as the hosted platform: nothing new for official clients
    live.admin("PUT", f"/admin/v1/branches/{branch['id']}/codecs", {"codecs": ["int8"]}, expect=200)
    service = live.session.get(f"{live.url}/api/v1/config/branch/{branch['id']}", headers=auth(leaf)).json()
    assert service["data"]["service"]["delta_uploads"] is True


def test_a_delta_from_the_latest_aggregate_is_rebuilt_and_one_from_elsewhere_is_a_409_naming_both(live) -> None:
    branch, leaf, latest, layer = _branch_with_an_aggregate(live, ["int8"])
    _, _, foreign, _ = _branch_with_an_aggregate(live, ["int8"])
    weights = layer + np.float32(1e-3)
    delta = wire.encode([xor_bits(weights, layer)], 1.0, compression="none")
    refused = live.upload(leaf, delta, data=_data(leaf, foreign))  # another branch's aggregate
    assert refused.status_code == 409
    assert f"its base '{foreign}' is not an aggregate of branch {branch['id']}" in refused.json()["error"]
    assert latest in refused.json()["error"]
    unknown = live.upload(leaf, b"not even a zip", data=_data(leaf, "no-such-aggregate"))
    assert unknown.status_code == 409  # before the body is decoded: garbage would be a 400
    assert "'no-such-aggregate' is not an aggregate" in unknown.json()["error"]
    accepted = live.upload(leaf, delta, data=_data(leaf, latest))
    assert accepted.status_code == 201, accepted.text
    rebuilt = live.fetch(leaf, live.wait_aggregate(branch["id"], index=1))
    np.testing.assert_array_equal(rebuilt.layers[0], weights)
    stale = live.upload(leaf, delta, data=_data(leaf, latest))  # the branch has moved on to the next aggregate
    assert stale.status_code == 409
    assert f"its base is aggregate {latest}, but the branch's latest aggregate is" in stale.json()["error"]


def test_a_delta_that_does_not_fit_its_base_or_names_no_text_is_a_400(live) -> None:
    _, leaf, latest, layer = _branch_with_an_aggregate(live, ["int8"])
    wrong_shape = wire.encode([np.zeros(499, np.uint32)], 1.0, compression="none")
    answer = live.upload(leaf, wrong_shape, data=_data(leaf, latest))
    assert answer.status_code == 400 and "as a difference from its base" in answer.json()["error"]
    wrong_dtype = wire.encode([np.zeros(500, np.int32)], 1.0, compression="none")
    answer = live.upload(leaf, wrong_dtype, data=_data(leaf, latest))
    assert answer.status_code == 400 and "dtype uint32 or float32" in answer.json()["error"]
    nan_bits = xor_bits(np.full(500, np.nan, np.float32), layer)  # rebuilds to NaN: refused like any NaN upload
    answer = live.upload(leaf, wire.encode([nan_bits], 1.0, compression="none"), data=_data(leaf, latest))
    assert answer.status_code == 400 and "non-finite" in answer.json()["error"]
    answer = live.upload(leaf, wire.encode([layer], 1.0), data=_data(leaf, 42))
    assert answer.status_code == 400 and "expected an aggregation id" in answer.json()["error"]


def test_an_official_clients_upload_is_unchanged_on_a_branch_that_takes_deltas(live) -> None:
    branch, leaf, _, layer = _branch_with_an_aggregate(live, ["int8"])
    weights = layer * np.float32(2)
    answer = live.upload(leaf, wire.encode([weights], 5.0))  # part data without delta_base, deflated as numpy writes
    assert answer.status_code == 201, answer.text
    np.testing.assert_array_equal(live.fetch(leaf, live.wait_aggregate(branch["id"], index=1)).layers[0], weights)


@pytest.mark.skipif(SHUFFLE_ZSTD is None, reason="shuffle-zstd needs the [zstd] extra (zstandard)")
def test_xor_bits_travel_as_frames_of_four_compressed_planes_and_a_damaged_one_is_refused() -> None:
    base = np.random.default_rng(3).standard_normal(5000).astype(np.float32)
    bits = xor_bits(base + np.float32(1e-4), base)
    header, data = npy_member("layer_0", bits, False)
    encoded = SHUFFLE_ZSTD.encode(header + bytes(data))
    at = 9 + len(header)  # after the header's raw frame
    assert encoded[at] == 2 and len(encoded) < 0.5 * bits.nbytes  # a frame of bits; its high planes nearly vanish
    assert SHUFFLE_ZSTD.decode(encoded) == header + bytes(data)
    first_plane = struct.unpack_from("<I", encoded, at + 9)[0]
    damaged = encoded[:at + 9] + struct.pack("<I", first_plane + 1) + encoded[at + 13:]
    with pytest.raises(ArchiveError, match="do not fit its"):
        SHUFFLE_ZSTD.decode(damaged)
    with pytest.raises(ArchiveError, match="holds a frame of bits, which fp16 never writes"):
        FP16.decode(encoded)
