"""One leaf of ``benchmarks.slow_link``, run inside its own network namespace (``ip netns exec``).

It builds its model (the shared ResNet-like layout, seeded by ``--seed``), connects a ``Client``
(WebSocket notifications) and prints ``ready``; on ``go`` from stdin it uploads, waits for the aggregation
id, downloads the aggregate into memory and prints one JSON line with its wall-clock stamps (the parent
takes the round from the earliest start to the latest end; one machine, one clock). ``--check`` then
compares the aggregate with the exact weighted mean of every leaf's model (regenerated from the seeds,
outside the timed part) and prints the largest and the RMS error, so a lossy codec's cost is on record.

>>> expected_mean([0, 1], [1.0, 3.0], 1000)[0].dtype
dtype('float64')
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

from branchkey_integrations.core.client import Client, DownloadBuffer

from .common import make_layers, resnet_like_shapes


def expected_mean(seeds: list[int], weightings: list[float], params: int) -> list[np.ndarray]:
    """The exact (float64) weighted mean of the leaves' models, layer by layer."""
    total = sum(weightings)
    mean: list[np.ndarray] | None = None
    for seed, weighting in zip(seeds, weightings):
        layers = make_layers(params, seed)
        if mean is None:
            mean = [np.zeros(a.shape, np.float64) for a in layers]
        for acc, layer in zip(mean, layers):
            acc += layer.astype(np.float64) * (weighting / total)
        del layers
    return mean or [np.zeros(s, np.float64) for s in resnet_like_shapes(params)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.slow_link_leaf")
    parser.add_argument("--credentials", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--params", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--weighting", type=float, required=True)
    parser.add_argument("--client-options", default="{}", help="JSON: more Client(...) keywords (codecs)")
    parser.add_argument("--upload-options", default="{}", help="JSON: more upload_weights(...) keywords")
    parser.add_argument("--check", default="", help="JSON {seeds, weightings}: compare the aggregate with their mean")
    args = parser.parse_args(argv)
    layers = make_layers(args.params, args.seed)
    client = Client(args.credentials, host=args.host, transport="websocket", request_timeout=1800,
                    download_timeout=1800, **json.loads(args.client_options))
    client.notifications.wait_connected(60)
    buffer = DownloadBuffer()
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    stamps: dict[str, Any] = {"start": time.time()}
    cpu = time.process_time()  # all threads: on a shared machine, CPU seconds say what the link did not
    receipt = client.upload_arrays(args.weighting, layers, **json.loads(args.upload_options))
    stamps["uploaded"] = time.time()
    stamps["upload_size"] = receipt.size
    stamps["codec"] = getattr(getattr(client, "encoding", None), "last_codec", None)
    aggregation_id = client.wait_for_aggregation(timeout=3600)
    stamps["notified"] = time.time()
    archive = client.download_aggregate(aggregation_id, buffer=buffer)
    stamps["end"] = time.time()
    stamps["cpu_s"] = time.process_time() - cpu
    aggregate = [np.asarray(a) for a in archive.layers]
    stamps["layers"] = len(aggregate)
    stamps["aggregate_dtype"] = str(aggregate[0].dtype) if aggregate else None
    if args.check:
        check = json.loads(args.check)
        exact = expected_mean(check["seeds"], check["weightings"], args.params)
        worst, squares, norm = 0.0, 0.0, 0.0
        for got, want in zip(aggregate, exact):
            diff = got.astype(np.float64) - want
            worst = max(worst, float(np.abs(diff).max()))
            squares += float(np.square(diff).sum())
            norm += float(np.square(want).sum())
        stamps["max_abs_error"] = worst
        stamps["relative_rms_error"] = (squares / norm) ** 0.5 if norm else 0.0
    print(json.dumps(stamps), flush=True)
    client.close()


if __name__ == "__main__":
    main()
