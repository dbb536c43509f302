"""BranchKeyKerasCallback over TLS: a round of real Keras training against ``serve --tls-cert/--tls-key``, the
callback verifying the server with the test's own CA bundle (``client_options={"ssl": ...}``)."""

from __future__ import annotations

import numpy as np

from branchkey_integrations import Client
from branchkey_integrations.keras import BranchKeyKerasCallback, federated_variables

from ..integration.test_tls import ca, servers, start_tls  # noqa: F401 - fixtures
from .models import Recorder, snapshot, tiny_model
from .test_callback import X, fit
from .test_leaves import weighted_mean


def test_a_keras_leaf_federates_over_https_and_wss(tmp_path, ca, servers) -> None:  # noqa: F811
    server, credentials = start_tls(tmp_path, ca, servers)
    model = tiny_model()
    names = [v.path for v in federated_variables(model)]
    partner = [np.full(v.shape, 2.0, np.float32) for v in federated_variables(model)]
    with Client(credentials[1], host=server.url, ssl=str(ca.bundle), transport="none") as other:
        other.upload_weights(24.0, partner)
    before = Recorder("upload")
    callback = BranchKeyKerasCallback(credentials[0], server.url, transport="websocket", timeout=60,
                                      num_samples=len(X), client_options={"ssl": str(ca.bundle)})
    history = fit(model, [before, callback])
    assert history.history["branchkey_round"] == [1.0] and server.url.startswith("https://")
    expected = weighted_mean([before.records[0], dict(zip(names, partner))], [len(X), 24.0], names)
    after = snapshot(model)
    for name in names:
        np.testing.assert_allclose(after[name], expected[name], rtol=1e-6, atol=1e-7)
