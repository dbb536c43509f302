"""Payload kinds: one object per kind decides the members the encoder writes, the member names the decoder
accepts and the upload check: federated_learning (layers and a weighting) and federated_analytics (named fields)."""

from __future__ import annotations

import io

import numpy as np
import pytest

from branchkey_integrations.core import protocol, wire
from branchkey_integrations.core.errors import ArchiveError
from branchkey_integrations.core.payload_kinds import (FEDERATED_ANALYTICS, FEDERATED_LEARNING, payload_kind,
                                                       validate_upload)


def savez(**members: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **members)
    return buffer.getvalue()


def test_the_encoder_writes_the_members_of_its_kind_and_the_decoder_reads_the_kind_back() -> None:
    layers = [np.ones(3, np.float32)]
    assert [key for key, _ in FEDERATED_LEARNING.members(layers, 2.0)] == [protocol.WEIGHTING_KEY, "layer_0"]
    archive = wire.decode(wire.encode(layers, 2.0))
    assert archive.kind == FEDERATED_LEARNING.name == protocol.KIND_FEDERATED_LEARNING
    validate_upload(archive)
    with pytest.raises(ArchiveError, match="holds named fields, not layers"):
        wire.prepare(layers, 2.0, kind=FEDERATED_ANALYTICS)


def test_an_analytics_archive_reads_back_as_the_official_client_writes_it() -> None:
    official = savez(__bk_payload_kind__=np.array("federated_analytics"), weighting=np.array([0.0]),
                     age_n=np.array([3], np.int64), age_sum=np.array([90.0]), site=np.array(["A"]),
                     tag=np.array([b"x"]))
    archive = wire.decode(official)
    assert archive.kind == FEDERATED_ANALYTICS.name and archive.layers == [] and archive.weighting is None
    assert sorted(archive.fields) == ["age_n", "age_sum", "site", "tag"]
    validate_upload(archive)
    ours = wire.decode(wire.prepare_fields({"age_n": np.array([3], np.int64), "age_sum": 90.0, "site": "A",
                                            "tag": np.array([b"x"])}).getvalue())
    assert {k: (v.dtype, v.tolist()) for k, v in ours.fields.items()} == \
        {k: (v.dtype, v.tolist()) for k, v in archive.fields.items()}
    assert np.load(io.BytesIO(wire.prepare_fields({"a": 1}).getvalue()))["__bk_payload_kind__"] == FEDERATED_ANALYTICS.name


@pytest.mark.parametrize(("members", "message"), [
    ({"__bk_payload_kind__": np.array("federated_analytics"), "weighting": np.array([0.0]), "layer_3": np.ones(2)},
     "Unexpected member 'layer_3.npy'; a 'federated_analytics' archive holds named fields"),
    ({"weighting": np.array([0.0]), "age_n": np.array([3])},
     "must declare '__bk_payload_kind__' = 'federated_analytics'"),
    ({"__bk_payload_kind__": np.array("federated_analytics"), "weighting": np.array([0.0])}, "holds no fields"),
    ({"__bk_payload_kind__": np.array("federated_analytics"), "n": np.array(3)}, "Field 'n' is a bare scalar"),
    ({"__bk_payload_kind__": np.array("federated_analytics"), "when": np.array(["2026-01-01"], "datetime64[D]")},
     "expected a numeric dtype"),
])
def test_a_malformed_analytics_archive_is_refused_naming_the_member(members, message) -> None:
    with pytest.raises(ArchiveError, match=message.replace("[", r"\[").replace("'", "'")):
        validate_upload(wire.decode(savez(**members)))


@pytest.mark.parametrize(("fields", "message"), [
    ({}, "No fields"), ({"weighting": 1.0}, "'weighting' is reserved"), ({"layer_0": 1.0}, "'layer_<n>' names"),
    ({"a/b": 1}, "no control character, '/'"), ({"x": {"a": 1}}, "fields are numbers, booleans or text"),
])
def test_the_encoder_refuses_what_the_official_client_refuses(fields, message) -> None:
    with pytest.raises(ArchiveError, match=message):
        wire.prepare_fields(fields)


def test_an_archive_of_an_unknown_kind_is_refused_naming_it() -> None:
    unknown = savez(__bk_payload_kind__=np.array("telemetry"), weighting=np.array([1.0]), layer_0=np.ones(2))
    with pytest.raises(ArchiveError, match="Payload kind 'telemetry' is not supported; expected 'federated_learning' or"):
        wire.decode(unknown)
    with pytest.raises(ArchiveError, match="not supported; expected"):
        payload_kind("telemetry")
    assert set(protocol.PAYLOAD_KINDS) == {FEDERATED_LEARNING.name, FEDERATED_ANALYTICS.name}
