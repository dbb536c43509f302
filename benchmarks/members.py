"""What an archive's member count costs the server: an upload of N one-value layers, nothing else.

A ``branchkey-local serve`` subprocess, a 1-leaf branch (so the upload is its round's aggregate); for each
N and compression, one upload of N float32 layers of one value each: seconds to its 201, seconds to its
aggregate, and the server process's CPU seconds over that span (``/proc/<pid>/stat``, every thread). The
bytes are few, so this is the per-member cost alone (issue 22, defect 8: 99,999 layers took 17-34 s).

``python -m benchmarks.members [--layers 10000 99999] [--serve-args "--max-members 200000"] [--json out.json]``
(the server takes at most ``serve --max-members`` members, 10,000 by default: pass it for more).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests

from branchkey_integrations.core import wire

from .common import load_average, local_server, save_report, wait_for_aggregate


def server_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(layers: int, compression: str, serve_args: tuple[str, ...] = ()) -> dict[str, Any]:
    body = wire.encode([np.ones(1, np.float32)] * layers, 1.0, compression=compression)
    with local_server(1, serve_args=serve_args) as bench:
        leaf = json.loads(bench.credentials[0].read_text())
        pid = bench.server.process.pid
        cpu, start = server_cpu_s(pid), time.perf_counter()
        answer = requests.post(bench.server.url + "/api/v1/file/upload", files={"file": ("w.npz", body)},
                               data={"data": json.dumps({"leaf_name": leaf["name"], "metadata": "{}"})},
                               headers={"Authorization": f"Bearer {leaf['id']}:{leaf['session_token']}"}, timeout=600)
        answered = time.perf_counter() - start
        result = {"layers": layers, "compression": compression, "archive_bytes": len(body),
                  "status": answer.status_code, "answer_s": answered}
        if answer.status_code != 201:
            return {**result, "error": answer.json().get("error", "")[:300], "server_cpu_s": server_cpu_s(pid) - cpu}
        wait_for_aggregate(bench)
        return {**result, "aggregate_s": time.perf_counter() - start, "server_cpu_s": server_cpu_s(pid) - cpu}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.members", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[10_000, 99_999])
    parser.add_argument("--compression", nargs="+", default=["deflate", "none"], choices=sorted(wire.COMPRESSIONS))
    parser.add_argument("--serve-args", default="", help="more 'serve' options, as one string")
    parser.add_argument("--json", type=Path, help="where to write the results (default: results/members-<date>.json)")
    args = parser.parse_args(argv)
    load = load_average()
    runs = [measure(n, compression, tuple(shlex.split(args.serve_args)))
            for n in args.layers for compression in args.compression]
    report = {"load_before": load, "load_after": load_average(), "serve_args": args.serve_args, "runs": runs}
    print(f"{'layers':>8} {'compression':>11} {'status':>6} {'201 s':>7} {'aggregate s':>11} {'server CPU s':>12}")
    for run in runs:
        print(f"{run['layers']:>8} {run['compression']:>11} {run['status']:>6} {run['answer_s']:>7.2f} "
              f"{run.get('aggregate_s', float('nan')):>11.2f} {run['server_cpu_s']:>12.2f}")
    print(f"saved {save_report(report, args.json, 'members-')}")
    return report


if __name__ == "__main__":
    main()
