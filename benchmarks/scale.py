"""K leaves upload at once to a ``branchkey-local serve`` subprocess: the aggregation tail, server memory, disk.

For each (K, parameters) the server starts fresh with its defaults (retention included), every leaf
of a K-leaf branch uploads the same stored float32 model at once (threads, one shared streaming
body, each with its own credentials), for ``rounds`` rounds. Per round:

- **tail**: from the last upload's 201 to the ``aggregation_status`` notification on a leaf's
  WebSocket (what a waiting leaf sees; negative when the notification came first, as the server
  answers an upload once it is folded and may write the aggregate before this process reads the 201);
- **peak RSS growth**: the server's peak resident memory during the round (``VmHWM``, reset
  through ``/proc/<pid>/clear_refs`` before it where the kernel lets us) minus its RSS before it;
- **disk**: the data directory's ``files/`` after the round's retention, and its growth;
- **server tail**: from the round's last upload commit to its aggregate's commit, read off the
  server's log (millisecond stamps): the server's own work after the last upload's bytes, which
  answering an upload once it is folded does not move.

``python -m benchmarks.scale [--cases 10x1000000 50x1000000 100x1000000 8x50000000] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import requests
from websockets.sync.client import connect

from branchkey_integrations.core import wire
from branchkey_integrations.core.client import MultipartBody

from .common import count, load_average, local_server, make_layers, proc_status_mb, save_report

DEFAULT_CASES = ("10x1000000", "50x1000000", "100x1000000")


def _reset_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


_STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO \S+: "


def _server_tail(log: str, round_index: int) -> float | None:
    """Seconds from the round's last ``uploaded ... round N`` line to its ``round N aggregated`` line (run 1)."""
    def when(match: re.Match[str]) -> float:
        return datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()

    commits = [when(m) for m in re.finditer(_STAMP + rf"leaf .* uploaded \S+ to branch \S+ run 1 round {round_index}$",
                                            log, re.MULTILINE)]
    done = re.search(_STAMP + rf"branch \S+ run 1 round {round_index} aggregated as ", log, re.MULTILINE)
    return when(done) - max(commits) if commits and done else None


def _files_bytes(data_dir: Path) -> int:
    return sum(entry.stat().st_size for entry in (data_dir / "files").iterdir() if entry.is_file())


