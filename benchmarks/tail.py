"""The server's work after a round's last upload, in this process: its fold and writing the mean.

What ``branchkey-local`` does between the last upload's 201 and the aggregate (besides a commit and
a notification): :class:`RunningSum` folds that upload into the float64 sum, then writes the mean
(the fsync follows the announcement). The earlier uploads are folded before the clock starts, so
every K costs the same: K = 3 here. Wall seconds *and* the CPU seconds of this process (the hashing
thread included) are reported, medians of ``--repeat``: on a shared machine the CPU seconds are the
figure that does not depend on the other jobs. The fsync is timed on its own.

``python -m benchmarks.tail [--params 50000000 11689512] [--repeat 5] [--json out.json]``
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from branchkey_integrations.core import wire
from branchkey_integrations.server.aggregation import RunningSum
from branchkey_integrations.server.durable import fsync_path

from .common import count, load_average, make_layers, save_report


def measure(params: int, repeat: int) -> dict[str, Any]:
    layers = make_layers(params)
    model_mb = sum(a.nbytes for a in layers) / 1e6
    runs: dict[str, list[float]] = {"wall_s": [], "cpu_s": [], "fsync_s": []}
    with tempfile.TemporaryDirectory(prefix="bk-tail-") as tmp:
        uploads = []
        for number in range(3):
            path = Path(tmp) / f"upload-{number}.npz"
            wire.encode(layers, float(number + 1), path, compression="none")
            uploads.append((f"leaf-{number}", path.stem, path, float(number + 1)))
        for attempt in range(repeat):
            running = RunningSum()
            running.sync(uploads[:2])  # the sum allocated, the earlier uploads folded as they arrived
            destination = Path(tmp) / f"mean-{attempt}.npz"
            wall, cpu = time.perf_counter(), time.process_time()
            running.sync(uploads)  # the last upload's fold
            running.write(destination, durable=False)
            runs["wall_s"].append(time.perf_counter() - wall)
            runs["cpu_s"].append(time.process_time() - cpu)
            start = time.perf_counter()
            fsync_path(destination)
            runs["fsync_s"].append(time.perf_counter() - start)
            destination.unlink()
    medians = {name: statistics.median(values) for name, values in runs.items()}
    return {"params": count(layers), "model_mb": model_mb, "repeat": repeat, "runs": runs, **medians,
            "cpu_s_per_100mb": medians["cpu_s"] / model_mb * 100, "wall_s_per_100mb": medians["wall_s"] / model_mb * 100}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tail", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, nargs="+", default=[11_689_512, 50_000_000])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpus": os.cpu_count(),
                              "load_before": load_average()}
    report["sizes"] = [measure(params, args.repeat) for params in args.params]
    report["load_after"] = load_average()
    target = save_report(report, args.json, "tail-")
    for size in report["sizes"]:
        print(f"{size['params']:,} params ({size['model_mb']:.1f} MB): last fold + mean written {size['wall_s']:.3f} s "
              f"wall, {size['cpu_s']:.3f} s CPU ({size['cpu_s_per_100mb']:.3f} s CPU per 100 MB); then its fsync "
              f"{size['fsync_s']:.3f} s (medians of {size['repeat']}; load {report['load_before']:.2f} -> "
              f"{report['load_after']:.2f})")
    print(f"saved {target}")
    return report


if __name__ == "__main__":
    main()
