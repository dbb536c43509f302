"""Payload kinds: one object per kind decides the members the encoder writes, the member names the decoder
accepts and the upload check; federated_analytics is declared and refused as not supported yet."""

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
    with pytest.raises(ArchiveError, match="'federated_analytics' is not supported yet"):
        wire.prepare(layers, 2.0, kind=FEDERATED_ANALYTICS)


def test_an_archive_of_a_kind_not_handled_is_refused_naming_it() -> None:
    analytics = savez(__bk_payload_kind__=np.array("federated_analytics"), weighting=np.array([0.0]),
                      loss_n=np.array([3.0]))
    with pytest.raises(ArchiveError, match="Payload kind 'federated_analytics' is not supported yet"):
        wire.decode(analytics)
    unknown = savez(__bk_payload_kind__=np.array("telemetry"), weighting=np.array([1.0]), layer_0=np.ones(2))
    with pytest.raises(ArchiveError, match="Payload kind 'telemetry' is not supported; expected 'federated_learning'"):
        wire.decode(unknown)
    with pytest.raises(ArchiveError, match="not supported; expected"):
        payload_kind("telemetry")
    assert set(protocol.PAYLOAD_KINDS) == {FEDERATED_LEARNING.name, FEDERATED_ANALYTICS.name}
