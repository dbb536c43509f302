"""Peak extra client memory during one round, measured in a fresh subprocess per method.

The child builds the model, then measures one round trip (``roundtrip.py``'s definition)
with tracemalloc (numpy registers its buffers with it, so arrays, bytes and bytearrays all
count) and the growth of the peak RSS (VmHWM). The aggregate the round returns is part of the peak:
a round must hand the new weights back.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

from branchkey_integrations.core.client import Client

from .common import current_rss_mb, local_server, make_layers, peak_rss_mb
from .roundtrip import official_round_trip, prepare_branch


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One round of ``spec["method"]`` in this process: (tracemalloc peak, peak RSS growth) in MB."""
    layers = make_layers(spec["params"])
    client = Client(spec["credentials"], host=spec["url"], transport="none", output_dir=spec["workdir"])
    model_mb = sum(a.nbytes for a in layers) / 1e6
    rss_before = current_rss_mb()
    tracemalloc.start()
    if spec["method"] == "ours":
        client.upload_weights(10.0, layers)
        result = client.download_aggregate(spec["aggregate_id"])
    else:
        official_round_trip(client, layers, spec["aggregate_id"], Path(spec["workdir"]))
        result = None
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    peak_mb = peak_rss_mb()
    client.close()
    del result
    return {"model_mb": model_mb, "tracemalloc_peak_mb": peak, "peak_rss_growth_mb": peak_mb - rss_before,
            "peak_over_model": max(peak, peak_mb - rss_before) / model_mb}


def measure(params: int, methods: tuple[str, ...] = ("ours", "official")) -> dict[str, Any]:
    layers = make_layers(params)
    with local_server(2) as bench:
        client, aggregate_id = prepare_branch(bench, layers)
        client.close()
        results = {}
        for method in methods:
            spec = {"method": method, "params": params, "credentials": str(bench.credentials[0]),
                    "url": bench.server.url, "aggregate_id": aggregate_id, "workdir": str(bench.workdir)}
            output = subprocess.run([sys.executable, "-m", "benchmarks.memory", json.dumps(spec)],
                                    capture_output=True, text=True, check=True, timeout=900)
            results[method] = json.loads(output.stdout.strip().splitlines()[-1])
    return {"params": params, **results}


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
