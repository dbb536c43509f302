"""The streamed upload body: exact length, re-readable for retries, the parts the protocol names."""

from __future__ import annotations

import numpy as np

from branchkey_integrations.core import wire
from branchkey_integrations.core.client import MultipartBody
from branchkey_integrations.core.transfer import is_local_host


def test_multipart_body_has_its_declared_length_and_replays_identically():
    archive = wire.prepare([np.arange(10, dtype=np.float32)], 2.0, compression="none")
    body = MultipartBody('{"leaf_name": "a"}', "weights.npz", archive.chunks, archive.size)
    first, second = b"".join(body), b"".join(body)
    assert first == second and len(first) == len(body)
    assert archive.getvalue() in first and b'name="data"\r\n\r\n{"leaf_name": "a"}\r\n' in first
    boundary = body.content_type.split("boundary=")[1].encode()
    assert first.endswith(b"\r\n--" + boundary + b"--\r\n")


def test_auto_compression_stores_on_local_links_only():
    assert all(is_local_host(h) for h in ("127.0.0.1", "localhost", "::1", "10.1.2.3", "192.168.0.7"))
    assert not any(is_local_host(h) for h in ("app.branchkey.com", "8.8.8.8"))
