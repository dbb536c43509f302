"""A whole round on a 1-leaf branch, this project's ``Client`` against the official 2.7.1 client.

A round is what a leaf does for one federated step: upload every layer, wait for the aggregation id
(a notification), download the aggregate and have every layer in memory. One ``branchkey-local serve``
subprocess with RabbitMQ (2.7.1 takes its notifications over AMQP) serves two 1-leaf branches, one
per client, so the server aggregates every upload at once (a round of one upload is that upload).

- **ours**: ``Client(transport="websocket")``: ``upload_weights`` + ``wait_for_aggregation`` +
  ``download_aggregate`` into a kept ``DownloadBuffer`` (what ``Federation``, so both callbacks, do);
- **official**: ``branchkey==2.7.1`` from PyPI in its own virtual environment (the test suite's,
  ``.official-venvs/branchkey-2.7.1``), in a child process (``benchmarks/official_round.py``):
  ``save_weights`` + ``file_upload`` + ``client.queue.get()`` + ``file_download`` + ``np.load`` of
  every layer, timed inside the child.

The two alternate round by round (one warm-up round each first), ``os.sync()`` before each;
medians of ``--repeat`` (default 7). Needs RabbitMQ with its management plugin (``.ci/setup``).

``python -m benchmarks.whole_round [--params 11689512] [--repeat 7] [--json out.json]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from branchkey_integrations.core.client import Client, DownloadBuffer

from .common import count, load_average, make_layers, save_report
from .harness import AMQP_URL, build_official_python, init_branch, serve

def _answer(child: subprocess.Popen) -> dict[str, Any]:
    """The child's next JSON line (the official client prints lines of its own on stdout too)."""
    while line := child.stdout.readline():
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"the official client's process ended (exit status {child.wait(10)})")


def measure(params: int, repeat: int) -> dict[str, Any]:
    layers = make_layers(params)
    with tempfile.TemporaryDirectory(prefix="bk-round-") as tmp:
        data_dir = Path(tmp) / "data"
        [ours_credentials] = init_branch(data_dir, 1, creds_dir=Path(tmp) / "ours")
        [official_credentials] = init_branch(data_dir, 1, creds_dir=Path(tmp) / "official")
        server = serve(data_dir, amqp_url=AMQP_URL)
        child = None
        try:
            spec = {"credentials": str(official_credentials), "host": server.url,
                    "shapes": [list(a.shape) for a in layers], "workdir": tmp}
            official = build_official_python("2.7.1")
            child = subprocess.Popen([str(official), str(Path(__file__).with_name("official_round.py")),
                                      json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert _answer(child).get("ready")
            client = Client(ours_credentials, host=server.url, transport="websocket")
            buffer = DownloadBuffer()

            def ours() -> float:
                start = time.perf_counter()
                client.upload_weights(10.0, layers)
                aggregation_id = client.wait_for_aggregation(timeout=600)
                archive = client.download_aggregate(aggregation_id, buffer=buffer)
                seconds = time.perf_counter() - start
                assert len(archive.layers) == len(layers)
                return seconds

            def official() -> float:
                child.stdin.write("round\n")
                child.stdin.flush()
                return float(_answer(child)["seconds"])

            ours(), official()  # warm-up: connections, first buffers
            times: dict[str, list[float]] = {"ours": [], "official": []}
            for _ in range(repeat):
                for name, run in (("ours", ours), ("official", official)):
                    os.sync()
                    times[name].append(run())
            client.close()
        finally:
            if child is not None:
                child.stdin.close()
                child.wait(30)
            server.forget_broker_leaves([json.loads(p.read_text()) for p in (ours_credentials, official_credentials)])
            server.stop()
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"params": count(layers), "model_mb": sum(a.nbytes for a in layers) / 1e6, "repeat": repeat,
            "seconds": medians, "all_seconds": times, "speedup": medians["official"] / medians["ours"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.whole_round", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=11_689_512)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    before = load_average()
    result = measure(args.params, args.repeat)
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpus": os.cpu_count(),
              "load_before": before, "load_after": load_average(), **result}
    target = save_report(report, args.json, "whole-round-")
    s = report["seconds"]
    print(f"whole round, 1-leaf branch, {report['params']:,} params ({report['model_mb']:.1f} MB), medians of "
          f"{report['repeat']}: ours {s['ours']:.3f} s, official 2.7.1 {s['official']:.3f} s: {report['speedup']:.1f}x "
          f"(load {report['load_before']:.2f} -> {report['load_after']:.2f})")
    print(f"saved {target}")
    return report


if __name__ == "__main__":
    main()
