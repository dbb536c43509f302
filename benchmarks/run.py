"""``python -m benchmarks.run``: round trip, client memory, server aggregation, Lightning overhead.

Prints a table and saves the numbers as JSON (``benchmarks/results/<date>.json`` by default).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

from . import aggregation, lightning_overhead, memory, roundtrip
from .common import load_average, save_report

SIZES = (100_000, 11_689_512, 100_000_000)
QUICK_SIZES = (100_000, 11_689_512)
SECTIONS = ("roundtrip", "memory", "aggregation", "lightning")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, fewer repeats (about a minute)")
    parser.add_argument("--sizes", type=int, nargs="+", help="model sizes in parameters (float32)")
    parser.add_argument("--repeat", type=int, help="repetitions per measurement (medians are reported)")
    parser.add_argument("--leaves", type=int, nargs="+", default=[2, 8, 32], help="K for the aggregation benchmark")
    parser.add_argument("--only", choices=SECTIONS, nargs="+", default=list(SECTIONS))
    parser.add_argument("--json", type=Path, help="where to save the results (default: benchmarks/results/<date>.json)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    repeat = args.repeat or (3 if args.quick else 5)
    middle = min(sizes, key=lambda n: abs(n - 11_689_512))
    report: dict[str, Any] = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                          "load_before": load_average()},
                              "sizes": list(sizes), "repeat": repeat}
    if "roundtrip" in args.only:
        report["roundtrip"] = [roundtrip.measure_size(n, repeat) for n in sizes]
        report["roundtrip_bit_exact"] = roundtrip.check_correctness(min(sizes))
    if "memory" in args.only:
        report["memory"] = [memory.measure(n) for n in sizes]
    if "aggregation" in args.only:
        report["aggregation"] = aggregation.measure(middle, tuple(args.leaves))
    if "lightning" in args.only:
        width = 200 if args.quick else 1976
        report["lightning"] = lightning_overhead.measure(width, epochs=3, repeat=1 if args.quick else 3)
    report["machine"]["load_after"] = load_average()
    return report


def table(report: dict[str, Any]) -> str:
    lines = [f"load average {report['machine']['load_before']:.2f} -> {report['machine']['load_after']:.2f}, "
             f"{report['machine']['cpus']} CPUs, medians of {report['repeat']}"]
    for r in report.get("roundtrip", []):
        s = r["seconds"]
        lines.append(f"round trip {r['params']:>11,} params ({r['model_mb']:7.1f} MB): ours {s['ours']:.3f} s | "
                     f"official {s['official']:.3f} s ({r['speedup_vs_official']:.1f}x) | floor {s['floor']:.3f} s "
                     f"(ours/floor {r['ours_over_floor']:.2f}) | ours, fresh buffer {s['ours_fresh']:.3f} s "
                     f"({r['fresh_speedup_vs_official']:.1f}x)")
    for m in report.get("memory", []):
        lines.append(f"client peak extra memory {m['params']:>11,} params: " + " | ".join(
            f"{k} {m[k]['tracemalloc_peak_mb']:.1f} MB traced, {m[k]['peak_rss_growth_mb']:.1f} MB RSS "
            f"({m[k]['peak_over_model']:.2f}x model)" for k in ("ours", "official") if k in m))
    if "aggregation" in report:
        a = report["aggregation"]
        for k, run_ in a["runs"].items():
            lines.append(f"FedAvg K={k:>3} x {a['params']:,} params: {run_['seconds']:.2f} s, peak RSS +"
                         f"{run_['peak_rss_growth_mb']:.1f} MB, traced {run_['tracemalloc_peak_mb']:.1f} MB "
                         f"({run_['peak_over_model']:.2f}x model)")
    if "lightning" in report:
        lt = report["lightning"]
        lines.append(f"Lightning {lt['params']:,} params: fit {lt['fit_without_s']:.2f} s without, "
                     f"{lt['fit_with_s']:.2f} s with the callback: {lt['overhead_per_round_s']:.3f} s per round "
                     f"(an epoch: {lt['epoch_s']:.3f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    report = run(args)
    target = save_report(report, args.json)
    print(table(report))
    print(f"saved {target}")
    return report


if __name__ == "__main__":
    main()
