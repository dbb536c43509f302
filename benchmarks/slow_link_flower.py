"""Flower's side of ``benchmarks.slow_link``: one FedAvg round on Flower's deployment engine, on the same link.

Flower runs from a virtual environment of its own (``--flower-python``), never imported here:

    python3 -m venv .flwr-venv && .flwr-venv/bin/pip install 'flwr==1.42.*'

``flower-superlink`` (Fleet and Control API over HTTP on one port) runs in the server's namespace, one
``flower-supernode`` in each leaf's namespace, reaching the superlink across its shaped link. A Flower App
written to a temporary directory (``pyproject.toml``, a ``ServerApp`` and a ``ClientApp``) is submitted with
``flwr run APP CONNECTION`` against the superlink's Control API (the connection in a ``FLWR_HOME`` of the
benchmark's own). The ``ServerApp`` builds the same ResNet-like float32 layers as our leaves, waits for both
supernodes, and times ``FedAvg(fraction_evaluate=0).start(num_rounds=1)``: the initial model goes down to
each leaf, each ``ClientApp`` returns an update of the same size, the superlink's ``ServerApp`` averages
them. So each leaf moves the model twice, as ours does (up, then the aggregate down); Flower's leaves do
not hold the aggregate at the end (it would travel in the next round). Runtime dependency installation is
off: the venv already has flwr and numpy.

>>> "FedAvg" in SERVER_APP and "fraction_evaluate=0.0" in SERVER_APP
True
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from .common import resnet_like_shapes
from .netns import Topology

PORT = 8000

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "slowlinkbench"
version = "1.0.0"
description = "One FedAvg round of NumPy arrays, for a benchmark"
license = "Apache-2.0"
dependencies = ["flwr", "numpy"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "bench"

[tool.flwr.app.components]
serverapp = "slowlinkbench.server_app:app"
clientapp = "slowlinkbench.client_app:app"

[tool.flwr.app.config]
num-server-rounds = 1
"""

SERVER_APP = '''\
"""ServerApp: the same float32 layers as the other side's leaves, one FedAvg round, timed."""
import json
import time

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from slowlinkbench.settings import LEAVES, RESULT, SHAPES

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02) for shape in SHAPES]
    waited = time.time()
    while len(list(grid.get_node_ids())) < LEAVES:
        time.sleep(0.1)
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=LEAVES,
                      min_available_nodes=LEAVES)
    started = time.time()
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(arrays), num_rounds=1)
    ended = time.time()
    final = result.arrays.to_numpy_ndarrays()
    with open(RESULT + ".tmp", "w") as out:
        json.dump({"waited_for_nodes_s": started - waited, "start": started, "end": ended,
                   "layers": len(final), "params": int(sum(a.size for a in final)),
                   "dtype": str(final[0].dtype)}, out)
    import os
    os.replace(RESULT + ".tmp", RESULT)
'''

CLIENT_APP = '''\
"""ClientApp: returns an update of the model it was sent (same shapes, float32, its own on each leaf)."""
import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    # a different update on each leaf (as training gives): identical replies would share Flower's content-addressed
    # objects, and the second leaf would upload less than a real one does
    step = np.float32(1e-3 * (1 + int(context.node_config.get("seed", 0))))
    updated = [a + step for a in arrays]
    content = RecordDict({"arrays": ArrayRecord(updated), "metrics": MetricRecord({"num-examples": 10})})
    return Message(content=content, reply_to=msg)
'''


def write_app(directory: Path, params: int, leaves: int, result: Path) -> Path:
    """The Flower App's files under ``directory``; returns the app's directory."""
    app = directory / "app"
    package = app / "slowlinkbench"
    package.mkdir(parents=True)
    (app / "pyproject.toml").write_text(PYPROJECT)
    (package / "__init__.py").write_text("")
    (package / "server_app.py").write_text(SERVER_APP)
    (package / "client_app.py").write_text(CLIENT_APP)
    shapes = [list(shape) for shape in resnet_like_shapes(params)]
    (package / "settings.py").write_text(f"LEAVES = {leaves}\nRESULT = {str(result)!r}\nSHAPES = {shapes!r}\n")
    return app


