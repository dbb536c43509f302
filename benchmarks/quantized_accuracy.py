"""Accuracy of ``simulate`` with quantized uploads against float32: each (framework, partition, seed) run three
ways (float32, int8 with error feedback, int8 without), the final federated accuracy of each written down.

Run: ``python -m benchmarks.quantized_accuracy [--frameworks lightning keras] [--seeds 0 1 2] [--out FILE]``.
CPU-heavy (each run trains 5 leaves for 5 rounds): results are written after every run, so an interrupted
sweep keeps what finished.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one_run(framework: str, partition: str, seed: int, quantize: str | None, feedback: bool) -> dict:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "branchkey_integrations.cli", "simulate", "--framework", framework,
                   "--leaves", "5", "--partition", partition, "--alpha", "0.5", "--seed", str(seed),
                   "--no-baselines", "--output", out]
        if quantize:
            command += ["--quantize", quantize] + ([] if feedback else ["--no-error-feedback"])
        started = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            return {"error": done.stderr[-2000:], "command": " ".join(command[1:])}
        report = json.loads((Path(out) / "report.json").read_text())
    rounds = report.get("rounds") or []
    accuracy = rounds[-1].get("global_accuracy") if rounds else None
    return {"accuracy": accuracy, "seconds": round(time.monotonic() - started, 1),
            "command": "branchkey-local " + " ".join(command[3:-2])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frameworks", nargs="+", default=["lightning", "keras"])
    parser.add_argument("--partitions", nargs="+", default=["iid", "dirichlet"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="benchmarks/results/quantized-accuracy.json")
    args = parser.parse_args()
    results: dict = {"load_before": os.getloadavg(), "cpus": os.cpu_count(), "runs": []}
    for seed in args.seeds:  # seed outermost: an interrupted sweep has every framework and partition once
        for framework in args.frameworks:
            for partition in args.partitions:
                for quantize, feedback in ((None, True), ("int8", True), ("int8", False)):
                    row = {"framework": framework, "partition": partition, "seed": seed,
                           "upload": quantize or "float32", "error_feedback": feedback if quantize else None,
                           **one_run(framework, partition, seed, quantize, feedback), "load": os.getloadavg()}
                    results["runs"].append(row)
                    print(json.dumps(row), flush=True)
                    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
