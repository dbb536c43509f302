"""A branch running Lightning model rounds with three leaves completes an analytics round at the same time,
every epoch, and loses no round of either kind (three leaf processes against a real branchkey-local)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from ..conftest import REPO
from .test_rounds import PARAMS, weighted_mean


def test_three_lightning_leaves_run_analytics_rounds_beside_their_model_rounds(server_factory, tmp_path):
    server, credentials = server_factory(3)
    samples, epochs = [16, 24, 40], 3
    leaves = []
    for index, (creds, count) in enumerate(zip(credentials, samples)):
        out = tmp_path / f"leaf{index}"
        log = open(tmp_path / f"leaf{index}.log", "w")
        leaves.append((out, subprocess.Popen(
            [sys.executable, "-m", "tests.lightning.analytics_leaf", str(creds), server.url, str(out), str(count),
             str(index), str(epochs)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)))
        log.close()
    for index, (out, process) in enumerate(leaves):
        assert process.wait(180) == 0, (tmp_path / f"leaf{index}.log").read_text()[-4000:]
    done = [json.loads((out / "done.json").read_text()) for out, _ in leaves]
    assert [d["round"] for d in done] == [epochs] * 3 and [d["analytics_rounds"] for d in done] == [epochs] * 3

    for number in range(1, epochs + 1):  # every model round: the weighted average, bit-identical on every leaf
        sent = [dict(np.load(out / f"upload_{number}.npz")) for out, _ in leaves]
        loaded = [dict(np.load(out / f"loaded_{number}.npz")) for out, _ in leaves]
        expected = weighted_mean(sent, samples, PARAMS)
        for name in PARAMS:
            np.testing.assert_allclose(loaded[0][name], expected[name], rtol=1e-6, atol=1e-7)
            for other in loaded[1:]:
                np.testing.assert_array_equal(other[name], loaded[0][name])

    for number in range(1, epochs + 1):  # every analytics round: its own index, exact, the same on every leaf
        results = [d["analytics"][number - 1] for d in done]
        assert {(r["run_number"], r["round_index"], r["contributors"]) for r in results} == {(1, number - 1, 3)}
        assert len({r["aggregation_id"] for r in results}) == 1
        pooled = np.concatenate([np.load(out / f"column_{number}.npy") for out, _ in leaves])
        fields = results[0]["fields"]
        assert fields["feature_n"] == [pooled.size] and fields["feature_nan"] == [0]
        assert fields["feature_min"] == [pooled.min()] and fields["feature_max"] == [pooled.max()]
        assert np.isclose(fields["feature_sum"][0], pooled.sum(), rtol=1e-15, atol=1e-12)
        assert np.isclose(results[0]["mean"], pooled.mean(), rtol=1e-12)
    logs = [(tmp_path / f"leaf{i}.log").read_text() for i in range(3)]
    for log in logs:  # each kind of round took only its own aggregate: no model round ever saw an analytics one
        assert "AggregateMismatchError" not in log and "Traceback" not in log and "Analytics round 1" in log
