"""BranchKeyCallback over TLS: a round of real Lightning training against ``serve --tls-cert/--tls-key``, the
callback verifying the server with the test's own CA bundle (``client_options={"ssl": ...}``)."""

from __future__ import annotations

import numpy as np

from branchkey_integrations import Client
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
