"""A whole round over a slow link: ours (float32 and each codec) and Flower 1.42, on the same shaped link.

The server and each of 2 leaves live in network namespaces of the benchmark's own (:mod:`.netns`), every
leaf on a veth pair of its own shaped by ``tc tbf`` at ``--rates`` Mbit/s in both directions (each end's
egress), with a ``netem`` delay where the kernel has one (``--delay-ms``). For each rate:

- **ours**, once per ``--paths`` entry: ``branchkey-local serve`` in the server's namespace (``--host
  0.0.0.0``), a 2-leaf branch, one :mod:`.slow_link_leaf` process per leaf namespace holding its own
  ResNet-like float32 model of ``--params`` parameters. Both leaves get ``go`` at once: upload, the
  aggregation id over the WebSocket, download of the aggregate; the round is the earliest start to the
  latest end. Leaf 0 then checks the aggregate against the exact weighted mean (errors in the JSON).
- **Flower** (:mod:`.slow_link_flower`, ``--flower-python``): superlink, supernodes, ``flwr run``, FedAvg,
  one round of NumPy arrays of the same shapes, timed inside its ``ServerApp``.

Bytes are counted on each leaf's veth end (kernel counters: what crossed the link, headers included),
sent + received during the round. Results go to ``benchmarks/results/slow-link-<date>.json`` (or
``--json``) with the load average before and after. Needs root (``ip netns``); without it, it says why
and exits with status 2.

``python -m benchmarks.slow_link [--params 100000000] [--rates 100 20] [--paths float32 int8 flower]
[--flower-python .flwr-venv/bin/python] [--delay-ms 10] [--json out.json]``

>>> sorted(PATHS)
['bf16', 'deflate', 'float32', 'fp16', 'fp16-both', 'int8', 'int8-both', 'lossless']
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .common import load_average, make_layers, save_report
from .harness import REPO, init_branch, wait_until
from .netns import Topology, unavailable_reason

PORT = 8080
WEIGHTINGS = (10.0, 11.0)

#: path name -> (``Client(...)`` keywords, ``upload_weights(...)`` keywords, ``serve``/branch codecs to accept)
PATHS: dict[str, tuple[dict[str, Any], dict[str, Any], list[str]]] = {
    "float32": ({}, {}, []),  # today's default: members stored (``compression="auto"`` on a private network)
    "deflate": ({}, {"compression": "deflate"}, []),  # float32, deflate level 1 (what a public host gets)
    "lossless": ({"compression": "shuffle-zstd"}, {}, ["shuffle-zstd"]),  # forced: "auto" stores on a private net
    "fp16": ({"quantize": "fp16"}, {}, ["fp16"]),
    "bf16": ({"quantize": "bf16"}, {}, ["bf16"]),
    "int8": ({"quantize": "int8"}, {}, ["int8"]),  # blockwise, a scale per block; error feedback on (default)
    # the same, the aggregate downloaded in the codec too (``download_codec=``: encoded once by the server)
    "fp16-both": ({"quantize": "fp16", "download_codec": "fp16"}, {}, ["fp16"]),
    "int8-both": ({"quantize": "int8", "download_codec": "int8"}, {}, ["int8"]),
}


def _readline(process: subprocess.Popen[str], deadline: float, what: str) -> str:
    assert process.stdout is not None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"timed out waiting for {what}")
        ready, _, _ = select.select([process.stdout], [], [], min(left, 1.0))
        if ready:
            line = process.stdout.readline()
            if not line:
                raise RuntimeError(f"{what}: the process exited with {process.wait()}")
            return line.strip()


def our_round(topology: Topology, path: str, params: int, workdir: Path, timeout: float) -> dict[str, Any]:
    """One round of ours over ``topology`` with ``path``'s codec settings."""
    client_options, upload_options, codecs = PATHS[path]
    data_dir = workdir / f"data-{path}"
    credentials = init_branch(data_dir, topology.leaves, creds_dir=workdir / f"credentials-{path}")
    if codecs:
        _accept_codecs(data_dir, codecs)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    log = open(workdir / f"server-{path}.log", "wb")
    server = subprocess.Popen(["ip", "netns", "exec", topology.server_ns, sys.executable, "-m",
                               "branchkey_integrations.cli", "--log-level", "WARNING", "serve", "--data-dir",
                               str(data_dir), "--host", "0.0.0.0", "--port", str(PORT)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    log.close()
    leaves: list[subprocess.Popen[str]] = []
    try:
        def listening() -> bool:
            if server.poll() is not None:
                raise RuntimeError(f"serve exited: {(workdir / f'server-{path}.log').read_text()[-2000:]}")
            return (data_dir / "server.json").exists()

        wait_until(listening, 120, "branchkey-local serve", interval=0.2)
        check = json.dumps({"seeds": list(range(topology.leaves)), "weightings": list(WEIGHTINGS[:topology.leaves])})
        for i, credential in enumerate(credentials):
            command = ["ip", "netns", "exec", topology.leaf_ns(i), sys.executable, "-m", "benchmarks.slow_link_leaf",
                       "--credentials", str(credential), "--host", f"http://{topology.server_ip(i)}:{PORT}",
                       "--params", str(params), "--seed", str(i), "--weighting", str(WEIGHTINGS[i]),
                       "--client-options", json.dumps(client_options), "--upload-options", json.dumps(upload_options)]
            if i == 0:
                command += ["--check", check]
            leaves.append(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                           env=env, cwd=REPO))
        deadline = time.monotonic() + timeout
        for i, leaf in enumerate(leaves):
            line = _readline(leaf, deadline, f"leaf {i} to be ready")
            if line != "ready":
                raise RuntimeError(f"leaf {i} said {line!r} instead of 'ready'")
        before = [topology.leaf_bytes(i) for i in range(topology.leaves)]
        server_cpu = _cpu_seconds(server.pid)
        for leaf in leaves:
            assert leaf.stdin is not None
            leaf.stdin.write("go\n")
            leaf.stdin.flush()
        stamps = [json.loads(_readline(leaf, deadline, f"leaf {i}'s round")) for i, leaf in enumerate(leaves)]
        after = [topology.leaf_bytes(i) for i in range(topology.leaves)]
        server_cpu = _cpu_seconds(server.pid) - server_cpu
    finally:
        for process in [*leaves, server]:
            if process.poll() is None:
                process.terminate()
        for process in [*leaves, server]:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    errors = {key: stamps[0][key] for key in ("max_abs_error", "relative_rms_error") if key in stamps[0]}
    return {"seconds": max(s["end"] for s in stamps) - min(s["start"] for s in stamps),
            "upload_s": [s["uploaded"] - s["start"] for s in stamps],
            # from the upload's answer to the notification, and the download (the aggregate's encoding included)
            "wait_s": [s["notified"] - s["uploaded"] for s in stamps],
            "download_s": [s["end"] - s["notified"] for s in stamps],
            "leaf_cpu_s": [s.get("cpu_s") for s in stamps], "server_cpu_s": server_cpu,
            "codecs": [s.get("codec") for s in stamps], "upload_sizes": [s.get("upload_size") for s in stamps],
            "aggregate_dtype": stamps[0].get("aggregate_dtype"), "layers": stamps[0]["layers"], **errors,
            "leaf_bytes": [{"sent": a[0] - b[0], "received": a[1] - b[1]} for a, b in zip(after, before)]}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its waited-for children so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _accept_codecs(data_dir: Path, codecs: list[str]) -> None:
    """Have the branch advertise ``codecs`` (``branchkey-local branch --codecs``)."""
    subprocess.run([sys.executable, "-m", "branchkey_integrations.cli", "branch", "--data-dir", str(data_dir),
                    "--codecs", ",".join(codecs)], check=True, capture_output=True, timeout=120)


def measure(params: int, rates: list[float], paths: list[str], flower_python: Path | None, delay_ms: float | None,
            timeout: float, on_row: Callable[[dict[str, Any]], None] = lambda results: None) -> dict[str, Any]:
    """Every path at every rate; ``on_row(results so far)`` after each (a long run keeps what it measured)."""
    results: dict[str, Any] = {}
    for rate in rates:
        per_rate: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(prefix="bk-slow-") as tmp, Topology(2, rate, delay_ms) as topology:
            per_rate["delay_ms"] = topology.delay_ms
            for path in paths:
                started = time.monotonic()
                workdir = Path(tmp) / path
                workdir.mkdir()
                try:
                    if path == "flower":
                        if flower_python is None:
                            raise RuntimeError("no --flower-python (python3 -m venv .flwr-venv && "
                                               ".flwr-venv/bin/pip install 'flwr==1.42.*')")
                        from .slow_link_flower import flower_round

                        per_rate[path] = flower_round(topology, flower_python, params, workdir, timeout)
                    else:
                        per_rate[path] = our_round(topology, path, params, workdir, timeout)
                except Exception as exc:  # noqa: BLE001 - one path failing is reported, the others still run
                    per_rate[path] = {"error": f"{type(exc).__name__}: {exc}"[:3000]}
                per_rate[path]["wall_s"] = time.monotonic() - started
                _print_row(rate, path, per_rate[path])
                results[f"{rate:g}"] = per_rate
                on_row(results)
    return results


def _print_row(rate: float, path: str, row: dict[str, Any]) -> None:
    if "error" in row:
        print(f"{rate:g} Mbit/s  {path:9s} ERROR {row['error'][:400]}", flush=True)
        return
    moved = [b["sent"] + b["received"] for b in row["leaf_bytes"]]
    print(f"{rate:g} Mbit/s  {path:9s} round {row['seconds']:8.2f} s   per leaf up+down "
          f"{', '.join(f'{m / 1e6:.1f}' for m in moved)} MB", flush=True)


def summarize(results: dict[str, Any], model_bytes: int) -> dict[str, Any]:
    """Speed-ups over our float32 and over Flower, and bytes per leaf as a share of the float32 model x 2."""
    summary: dict[str, Any] = {}
    for rate, rows in results.items():
        base, flower = rows.get("float32", {}).get("seconds"), rows.get("flower", {}).get("seconds")
        for path, row in rows.items():
            if not isinstance(row, dict) or "seconds" not in row:
                continue
            moved = max(b["sent"] + b["received"] for b in row["leaf_bytes"])
            summary[f"{rate}/{path}"] = {
                "seconds": round(row["seconds"], 3),
                "bytes_per_leaf": moved, "share_of_float32_x2": round(moved / (2 * model_bytes), 4),
                # the link alone: a leaf's bytes up then down at the shaped rate (what CPU and waits add is the rest)
                "link_floor_s": round(moved * 8 / (float(rate) * 1e6), 2),
                "vs_our_float32": round(base / row["seconds"], 2) if base else None,
                "vs_flower": round(flower / row["seconds"], 2) if flower else None}
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.slow_link", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=100_000_000)
    parser.add_argument("--rates", type=float, nargs="+", default=[100.0, 20.0], metavar="MBIT")
    parser.add_argument("--paths", nargs="+", default=["float32", "int8", "fp16", "lossless", "flower"],
                        choices=[*PATHS, "flower"])
    parser.add_argument("--flower-python", type=Path, default=None,
                        help="Python of a venv with flwr 1.42 (python3 -m venv .flwr-venv && "
                             ".flwr-venv/bin/pip install 'flwr==1.42.*')")
    parser.add_argument("--delay-ms", type=float, default=None, help="one-way netem delay per end, where netem exists")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one path may take")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"slow_link: skipped, network namespaces cannot be made here: {reason}", file=sys.stderr)
        sys.exit(2)
    if "flower" in args.paths and args.flower_python is None:
        default = REPO / ".flwr-venv" / "bin" / "python"
        if not default.exists():
            parser.error("flower needs --flower-python: python3 -m venv .flwr-venv && "
                         ".flwr-venv/bin/pip install 'flwr==1.42.*'")
        args.flower_python = default
    if args.flower_python is not None:  # absolute (not resolved: a venv's python is a symlink), as namespaces exec it
        args.flower_python = Path(os.path.abspath(args.flower_python))
    layers = make_layers(args.params)
    model_bytes, params = sum(a.nbytes for a in layers), sum(a.size for a in layers)
    del layers
    before = load_average()
    target = args.json or Path(__file__).parent / "results" / f"slow-link-{datetime.date.today().isoformat()}.json"

    def save(results: dict[str, Any]) -> dict[str, Any]:
        report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpus": os.cpu_count(),
                  "kernel": os.uname().release, "load_before": before, "load_after": load_average(),
                  "params": params, "model_bytes": model_bytes, "leaves": 2, "rates_mbit": args.rates,
                  "results": results, "summary": summarize(results, model_bytes)}
        save_report(report, target)
        return report

    report = save(measure(args.params, args.rates, args.paths, args.flower_python, args.delay_ms, args.timeout, save))
    for key, row in report["summary"].items():
        print(f"{key:18s} {row['seconds']:8.2f} s  {row['share_of_float32_x2'] * 100:5.1f} % of float32 bytes  "
              f"x{row['vs_our_float32']} vs our float32  x{row['vs_flower']} vs Flower")
    print(f"load {before:.2f} -> {report['load_after']:.2f}; saved {target}")
    return report


if __name__ == "__main__":
    main()