def flower_round(topology: Topology, flower_python: Path, params: int, workdir: Path, timeout: float) -> dict[str, Any]:
    """One Flower round on ``topology``: seconds, the leaves' bytes and the processes' logs' tails."""
    bin_dir = flower_python.parent
    result = workdir / "flower-result.json"
    app = write_app(workdir, params, topology.leaves, result)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)  # Flower's processes import nothing of ours
    cli_home = workdir / "cli-home"
    cli_home.mkdir()
    (cli_home / "config.toml").write_text(f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
                                          f'address = "127.0.0.1:{PORT}"\ninsecure = true\n')
    processes: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(name: str, ns: str, command: list[str], home: Path) -> subprocess.Popen[bytes]:
        home.mkdir(exist_ok=True)
        log = workdir / f"{name}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(["ip", "netns", "exec", ns, *command], stdout=out, stderr=subprocess.STDOUT,
                                       env={**env, "FLWR_HOME": str(home)}, cwd=workdir)
        processes.append((name, process, log))
        return process

    try:
        start("superlink", topology.server_ns, [str(bin_dir / "flower-superlink"), "--insecure", "--host", "0.0.0.0",
                                                "--port", str(PORT), "--disable-runtime-dependency-installation"],
              workdir / "superlink-home")
        _wait_port(topology.server_ns, "127.0.0.1", PORT, processes, 120)
        for i in range(topology.leaves):
            start(f"supernode{i}", topology.leaf_ns(i),
                  [str(bin_dir / "flower-supernode"), "--insecure", "--superlink", f"{topology.server_ip(i)}:{PORT}",
                   "--port", "9094", "--node-config", f"seed={i}"], workdir / f"supernode{i}-home")
        before = [topology.leaf_bytes(i) for i in range(topology.leaves)]
        submitted = time.time()
        run = subprocess.run(["ip", "netns", "exec", topology.server_ns, str(bin_dir / "flwr"), "run", str(app),
                              "bench", "--format", "json"], capture_output=True, text=True, timeout=300,
                             env={**env, "FLWR_HOME": str(cli_home)}, cwd=workdir)
        if run.returncode:
            raise RuntimeError(f"flwr run failed ({run.returncode}): {run.stdout[-2000:]} {run.stderr[-2000:]}")
        deadline = time.monotonic() + timeout
        while not result.exists():
            _check_running(processes)
            if time.monotonic() > deadline:
                raise TimeoutError(f"Flower's round did not end within {timeout} s; logs in {workdir}")
            time.sleep(0.2)
        done = time.time()
        after = [topology.leaf_bytes(i) for i in range(topology.leaves)]
        report = json.loads(result.read_text())
    finally:
        for _name, process, _log in reversed(processes):
            if process.poll() is None:
                process.terminate()
        for _name, process, _log in reversed(processes):
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    return {"seconds": report["end"] - report["start"], "submit_to_result_s": done - submitted,
            "waited_for_nodes_s": report["waited_for_nodes_s"], "layers": report["layers"],
            "aggregate_params": report["params"], "flwr_run": run.stdout.strip()[-500:],
            "leaf_bytes": [{"sent": a[0] - b[0], "received": a[1] - b[1]} for a, b in zip(after, before)]}


def _check_running(processes: list[tuple[str, subprocess.Popen[bytes], Path]]) -> None:
    """Raise, with the end of its log, if a superlink or supernode has exited: a wait for it would never end."""
    for name, process, log in processes:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}: {log.read_text()[-3000:]}")


def _wait_port(ns: str, host: str, port: int, processes: list[tuple[str, subprocess.Popen[bytes], Path]],
               timeout: float) -> None:
    deadline = time.monotonic() + timeout
    probe = f"import socket; socket.create_connection(({host!r}, {port}), timeout=1).close()"
    while subprocess.run(["ip", "netns", "exec", ns, "python3", "-c", probe], capture_output=True).returncode:
        _check_running(processes)
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listened on {host}:{port} in {ns} within {timeout} s")
        time.sleep(0.5)
