"""The Ray simulation backend: each task of :mod:`.turns` a Ray task, on a local Ray or a cluster.

``address=None`` starts a local Ray for the run and shuts it down after (its logical CPUs: enough for
``max_concurrent_leaves`` leaves of ``leaf_cpus`` each, at least this machine's cores); ``"auto"`` or
``HOST:PORT`` joins an existing cluster and leaves it running. Each leaf's shard is put into Ray's object
store once and every turn of that leaf reads it from there. At most ``max_concurrent_leaves`` tasks are in
flight; the rest wait in this process, so 100 leaves need only that many Ray workers (Ray reuses a worker
process for the next task: the framework is imported once per worker, not once per turn). Turns are
spread over the nodes (``SPREAD``) and never retried by Ray (a retried turn would upload twice). A task
catches its own error and returns it with its log lines; a worker that dies outright is reported with
Ray's message. Every answer names its node (the first 8 hex digits of Ray's node id).

Ray is an optional extra: ``pip install 'branchkey-integrations[ray]'``.
"""

from __future__ import annotations

import io
import logging
import math
import os
import signal
import threading
import time
import traceback
from typing import Any

import numpy as np

from ..core.errors import LeafFailedError, SimulationTerminated
from .data import Split
from .turns import LeafTask, run_task

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'branchkey-integrations[ray]'"


def check_ray_installed() -> None:
    """ImportError naming the extra when Ray is missing, without importing it (seconds, in the parent)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise ImportError(f"The ray backend needs Ray, which is not installed: {INSTALL_HINT}")


def import_ray() -> Any:
    """``ray``, or ImportError naming the extra that installs it."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"The ray backend needs Ray, which is not installed: {INSTALL_HINT}") from exc
    return ray


def _task_in_worker(raw: dict[str, Any], data: dict[str, np.ndarray] | None, test: dict[str, np.ndarray],
                    state: Any) -> tuple[dict[str, Any], Any]:
    """What a Ray worker runs: the task, with its log lines kept to report a failure; returns the answer and
    the leaf's optimizer state (two objects: the state stays in the store for the leaf's next turn)."""
    import ray

    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {raw['name']} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    try:
        task = LeafTask.from_dict(raw)
        # the store's arrays are read-only views: the frameworks want their own
        shard = None if data is None else Split(np.array(data["x"]), np.array(data["y"]))
        answer, state = run_task(task, shard, Split(np.array(test["x"]), np.array(test["y"])), state)
    except Exception:  # noqa: BLE001  (any error of the leaf is its report, with its log)
        return {"key": f"{raw['name']}.{raw['role']}.r{raw['round']}", "name": raw["name"],
                "error": traceback.format_exc(), "log": buffer.getvalue()[-4000:]}, None
    finally:
        root.removeHandler(handler)
    answer["node"] = ray.get_runtime_context().get_node_id()[:8]
    return answer, state


