"""``branchkey-local simulate`` at scale on the ray backend, as a user runs it (the CLI in a subprocess),
with the memory of the whole simulation: the CLI, the embedded server, Ray's own processes and its workers.

Three cases (``--case``, several allowed):

- ``scale``: ``--leaves`` (100) Lightning leaves, ``--max-concurrent-leaves 4``, tiny budget (1 epoch a round,
  ~14 samples a leaf), no baselines: completes? peak memory of all processes (goal <= 6 GB);
- ``sampling``: ``--leaves 100 --leaves-per-round 10 --rounds 10``: 10 rounds of 10 uploads each;
- ``agree``: the same seed on the process and the ray backend (``--agree-leaves`` 10 leaves, 5 rounds):
  final federated accuracy on each (goal: within 0.5 points).

Memory: every 0.25 s the process tree under the CLI (``/proc``, children of children) is summed, as RSS
(shared pages counted once per process: an upper bound) and as PSS (``smaps_rollup``: shared pages split
between their users, so the sum is the memory the tree really holds); the peaks of both are reported.

``python -m benchmarks.ray_simulation [--case scale sampling agree] [--leaves 100] [--rounds 3] [--json PATH]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .common import load_average, save_report


def _tree(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [root], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def _kb(path: Path, field: str) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _memory_mb(root: int) -> tuple[float, float, int]:
    """(RSS sum, PSS sum, processes) of the tree under ``root``."""
    pids = _tree(root)
    rss = sum(_kb(Path(f"/proc/{pid}/status"), "VmRSS") for pid in pids)
    pss = sum(_kb(Path(f"/proc/{pid}/smaps_rollup"), "Pss") for pid in pids)
    return rss / 1024, pss / 1024, len(pids)


def simulate(args: list[str], timeout: float) -> dict[str, Any]:
    """Run ``branchkey-local simulate ARGS``; its exit code, time, report and peak memory."""
    with tempfile.TemporaryDirectory(prefix="bk-ray-bench-") as tmp:
        output = Path(tmp) / "out"
        started = time.monotonic()
        process = subprocess.Popen([sys.executable, "-m", "branchkey_integrations.cli", "simulate", *args,
                                    "--output", str(output)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
        peak = {"rss_mb": 0.0, "pss_mb": 0.0, "processes": 0}
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                rss, pss, count = _memory_mb(process.pid)
                peak["rss_mb"], peak["pss_mb"] = max(peak["rss_mb"], rss), max(peak["pss_mb"], pss)
                peak["processes"] = max(peak["processes"], count)
                done.wait(0.25)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            out, _ = process.communicate(timeout=timeout)
        finally:
            done.set()
            sampler.join()
            if process.poll() is None:
                process.terminate()
                process.wait(60)
        result: dict[str, Any] = {"args": args, "exit_code": process.returncode,
                                  "seconds": round(time.monotonic() - started, 1),
                                  "peak_rss_sum_mb": round(peak["rss_mb"]), "peak_pss_sum_mb": round(peak["pss_mb"]),
                                  "peak_processes": peak["processes"], "output_tail": out.splitlines()[-12:]}
        report_file = output / "report.json"
        if report_file.exists():
            report = json.loads(report_file.read_text())
            result["final_accuracy"] = report["rounds"][-1]["global_accuracy"]
            result["uploads_per_round"] = [len(r["leaves"]) for r in report["rounds"]]
            result["rounds"] = len(report["rounds"])
            result["nodes"] = sorted({n for leaf in report["leaves"] for n in leaf["nodes"]})
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ray_simulation", description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs="+", choices=["scale", "sampling", "agree"], default=["scale", "sampling"])
    parser.add_argument("--leaves", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the scale case")
    parser.add_argument("--agree-leaves", type=int, default=10)
    parser.add_argument("--agree-rounds", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--json", type=Path, help="default: benchmarks/results/ray-simulation-<date>.json")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"load_before": load_average()}
    tiny = ["--epochs-per-round", "1", "--no-baselines", "--seed", "0"]
    if "scale" in args.case:
        report["scale"] = simulate(["--backend", "ray", "--leaves", str(args.leaves), "--rounds", str(args.rounds),
                                    "--max-concurrent-leaves", "4", *tiny], args.timeout)
        print(json.dumps(report["scale"], indent=2), flush=True)
    if "sampling" in args.case:
        report["sampling"] = simulate(["--backend", "ray", "--leaves", str(args.leaves), "--leaves-per-round", "10",
                                       "--rounds", "10", "--max-concurrent-leaves", "4", *tiny], args.timeout)
        print(json.dumps(report["sampling"], indent=2), flush=True)
    if "agree" in args.case:
        common = ["--leaves", str(args.agree_leaves), "--rounds", str(args.agree_rounds), *tiny]
        report["agree"] = {backend: simulate(["--backend", backend, *common], args.timeout)
                           for backend in ("process", "ray")}
        accuracies = [report["agree"][b].get("final_accuracy") for b in ("process", "ray")]
        if None not in accuracies:
            report["agree"]["difference_points"] = round(100 * abs(accuracies[0] - accuracies[1]), 3)
        print(json.dumps(report["agree"], indent=2), flush=True)
    report["load_after"] = load_average()
    print(f"saved {save_report(report, args.json, 'ray-simulation-')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
