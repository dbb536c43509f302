"""Uploads in the float codecs (shuffle-zstd, fp16, bf16, int8) against the real server: negotiated through the
branch config, decoded inside the fold (the aggregate is NumPy's weighted mean of the decoded uploads, bit for
bit), and refused with a 400 that says why when the codec is not advertised or the member is damaged."""

from __future__ import annotations

import io
import struct
import zipfile

import numpy as np
import pytest

from branchkey_integrations.core import wire
from branchkey_integrations.core.float_codecs import FRAME_VALUES, INT8, INT8_BLOCK, SHUFFLE_ZSTD

from .conftest import auth

CODECS = ["int8", "fp16", "bf16"] + (["shuffle-zstd"] if SHUFFLE_ZSTD is not None else [])


def _advertise(live, branch_id: str, codecs: list[str]) -> None:
    live.admin("PUT", f"/admin/v1/branches/{branch_id}/codecs", {"codecs": codecs}, expect=200)


def test_the_branch_config_advertises_codecs_only_once_set(live) -> None:
    branch, leaves = live.make_branch(1)
    config = live.session.get(f"{live.url}/api/v1/config/branch/{branch['id']}", headers=_auth(leaves[0])).json()
    assert "codecs" not in config["data"]["service"]  # as the hosted platform: official clients see nothing new
    _advertise(live, branch["id"], ["int8", "fp16"])
    config = live.session.get(f"{live.url}/api/v1/config/branch/{branch['id']}", headers=_auth(leaves[0])).json()
    assert config["data"]["service"]["codecs"] == ["int8", "fp16"]
    refused = live.admin("PUT", f"/admin/v1/branches/{branch['id']}/codecs", {"codecs": ["gzip"]})
    assert "Expected codecs among" in refused["error"] and "gzip" in refused["error"]


@pytest.mark.parametrize("codec", CODECS)
def test_a_round_in_each_codec_aggregates_to_the_weighted_mean_of_the_decoded_uploads(live, codec) -> None:
    branch, leaves = live.make_branch(2)
    _advertise(live, branch["id"], [codec])
    rng = np.random.default_rng(1)
    uploads = [([rng.standard_normal((70, 9)).astype(np.float32), rng.standard_normal(600).astype(np.float32)], w)
               for w in (1.0, 3.0)]
    decoded = []
    for leaf, (layers, weighting) in zip(leaves, uploads):
        content = wire.encode(layers, weighting, compression=codec)
        decoded.append(wire.decode(content).layers)
        answer = live.upload(leaf, content)
        assert answer.status_code == 201, answer.text
    aggregate = live.fetch(leaves[0], live.wait_aggregate(branch["id"]))
    for index in range(2):  # what the server's fold computes, written the NumPy way
        expected = ((decoded[0][index].astype(np.float64) * 1.0 + decoded[1][index].astype(np.float64) * 3.0)
                    / 4.0).astype(np.float32)
        np.testing.assert_array_equal(aggregate.layers[index], expected)
    if codec != "shuffle-zstd":
        assert not np.array_equal(decoded[0][0], uploads[0][0][0])  # lossy: what the fold saw is the decoded value


def test_an_upload_in_a_codec_the_branch_does_not_advertise_is_a_400_naming_it_and_the_accepted_ones(live) -> None:
    branch, leaves = live.make_branch(1)
    _advertise(live, branch["id"], ["fp16"])
    answer = live.upload(leaves[0], wire.encode([np.ones(3, np.float32)], 1.0, compression="int8"))
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert "codec 'int8', which this branch does not accept; it accepts ['fp16']" in error


def _tampered(layers: list[np.ndarray], edit) -> bytes:
    """An int8 archive whose layer_0 member's encoded bytes are changed by ``edit`` (the directory made to match)."""
    content = wire.encode(layers, 1.0, compression="int8")
    source = zipfile.ZipFile(io.BytesIO(content))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            raw = _raw_member(content, info)
            if info.filename == "layer_0.npy":
                raw = edit(raw)
            info.compress_size = len(raw)
            _write_raw(target, info, raw)
    return out.getvalue()


def _raw_member(content: bytes, info: zipfile.ZipInfo) -> bytes:
    name_length, extra_length = struct.unpack_from("<HH", content, info.header_offset + 26)
    start = info.header_offset + 30 + name_length + extra_length
    return content[start:start + info.compress_size]


def _write_raw(target: zipfile.ZipFile, info: zipfile.ZipInfo, raw: bytes) -> None:
    """Write a member's encoded bytes as they are (zipfile cannot write an unknown method itself)."""
    info.header_offset = target.fp.tell()
    target.fp.write(info.FileHeader(False))
    target.fp.write(raw)
    target.filelist.append(info)
    target.NameToInfo[info.filename] = info
    target.start_dir = target.fp.tell()


def _frames_start(raw: bytes) -> int:
    """Where the first values frame starts (after the header's raw frame)."""
    return 9 + struct.unpack_from("<I", raw, 1)[0]


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 0.0])
def test_a_block_scale_that_is_nan_inf_or_zero_under_nonzero_values_is_refused(live, scale) -> None:
    branch, leaves = live.make_branch(1)
    _advertise(live, branch["id"], ["int8"])

    def bad_scale(raw: bytes) -> bytes:
        at = _frames_start(raw) + 9
        return raw[:at] + struct.pack("<f", scale) + raw[at + 4:]

    answer = live.upload(leaves[0], _tampered([np.full(10, 0.5, np.float32)], bad_scale))
    assert answer.status_code == 400, answer.text
    assert f"int8 block holds scale {scale!r}" in answer.json()["error"]


def test_a_truncated_encoded_member_is_refused(live) -> None:
    branch, leaves = live.make_branch(1)
    _advertise(live, branch["id"], ["int8"])
    answer = live.upload(leaves[0], _tampered([np.full(1000, 0.5, np.float32)], lambda raw: raw[:-100]))
    assert answer.status_code == 400, answer.text
    assert "layer_0 ended early; the archive is truncated" in answer.json()["error"]


def test_a_frame_decoding_past_the_declared_shape_is_refused_before_it_is_decoded(live) -> None:
    branch, leaves = live.make_branch(1)
    _advertise(live, branch["id"], ["int8"])

    def grow(raw: bytes) -> bytes:  # the frame says it decodes to a full frame's bytes: past the 40 declared
        at = _frames_start(raw)
        kind, size, _ = struct.unpack_from("<BII", raw, at)
        return raw[:at] + struct.pack("<BII", kind, size, 4 * FRAME_VALUES) + raw[at + 9:]

    answer = live.upload(leaves[0], _tampered([np.full(10, 0.5, np.float32)], grow))
    assert answer.status_code == 400, answer.text
    assert "past the 40 its member has left of its declared size; refused before decoding" in answer.json()["error"]


def test_int8_keeps_every_value_within_half_a_step_of_its_block_scale() -> None:
    values = np.random.default_rng(0).standard_normal(3 * INT8_BLOCK + 7).astype(np.float32)
    out = INT8.dequantized(values)
    for start in range(0, values.size, INT8_BLOCK):
        block = values[start:start + INT8_BLOCK]
        step = np.abs(block).max() / 127
        assert np.abs(out[start:start + INT8_BLOCK] - block).max() <= step / 2 * 1.0001


def _auth(leaf: dict[str, str]) -> dict[str, str]:
    return auth(leaf)