class Notifications:
    """Arrival times of ``aggregation_status`` messages on one leaf's WebSocket."""

    def __init__(self, url: str, leaf: dict[str, str]) -> None:
        headers = {"Authorization": f"Bearer {leaf['id']}:{leaf['session_token']}"}
        ticket = requests.post(url + "/api/v1/ws/ticket", headers=headers, timeout=30).json()["data"]
        self.socket = connect(url.replace("http://", "ws://") +
                              f"/api/v1/ws?ticket={ticket['ticket_id']}&request_id={ticket['request_id']}")
        self.arrivals: list[float] = []
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        try:
            for raw in self.socket:
                if json.loads(raw).get("message_type") == "aggregation_status":
                    self.arrivals.append(time.perf_counter())
        except Exception:  # closed at the end
            pass

    def wait(self, count_: int, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while len(self.arrivals) < count_:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no aggregate notification within {timeout} s")
            time.sleep(0.001)
        return self.arrivals[count_ - 1]

    def close(self) -> None:
        self.socket.close()


def measure(leaves: int, params: int, rounds: int = 3) -> dict[str, Any]:
    layers = make_layers(params)
    archive = wire.prepare(layers, 10.0, compression="none")
    body = MultipartBody("{}", "w.npz", archive.chunks, archive.size)
    model_mb = sum(a.nbytes for a in layers) / 1e6
    with local_server(leaves) as bench:
        url, pid, data_dir = bench.server.url, bench.server.process.pid, bench.server.data_dir
        credentials = [json.loads(path.read_text()) for path in bench.credentials]
        notifications = Notifications(url, credentials[0])
        idle_rss = proc_status_mb("VmRSS", pid)
        results = []
        disk_before = _files_bytes(data_dir)
        for number in range(rounds):
            rss_before = proc_status_mb("VmRSS", pid)
            reset = _reset_peak(pid)
            barrier = threading.Barrier(leaves)
            answered: list[float] = []
            failures: list[str] = []

            def send(leaf: dict[str, str]) -> None:
                headers = {"Authorization": f"Bearer {leaf['id']}:{leaf['session_token']}",
                           "Content-Type": body.content_type}
                barrier.wait()
                answer = requests.post(url + "/api/v1/file/upload", data=body, headers=headers, timeout=600)
                if answer.status_code != 201:
                    failures.append(answer.text[:200])
                answered.append(time.perf_counter())

            threads = [threading.Thread(target=send, args=(leaf,)) for leaf in credentials]
            start = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if failures:
                raise RuntimeError(f"{len(failures)} upload(s) refused: {failures[0]}")
            arrived = notifications.wait(number + 1, 600)
            peak = proc_status_mb("VmHWM", pid)
            deadline = time.monotonic() + 60  # retention runs right after the notification
            while any(p.name.startswith(".tmp-") for p in (data_dir / "files").iterdir()) or \
                    len(list((data_dir / "files").iterdir())) > number + 1:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            disk = _files_bytes(data_dir)
            results.append({"round": number, "tail_s": arrived - max(answered), "uploads_s": max(answered) - start,
                            "rss_before_mb": rss_before, "peak_rss_mb": peak, "peak_reset": reset,
                            "peak_rss_growth_mb": peak - rss_before, "disk_mb": disk / 1e6,
                            "disk_growth_mb": (disk - disk_before) / 1e6,
                            "server_tail_s": _server_tail(bench.server.log_path.read_text(errors="replace"), number)})
            disk_before = disk
        notifications.close()
    growth = max(r["peak_rss_growth_mb"] for r in results)
    return {"leaves": leaves, "params": count(layers), "model_mb": model_mb, "idle_rss_mb": idle_rss,
            "rounds": results, "tail_s_median": statistics.median(r["tail_s"] for r in results),
            "tail_s_per_100mb": statistics.median(r["tail_s"] for r in results) / model_mb * 100,
            "peak_rss_growth_mb_max": growth, "rss_goal_mb": 2 * model_mb + 64,
            "disk_growth_per_round_over_model": max(r["disk_growth_mb"] for r in results) / model_mb}


def table(report: dict[str, Any]) -> str:
    lines = [f"load average {report['load_before']:.2f} -> {report['load_after']:.2f}, {report['cpus']} CPUs"]
    for case in report["cases"]:
        tails = ", ".join(f"{r['tail_s']:.3f}" for r in case["rounds"])
        server = ", ".join("?" if r.get("server_tail_s") is None else f"{r['server_tail_s']:.3f}"
                           for r in case["rounds"])
        lines.append(
            f"K={case['leaves']:>3} x {case['params']:,} params ({case['model_mb']:.1f} MB): tail {tails} s "
            f"(median {case['tail_s_median']:.3f} s = {case['tail_s_per_100mb']:.3f} s per 100 MB); peak RSS growth "
            f"{case['peak_rss_growth_mb_max']:.1f} MB (goal {case['rss_goal_mb']:.0f}); disk growth per round "
            f"{case['disk_growth_per_round_over_model']:.2f}x model; uploads took "
            f"{max(r['uploads_s'] for r in case['rounds']):.2f} s; server, last commit -> aggregate {server} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="KxPARAMS, e.g. 8x50000000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpus": os.cpu_count(),
                              "load_before": load_average(), "cases": []}
    for case in args.cases:
        leaves, params = (int(part) for part in case.split("x"))
        report["cases"].append(measure(leaves, params, args.rounds))
        print(table({**report, "load_after": load_average()}).splitlines()[-1], flush=True)
    report["load_after"] = load_average()
    target = save_report(report, args.json, "scale-")
    print(table(report))
    print(f"saved {target}")
    return report


if __name__ == "__main__":
    main()
