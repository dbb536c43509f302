"""What TLS costs a whole round on loopback: a 2-leaf branch served over plain HTTP and over HTTPS/WSS.

Two ``branchkey-local serve`` subprocesses run side by side over data directories of their own, one plain and
one with ``--tls-cert/--tls-key`` (a self-signed ECDSA P-256 certificate made with the ``openssl`` CLI for
127.0.0.1, which the clients trust as their CA bundle: verification stays on). Each has a branch of two
leaves, each leaf this project's ``Client(transport="websocket")`` in a thread of this process. A round: both
leaves upload the model at once, wait for the aggregation id (WebSocket) and download the aggregate into a
kept buffer; timed from the start of the uploads until both leaves hold the aggregate. The two servers
alternate round by round (a warm-up round each first), ``os.sync()`` before each; medians of ``--repeat``.

``python -m benchmarks.tls_round [--params 11689512] [--repeat 5] [--json out.json]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from branchkey_integrations.core.client import Client, DownloadBuffer

from .common import count, load_average, make_layers, save_report
from .harness import init_branch, wait_until


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (mode 0600), with the openssl CLI."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    os.chmod(key, 0o600)
    return cert, key


def start(data_dir: Path, *serve_args: str) -> tuple[subprocess.Popen, str]:
    """``branchkey-local serve`` on a free port; returns the process and its URL (from ``server.json``)."""
    log = open(data_dir.parent / f"{data_dir.name}.log", "ab")
    process = subprocess.Popen([sys.executable, "-m", "branchkey_integrations.cli", "serve", "--data-dir",
                                str(data_dir), "--port", "0", "--log-level", "WARNING", *serve_args],
                               stdout=log, stderr=subprocess.STDOUT)
    log.close()
    info = data_dir / "server.json"

    def ready() -> str | None:
        if process.poll() is not None:
            raise RuntimeError(f"branchkey-local serve exited with {process.returncode}")
        return json.loads(info.read_text())["url"] if info.exists() else None

    return process, wait_until(ready, 60, "branchkey-local to serve")


def measure(params: int, repeat: int) -> dict[str, Any]:
    layers = make_layers(params)
    with tempfile.TemporaryDirectory(prefix="bk-tls-") as tmp:
        root = Path(tmp)
        cert, key = self_signed(root)
        processes, branches = [], {}
        try:
            for name, extra in (("plain", ()), ("tls", ("--tls-cert", str(cert), "--tls-key", str(key)))):
                credentials = init_branch(root / name, 2, creds_dir=root / f"{name}-credentials")
                process, url = start(root / name, *extra)
                processes.append(process)
                clients = [Client(c, host=url, transport="websocket", ssl=str(cert) if name == "tls" else True)
                           for c in credentials]
                for client in clients:
                    client.notifications.wait_connected(30)
                branches[name] = (clients, [DownloadBuffer() for _ in clients])

            def round_of(name: str) -> float:
                clients, buffers = branches[name]
                errors: list[BaseException] = []

                def leaf(client: Client, buffer: DownloadBuffer, weighting: float) -> None:
                    try:
                        client.upload_weights(weighting, layers)
                        archive = client.download_aggregate(client.wait_for_aggregation(timeout=600), buffer=buffer)
                        assert len(archive.layers) == len(layers)
                    except BaseException as exc:  # noqa: BLE001 - re-raised below, in the main thread
                        errors.append(exc)

                threads = [threading.Thread(target=leaf, args=(c, b, 10.0 + i))
                           for i, (c, b) in enumerate(zip(clients, buffers))]
                started = time.perf_counter()
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                if errors:
                    raise errors[0]
                return time.perf_counter() - started

            round_of("plain"), round_of("tls")  # warm-up: connections, first buffers
            times: dict[str, list[float]] = {"plain": [], "tls": []}
            for _ in range(repeat):
                for name in ("plain", "tls"):
                    os.sync()
                    times[name].append(round_of(name))
            for clients, _ in branches.values():
                for client in clients:
                    client.close()
        finally:
            for process in processes:
                process.terminate()
                process.wait(30)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"params": count(layers), "model_mb": sum(a.nbytes for a in layers) / 1e6, "repeat": repeat,
            "seconds": medians, "all_seconds": times, "tls_cost": medians["tls"] / medians["plain"] - 1}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tls_round", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=11_689_512)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    before = load_average()
    result = measure(args.params, args.repeat)
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpus": os.cpu_count(),
              "load_before": before, "load_after": load_average(), **result}
    target = save_report(report, args.json, "tls-round-")
    s = report["seconds"]
    print(f"whole round, 2-leaf branch, {report['params']:,} params ({report['model_mb']:.1f} MB), medians of "
          f"{report['repeat']}: plain HTTP {s['plain']:.3f} s, TLS {s['tls']:.3f} s: {100 * report['tls_cost']:+.0f}% "
          f"(load {report['load_before']:.2f} -> {report['load_after']:.2f})")
    print(f"saved {target}")
    return report


if __name__ == "__main__":
    main()
