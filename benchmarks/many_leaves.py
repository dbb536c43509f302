"""N light leaves (NumPy only, no training) against one ``branchkey-local serve``: one round of N uploads.

Every leaf is a :class:`branchkey_integrations.core.Client` with WebSocket notifications, run as a thread
(``--processes`` worker processes of N/P threads each: a laptop has no room for 1,000 processes). All leaves
connect first; then, on one signal, each uploads the same ``--mb`` MB float32 model
(``Client.upload_weights``), waits for the aggregate's notification (``wait_for_aggregation``) and downloads it
(``download_aggregate``). Reported:

- **errors**: any exception of any leaf (a refused connection, a 5xx, a timeout), by kind; 0 is the goal;
- **got the aggregate**: leaves whose download decoded to the model's size (the goal: all N);
- **round time**: from the signal to the last leaf's notification (and, from the server's round record, to
  the aggregate's commit: ``server_aggregated_s``); the **receive floor** beside it: the same
  N x MB POSTed with the same threads to a sink that only reads the bytes (aiohttp, its own process), the
  time the server needs just to receive them; the goal: round time <= 3x the floor;
- **refused connections** in the server's log (its connection cap: ``serve --max-connections``, set to 3 per
  leaf here, as a leaf holds a WebSocket and an HTTP keep-alive connection; the default 1,000 is too few);
- **server CPU**: the server's user + system CPU seconds from the signal to the last leaf's download
  (``server_cpu_s``): what a round costs the server, which a loaded machine changes less than wall time;
- **server RSS growth**: the server's peak resident memory (``VmHWM``) during the run minus its RSS
  once every leaf was connected (goal <= 300 MB); its RSS at start, idle, beside it; and, from RSS sampled
  every 50 ms, the growth while the uploads arrive and while the aggregate is downloaded, apart.

``python -m benchmarks.many_leaves [--leaves 1000] [--mb 1] [--processes 4] [--json PATH]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from .common import load_average, local_server, proc_status_mb, save_report


def _model(mb: float) -> list[np.ndarray]:
    values = int(mb * 1_000_000 / 4)
    rng = np.random.default_rng(0)
    return [rng.normal(0, 0.02, values - 1000).astype(np.float32), rng.normal(0, 0.02, 1000).astype(np.float32)]


def _leaf_worker(creds_paths: list[str], host: str, mb: float, timeout: float) -> None:
    """A worker process: one thread per leaf; prints ``ready``, waits for ``go`` on stdin, prints results."""
    from branchkey_integrations.core import Client

    layers = _model(mb)
    expected = sum(a.nbytes for a in layers)
    clients: list[Any] = [None] * len(creds_paths)
    results: list[dict[str, Any]] = [{} for _ in creds_paths]
    go = threading.Event()

    def connect(index: int) -> None:
        try:
            # no retries: a 5xx or a refused connection must show as an error, not be ridden out
            clients[index] = Client(creds_paths[index], host=host, transport="websocket", request_timeout=timeout,
                                    max_retries=0)
        except Exception as exc:  # noqa: BLE001  (every error is counted, by kind)
            results[index]["error"] = f"connect: {type(exc).__name__}: {exc}"[:300]

    def leaf(index: int) -> None:
        client = clients[index]
        if client is None:
            return
        go.wait()
        result = results[index]
        try:
            client.upload_weights(1.0, layers, compression="none")
            result["uploaded"] = time.time()
            aggregation_id = client.wait_for_aggregation(timeout=timeout)
            result["notified"] = time.time()
            archive = client.download_aggregate(aggregation_id)
            result["got"] = sum(a.nbytes for a in archive.layers) == expected
            result["downloaded"] = time.time()
        except Exception as exc:  # noqa: BLE001
            result["error"] = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            client.close()

    threads = [threading.Thread(target=connect, args=(i,)) for i in range(len(creds_paths))]
    for batch in range(0, len(threads), 50):  # connect in waves, as sites come online
        for thread in threads[batch:batch + 50]:
            thread.start()
        for thread in threads[batch:batch + 50]:
            thread.join()
    workers = [threading.Thread(target=leaf, args=(i,)) for i in range(len(creds_paths))]
    for thread in workers:
        thread.start()
    print("ready", flush=True)
    sys.stdin.readline()
    go.set()
    for thread in workers:
        thread.join()
    print(json.dumps(results), flush=True)


def _sink_worker(urls_file: str, mb: float) -> None:
    """A worker process of the floor: POST ``mb`` MB per URL line, all at once (a thread each), after ``go``."""
    import requests

    body = b"".join(a.tobytes() for a in _model(mb))
    urls = Path(urls_file).read_text().split()
    errors: list[str] = []
    go = threading.Event()

    def post(url: str) -> None:
        go.wait()
        try:
            requests.post(url, data=body, timeout=600).raise_for_status()
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{type(exc).__name__}: {exc}"[:200])

    workers = [threading.Thread(target=post, args=(u,)) for u in urls]
    for thread in workers:
        thread.start()
    print("ready", flush=True)
    sys.stdin.readline()
    go.set()
    for thread in workers:
        thread.join()
    print(json.dumps(errors), flush=True)


def _sink_server(port_file: str) -> None:
    """The floor's server: reads each request's body and answers 201."""
    from aiohttp import web

    async def receive(request: web.Request) -> web.Response:
        async for _ in request.content.iter_chunked(1 << 20):
            pass
        return web.Response(status=201)

    async def main() -> None:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_post("/{name}", receive)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        Path(port_file).write_text(str(runner.addresses[0][1]))
        await asyncio.Event().wait()

    import asyncio

    asyncio.run(main())


def _spawn(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "benchmarks.many_leaves", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def _wait_ready(workers: list[subprocess.Popen[str]]) -> None:
    for worker in workers:
        assert worker.stdout is not None
        line = worker.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"a worker did not get ready: {line!r}")


def _go(workers: list[subprocess.Popen[str]]) -> float:
    started = time.time()
    for worker in workers:
        assert worker.stdin is not None
        worker.stdin.write("go\n")
        worker.stdin.flush()
    return started


def _collect(workers: list[subprocess.Popen[str]]) -> list[Any]:
    found: list[Any] = []
    for worker in workers:
        assert worker.stdout is not None
        found += json.loads(worker.stdout.readline())
        worker.wait(60)
    return found


def receive_floor(leaves: int, mb: float, processes: int, workdir: Path) -> dict[str, Any]:
    port_file = workdir / "sink.port"
    sink = _spawn(["--sink-server", str(port_file)])
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text():
            if time.monotonic() > deadline:
                raise RuntimeError("the sink did not start")
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port_file.read_text()}"
        workers = []
        for part in range(processes):
            urls = workdir / f"urls-{part}.txt"
            urls.write_text("\n".join(f"{url}/u{i}" for i in range(part, leaves, processes)))
            workers.append(_spawn(["--sink-worker", str(urls), "--mb", str(mb)]))
        _wait_ready(workers)
        started = _go(workers)
        errors = _collect(workers)
        return {"seconds": round(time.time() - started, 3), "errors": len(errors), "first_errors": errors[:5]}
    finally:
        sink.terminate()
        sink.wait(30)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (/proc/PID/stat)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(leaves: int, mb: float, processes: int, timeout: float) -> dict[str, Any]:
    # each leaf holds two connections (its WebSocket and its HTTP keep-alive), past serve's default cap of 1,000
    serve_args = ("--max-connections", str(max(1000, 3 * leaves)))
    report: dict[str, Any] = {"leaves": leaves, "mb_per_leaf": mb, "processes": processes,
                              "serve_args": list(serve_args), "load_before": load_average()}
    with local_server(leaves, serve_args=serve_args) as bench:
        pid = bench.server.process.pid  # type: ignore[union-attr]
        report["server_rss_idle_mb"] = round(proc_status_mb("VmRSS", pid), 1)
        paths = [str(p) for p in bench.credentials]
        workers = [_spawn(["--leaf-worker", json.dumps(paths[part::processes]), "--host", bench.server.url,
                           "--mb", str(mb), "--timeout", str(timeout)]) for part in range(processes)]
        connecting = time.monotonic()
        _wait_ready(workers)  # every leaf connected, its WebSocket open
        report["connect_s"] = round(time.monotonic() - connecting, 1)
        rss_connected = proc_status_mb("VmRSS", pid)
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM back to the current RSS
        except OSError:
            report["note"] = "could not reset VmHWM: the peak may date from connecting"
        samples: list[tuple[float, float]] = []  # (time, server RSS MB): the peak before and after the aggregate
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                samples.append((time.time(), proc_status_mb("VmRSS", pid)))
                sampling.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        cpu_before = _cpu_seconds(pid)
        started = _go(workers)
        results = _collect(workers)
        report["server_cpu_s"] = round(_cpu_seconds(pid) - cpu_before, 2)  # the round's CPU: load-independent
        sampling.set()
        sampler.join()
        report["server_rss_connected_mb"] = round(rss_connected, 1)
        report["server_peak_rss_mb"] = round(proc_status_mb("VmHWM", pid), 1)
        report["server_rss_growth_mb"] = round(report["server_peak_rss_mb"] - rss_connected, 1)
        errors = Counter(r["error"].split(":")[0] for r in results if "error" in r)
        report["errors"] = sum(errors.values())
        report["errors_by_kind"] = dict(errors)
        report["first_errors"] = [r["error"] for r in results if "error" in r][:5]
        report["got_aggregate"] = sum(1 for r in results if r.get("got"))
        notified = [r["notified"] for r in results if "notified" in r]
        uploaded = [r["uploaded"] for r in results if "uploaded" in r]
        report["last_upload_s"] = round(max(uploaded) - started, 3) if uploaded else None
        report["round_s"] = round(max(notified) - started, 3) if notified else None
        report["all_downloaded_s"] = round(max(r.get("downloaded", 0) for r in results) - started, 3)
        branch_id = json.loads(bench.credentials[0].read_text())["branch_id"]
        first = bench.server.admin("GET", f"/admin/v1/branches/{branch_id}/rounds")["rounds"][0]
        if first.get("closed_at"):  # the server's own view: the round's first upload to its aggregate
            closed = datetime.datetime.fromisoformat(first["closed_at"]).timestamp()
            report["server_aggregated_s"] = round(closed - started, 3)
            report["server_first_upload_s"] = round(float(first["first_upload_at"]) - started, 3)
            before = [rss for when, rss in samples if when <= closed]
            after = [rss for when, rss in samples if when > closed]
            # uploads arriving and folded / the aggregate served to every leaf (sampled every 50 ms)
            report["server_rss_growth_uploads_mb"] = round(max(before, default=rss_connected) - rss_connected, 1)
            report["server_rss_growth_downloads_mb"] = round(max(after, default=rss_connected) - rss_connected, 1)
        report["refused_in_server_log"] = bench.server.log_tail(10_000_000).count("connections refused at the cap")
        report["floor"] = receive_floor(leaves, mb, processes, bench.workdir)
    report["round_over_floor"] = round(report["round_s"] / report["floor"]["seconds"], 2) \
        if report["round_s"] and report["floor"]["seconds"] else None
    report["load_after"] = load_average()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.many_leaves", description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", type=int, default=1000)
    parser.add_argument("--mb", type=float, default=1.0, help="model size per leaf, MB")
    parser.add_argument("--processes", type=int, default=4, help="leaf worker processes (threads inside)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a leaf waits for anything")
    parser.add_argument("--json", type=Path, help="default: benchmarks/results/many-leaves-<date>.json")
    parser.add_argument("--leaf-worker", help=argparse.SUPPRESS)
    parser.add_argument("--sink-worker", help=argparse.SUPPRESS)
    parser.add_argument("--sink-server", help=argparse.SUPPRESS)
    parser.add_argument("--host", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.leaf_worker:
        _leaf_worker(json.loads(args.leaf_worker), args.host, args.mb, args.timeout)
        return 0
    if args.sink_worker:
        _sink_worker(args.sink_worker, args.mb)
        return 0
    if args.sink_server:
        _sink_server(args.sink_server)
        return 0
    report = run(args.leaves, args.mb, args.processes, args.timeout)
    print(json.dumps(report, indent=2))
    print(f"saved {save_report(report, args.json, 'many-leaves-')}")
    return 0 if report["errors"] == 0 and report["got_aggregate"] == args.leaves else 1


if __name__ == "__main__":
    sys.exit(main())
