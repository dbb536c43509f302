"""BranchKeyCallback over TLS: a round of real Lightning training against ``serve --tls-cert/--tls-key``, the
callback verifying the server with the test's own CA bundle (``client_options={"ssl": ...}``); under mutual TLS
(``--tls-client-ca``) with a client certificate (``client_options={"cert": ...}``), and a leaf without one refused."""

from __future__ import annotations

import numpy as np
import pytest

from branchkey_integrations import Client, TransportError
from branchkey_integrations.lightning import BranchKeyCallback, federated_tensors

from ..integration.test_tls import ca, servers, start_tls  # noqa: F401 - fixtures
from .models import Recorder, TinyModel, loader, trainer
from .test_rounds import PARAMS, weighted_mean


def test_a_lightning_leaf_federates_over_https_and_wss(tmp_path, ca, servers) -> None:  # noqa: F811
    server, credentials = start_tls(tmp_path, ca, servers)
    model = TinyModel()
    partner = [np.full(t.shape, 0.5, np.float32) for _, t in federated_tensors(model)]
    with Client(credentials[1], host=server.url, ssl=str(ca.bundle), transport="none") as other:
        other.upload_weights(24.0, partner)
    before = Recorder("upload")
    callback = BranchKeyCallback(credentials[0], host=server.url, transport="websocket", timeout=60,
                                 client_options={"ssl": str(ca.bundle)})
    fit = trainer([before, callback], max_epochs=1)
    fit.fit(model, loader(8, 0))
    assert callback.round == 1 and server.url.startswith("https://")  # the server speaks nothing but TLS
    expected = weighted_mean([before.records[0], dict(zip(PARAMS, partner))], [8, 24], PARAMS)
    for name, tensor in model.named_parameters():
        np.testing.assert_allclose(tensor.detach().numpy(), expected[name], rtol=1e-6, atol=1e-7)


def test_a_lightning_leaf_with_a_client_certificate_federates_under_mutual_tls(tmp_path, ca, servers) -> None:  # noqa: F811
    leaf_cert = ca.client()
    cert = (str(leaf_cert.cert), str(leaf_cert.key))
    server, credentials = start_tls(tmp_path, ca, servers, 2, "--tls-client-ca", str(ca.bundle), probe={"cert": cert})
    with pytest.raises(TransportError) as refused:  # no certificate: refused at the handshake, before any HTTP
        Client(credentials[1], host=server.url, ssl=str(ca.bundle), transport="none", max_retries=0)
    assert "pass cert=(certificate file, key file)" in str(refused.value)
    model = TinyModel()
    partner = [np.full(t.shape, 0.25, np.float32) for _, t in federated_tensors(model)]
    with Client(credentials[1], host=server.url, ssl=str(ca.bundle), cert=cert, transport="none") as other:
        other.upload_weights(8.0, partner)
    before = Recorder("upload")
    callback = BranchKeyCallback(credentials[0], host=server.url, transport="websocket", timeout=60,
                                 client_options={"ssl": str(ca.bundle), "cert": cert})
    trainer([before, callback], max_epochs=1).fit(model, loader(8, 0))
    assert callback.round == 1  # REST, the WSS notification and the download, all under the client certificate
    expected = weighted_mean([before.records[0], dict(zip(PARAMS, partner))], [8, 8], PARAMS)
    for name, tensor in model.named_parameters():
        np.testing.assert_allclose(tensor.detach().numpy(), expected[name], rtol=1e-6, atol=1e-7)
