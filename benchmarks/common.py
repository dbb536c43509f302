"""What every benchmark shares: model layouts, timing, a local server with a ready aggregate."""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from branchkey_integrations.core import wire
from branchkey_integrations.simulation.local_server import EmbeddedServer

from .harness import init_branch, serve, wait_until

#: ResNet-18's parameter shapes (11.69M parameters); other sizes scale its widths.
_RESNET18_PARAMS = 11_689_512


def resnet_like_shapes(params: int) -> list[tuple[int, ...]]:
    """Layer shapes of a ResNet-18 whose widths are scaled to hold at least ``params`` parameters
    (the classifier takes what the rounded widths leave short)."""
    scale = math.sqrt(params / _RESNET18_PARAMS)
    width = [max(1, round(w * scale)) for w in (64, 128, 256, 512)]
    shapes: list[tuple[int, ...]] = [(width[0], 3, 7, 7), (width[0],), (width[0],)]
    previous = width[0]
    for stage, channels in enumerate(width):
        for block in range(2):
            entering = previous if block == 0 else channels
            shapes += [(channels, entering, 3, 3), (channels,), (channels,), (channels, channels, 3, 3),
                       (channels,), (channels,)]
            if block == 0 and stage > 0:
                shapes += [(channels, entering, 1, 1), (channels,), (channels,)]
        previous = channels
    body = sum(math.prod(shape) for shape in shapes)
    classes = max(10, round(1000 * min(scale, 1.0)), math.ceil((params - body) / (previous + 1)))
    shapes += [(classes, previous), (classes,)]
    return shapes


def make_layers(params: int, seed: int = 0) -> list[np.ndarray]:
    """Float32 layers with the spread of trained weights (deflate saves ~7.5 % on them, as on real ones)."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)) for shape in resnet_like_shapes(params)]


def count(layers: list[np.ndarray]) -> int:
    return sum(a.size for a in layers)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def current_rss_mb() -> float:
    """This process's resident memory now, in MiB."""
    return proc_status_mb("VmRSS")


def peak_rss_mb() -> float:
    """This process's peak resident memory, in MiB. Not ru_maxrss: that survives fork and exec, so a
    child started by a process holding a large model would report the parent's peak."""
    return proc_status_mb("VmHWM")


def proc_status_mb(field: str, pid: int | str = "self") -> float:
    """A memory ``field`` of /proc/PID/status (VmRSS, VmHWM) in MiB; this process's by default."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def save_report(report: dict, target: Path | None, prefix: str = "") -> Path:
    """Write ``report`` as JSON to ``target``, by default ``results/<prefix><today>.json`` beside this file."""
    import datetime

    target = target or Path(__file__).parent / "results" / f"{prefix}{datetime.date.today().isoformat()}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report, indent=2))
    return target


def load_average() -> float:
    with contextlib.suppress(OSError):
        return float(Path("/proc/loadavg").read_text().split()[0])
    return float("nan")


@dataclass
class Bench:
    """A running branchkey-local and the credential files of one branch."""

    server: EmbeddedServer
    credentials: list[Path]
    workdir: Path


@contextlib.contextmanager
def local_server(leaves: int, *init_args: str, serve_args: tuple[str, ...] = ()) -> Iterator[Bench]:
    """``branchkey-local init`` + ``serve`` in a temporary directory; stopped and removed on exit."""
    with tempfile.TemporaryDirectory(prefix="bk-bench-") as tmp:
        data_dir = Path(tmp) / "data"
        credentials = init_branch(data_dir, leaves, *init_args)
        server = serve(data_dir, serve_args=serve_args)
        try:
            yield Bench(server, credentials, Path(tmp))
        finally:
            server.stop()


def wait_for_aggregate(bench: Bench, timeout: float = 600) -> str:
    """The id of the branch's newest aggregate, waiting for one to exist."""
    branch_id = json.loads(bench.credentials[0].read_text())["branch_id"]

    def newest() -> str | None:
        items = bench.server.admin("GET", f"/admin/v1/branches/{branch_id}/aggregates")["aggregates"]
        return items[-1]["id"] if items else None

    return wait_until(newest, timeout, "the aggregate", interval=0.1)


def stored_size(layers: list[np.ndarray]) -> int:
    return wire.prepare(layers, 1.0, compression="none").size