class RayBackend:
    """Runs tasks as Ray tasks; see the module docstring for the options."""

    def __init__(self, address: str | None = None, leaf_cpus: float = 1.0, leaf_gpus: float = 0.0,
                 max_concurrent_leaves: int = 4) -> None:
        self.ray = import_ray()
        self.address, self.leaf_cpus, self.leaf_gpus = address, leaf_cpus, leaf_gpus
        self.max_concurrent = max_concurrent_leaves
        self.started_ray = False
        self.refs: dict[str, Any] = {}  # worker name -> its shard in the object store
        self.test_ref: Any = None
        self.waiting: list[tuple[LeafTask, str]] = []
        self.running: dict[Any, LeafTask] = {}  # ObjectRef of the answer -> task
        self.states: dict[str, Any] = {}  # worker name -> ObjectRef of its optimizer state after its last turn
        self._remote: Any = None

    def start(self, shards: dict[str, Split | None], test: Split) -> str:
        ray = self.ray
        if ray.is_initialized():
            raise RuntimeError("Ray is already initialized in this process; the ray backend connects itself "
                               "(pass ray_address='auto' to use that cluster).")
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                   "logging_level": logging.WARNING}
        main = threading.current_thread() is threading.main_thread()
        sigterm = signal.getsignal(signal.SIGTERM) if main else None
        try:
            if self.address is None:
                cpus = max(os.cpu_count() or 1, math.ceil(self.max_concurrent * self.leaf_cpus))
                self.started_ray = True
                ray.init(num_cpus=cpus, **options)
            else:
                ray.init(address=self.address, **options)
        except SystemExit as exc:  # ray.init's own SIGTERM handler (sys.exit) while Ray starts
            if exc.code == signal.SIGTERM:
                raise SimulationTerminated("received SIGTERM") from None
            raise
        finally:
            if main:  # ray.init sets its own SIGTERM handler (exit at once): the simulation's stops in order
                signal.signal(signal.SIGTERM, sigterm)
        self._remote = ray.remote(_task_in_worker).options(
            num_cpus=self.leaf_cpus, num_gpus=self.leaf_gpus, max_retries=0, scheduling_strategy="SPREAD", num_returns=2)
        for name, shard in shards.items():  # once per leaf: every turn of the leaf reads it from the store
            self.refs[name] = None if shard is None else ray.put({"x": shard.x, "y": shard.y})
        self.test_ref = ray.put({"x": test.x, "y": test.y})
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        where = "a local Ray started for this run" if self.started_ray else f"the Ray cluster at {self.address}"
        return (f"Ray tasks on {where}: {len(nodes)} node(s), {ray.cluster_resources().get('CPU', 0):g} CPUs; "
                f"at most {self.max_concurrent} leaves at once, {self.leaf_cpus:g} CPU and {self.leaf_gpus:g} GPU each")

    def submit(self, task: LeafTask, worker: str) -> None:
        self.waiting.append((task, worker))
        self._launch()

    def _launch(self) -> None:
        while self.waiting and len(self.running) < self.max_concurrent:
            task, worker = self.waiting.pop(0)
            ref, state = self._remote.remote(task.as_dict(), self.refs.get(worker), self.test_ref,
                                             self.states.get(worker) if task.role == "turn" else None)
            if task.role == "turn":  # the next turn of this leaf waits for it, in Ray, if it must
                self.states[worker] = state
            self.running[ref] = task

    def poll(self) -> list[dict[str, Any]]:
        if not self.running:
            return []
        ray = self.ray
        done, _ = ray.wait(list(self.running), num_returns=len(self.running), timeout=0)
        answers = []
        for ref in done:
            task = self.running.pop(ref)
            try:
                answer = ray.get(ref)
            except ray.exceptions.RayError as exc:
                raise LeafFailedError(f"{task.name} died in Ray ({task.role}, round {task.round}): {exc}") from exc
            if "error" in answer:
                log = answer["log"].strip()
                raise LeafFailedError(f"{task.name} failed ({task.role}, round {task.round}):\n{answer['error']}"
                                      + (f"Its log:\n{log}" if log else ""))
            answers.append(answer)
        self._launch()
        return answers

    def close(self) -> None:
        ray = self.ray
        if not ray.is_initialized() and not self.started_ray:
            return
        started = _local_ray_processes(ray) if self.started_ray else []
        for ref in list(self.running):
            try:
                ray.cancel(ref, force=True)
            except Exception as exc:  # noqa: BLE001  (stopping must go on to the shutdown)
                logger.debug("Could not cancel a Ray task: %s", exc)
        self.running.clear()
        self.waiting.clear()
        # a local Ray stops with it (even one stopped half-way up), and is waited for; a cluster's driver disconnects
        try:
            ray.shutdown(wait_for_processes=True)
        except TypeError:  # a Ray without the argument: it does not wait
            ray.shutdown()
        _end(started)
        logger.info("Ray %s", "stopped" if self.started_ray else "disconnected")
        self.started_ray = False


def _local_ray_processes(ray: Any) -> list[int]:
    """The processes of the Ray this run started (GCS, raylet, ...) and their children (workers, the per-node
    agents, which ``ray.shutdown`` leaves to end by themselves, and which linger); Linux only (``/proc``).
    Ray's node knows its processes; when SIGTERM stopped ``ray.init`` half-way it may not exist yet, and this
    process's children that run Ray's programs are taken instead."""
    node = getattr(getattr(getattr(ray, "_private", None), "worker", None), "_global_node", None)
    roots = [info.process.pid for infos in getattr(node, "all_processes", {}).values() for info in infos
             if getattr(info, "process", None) is not None]
    if not os.path.isdir("/proc"):
        return roots
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # not a process, or gone meanwhile
    if not roots:
        roots = [pid for pid, ppid in parents.items() if ppid == os.getpid() and _runs_ray(pid)]
    found, frontier = list(roots), list(roots)
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in found]
        found += children
        frontier += children
    return found


def _runs_ray(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return b"/ray/" in handle.read()
    except OSError:
        return False


def _end(pids: list[int], timeout_s: float = 5.0) -> None:
    """SIGTERM what is left of ``pids`` (the run's own Ray processes), SIGKILL it after ``timeout_s``."""
    for number in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, number)
                alive.append(pid)
            except (ProcessLookupError, PermissionError):
                continue
        deadline = time.monotonic() + timeout_s
        while alive and time.monotonic() < deadline:
            alive = [pid for pid in alive if _running(pid)]
            time.sleep(0.05)
        if not alive:
            return
        pids = alive


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
