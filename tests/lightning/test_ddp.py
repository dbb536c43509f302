"""Two-process DDP (gloo, CPU): only rank 0 talks to the platform, every rank loads the same aggregate."""

from __future__ import annotations

import numpy as np

from branchkey_integrations.lightning import BranchKeyCallback, federated_tensors

from .models import DiskRecorder, TinyModel, loader, trainer
from ..conftest import partner_upload
from .test_rounds import PARAMS, weighted_mean


def test_ddp_two_ranks_load_identical_aggregates(server_factory, tmp_path):
    server, credentials = server_factory(2)
    partner = [np.full(t.shape, 0.25, np.float32) for _, t in federated_tensors(TinyModel())]
    partner_upload(credentials[1], server, partner, 16.0)
    callback = BranchKeyCallback(credentials[0], host=server.url, transport="websocket", timeout=60)
    out = tmp_path / "records"
    fit = trainer([DiskRecorder(out, "upload"), callback, DiskRecorder(out, "loaded")],
                  strategy="ddp_spawn", devices=2)
    fit.fit(TinyModel(), loader(16, 0))

    sent = dict(np.load(out / "upload_rank0_1.npz"))
    assert sent["__connected__"].tolist() == [True]  # only global rank 0 has a client
    assert np.load(out / "upload_rank1_1.npz")["__connected__"].tolist() == [False]
    for name in PARAMS:  # DDP keeps ranks in sync, so rank 0's upload is the model's
        np.testing.assert_array_equal(dict(np.load(out / "upload_rank1_1.npz"))[name], sent[name])
    expected = weighted_mean([sent, dict(zip(PARAMS, partner))], [16, 16], PARAMS)
    loaded = [dict(np.load(out / f"loaded_rank{rank}_1.npz")) for rank in (0, 1)]
    for name in PARAMS:
        np.testing.assert_allclose(loaded[0][name], expected[name], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(loaded[1][name], loaded[0][name])

