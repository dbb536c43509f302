"""Server aggregation (FedAvg) of K uploads on disk: time and peak memory, each K in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

from branchkey_integrations.core import wire
from branchkey_integrations.server.aggregation import aggregate_files

from .common import current_rss_mb, make_layers, peak_rss_mb


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Aggregate the given files here; report seconds and peak RSS above the pre-aggregation RSS."""
    uploads = [(path, float(index + 1)) for index, path in enumerate(spec["paths"])]
    specs = [wire.LayerSpec(tuple(shape), np.dtype(dtype)) for shape, dtype in spec["specs"]]
    before = current_rss_mb()
    tracemalloc.start()
    start = time.perf_counter()
    aggregate_files(uploads, specs, spec["destination"])
    seconds = time.perf_counter() - start
    traced = tracemalloc.get_traced_memory()[1] / 1e6
    peak = peak_rss_mb()
    return {"seconds": seconds, "peak_rss_growth_mb": peak - before, "tracemalloc_peak_mb": traced,
            "rss_before_mb": before}


def measure(params: int, leaves: tuple[int, ...]) -> dict[str, Any]:
    layers = make_layers(params)
    model_mb = sum(a.nbytes for a in layers) / 1e6
    specs = [(list(a.shape), a.dtype.str) for a in layers]
    results: dict[str, Any] = {"params": sum(a.size for a in layers), "model_mb": model_mb, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bk-agg-") as tmp:
        paths = []
        for index in range(max(leaves)):
            path = Path(tmp) / f"upload-{index}.npz"
            wire.encode([a + np.float32(index * 1e-3) for a in layers], float(index + 1), path, compression="none")
            paths.append(str(path))
        for k in leaves:
            spec = {"paths": paths[:k], "specs": specs, "destination": str(Path(tmp) / "aggregate.npz")}
            output = subprocess.run([sys.executable, "-m", "benchmarks.aggregation", json.dumps(spec)],
                                    capture_output=True, text=True, check=True, timeout=900)
            run = json.loads(output.stdout.strip().splitlines()[-1])
            run["peak_over_model"] = max(run["peak_rss_growth_mb"], run["tracemalloc_peak_mb"]) / model_mb
            results["runs"][str(k)] = run
    return results


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
