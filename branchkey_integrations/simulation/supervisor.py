"""The simulation's child processes: start each in a session of its own, notice when one dies, and stop
every one of them, in order, however the run ends (success, a failure, Ctrl-C or SIGTERM)."""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Iterator

from ..core.errors import LeafFailedError, SimulationTerminated

logger = logging.getLogger(__name__)


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


class Supervisor:
    """Owns the leaf processes. Use as a context manager: leaving it stops every child it started."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def start(self, name: str, args: list[str], log_path: Path) -> Child:
        with open(log_path, "ab") as log:
            # a session of its own: Ctrl-C reaches only the parent, which then stops children in order
            process = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        child = Child(name, process, log_path)
        self.children.append(child)
        logger.debug("Started %s (pid %d)", name, process.pid)
        return child

    def check(self, finished: set[str]) -> None:
        """Raise LeafFailedError for the first child that exited non-zero, or exited before finishing."""
        for child in self.children:
            code = child.process.poll()
            if code is None or (code == 0 and child.name in finished):
                continue
            how = f"exited with status {code}" if code > 0 else f"was killed by signal {-code}"
            if code == 0:
                how = "exited without finishing its job"
            tail = child.log_tail().strip()
            log = f"Last lines of {child.log_path}:\n{tail}" if tail else f"{child.log_path} is empty."
            raise LeafFailedError(f"{child.name} {how}. {log}")

    def join(self, finished: set[str], timeout_s: float = 30.0) -> None:
        """Let children that reported their last result exit by themselves (a leaf closes its client),
        then check how they exited; what still runs after ``timeout_s`` is left to :meth:`stop_all`."""
        deadline = time.monotonic() + timeout_s
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(max(0.0, deadline - time.monotonic()))
        self.check(finished)

    def stop_all(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every live child, then SIGKILL what is left after ``timeout_s``."""
        alive = [c for c in self.children if c.process.poll() is None]
        for child in alive:
            child.process.terminate()
        for child in alive:
            try:
                child.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s ignored SIGTERM; killing it", child.name)
                child.process.kill()
                child.process.wait()
        if alive:
            logger.info("Stopped %d process(es): %s", len(alive), ", ".join(c.name for c in alive))

    def __enter__(self) -> "Supervisor":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()


#: the stop signals received inside :func:`sigterm_raises` (main thread only)
_RECEIVED: list[int] = []


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into :class:`SimulationTerminated` while inside, so ``finally`` blocks stop the children,
    and note SIGINT and SIGTERM for :func:`raise_if_stopped`.

    Why the note: a signal's exception raised while Python runs a finalizer (a connection pool's ``weakref``
    callback) is printed as "Exception ignored" and lost, and the simulation ran on to the end; the
    orchestrator's loop asks :func:`raise_if_stopped` every pass. Only the main thread can set signal
    handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        _RECEIVED.append(signum)
        if signum == signal.SIGTERM:
            raise SimulationTerminated("received SIGTERM")
        raise KeyboardInterrupt

    _RECEIVED.clear()
    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before)
        _RECEIVED.clear()


def raise_if_stopped() -> None:
    """Raise what a stop signal received inside :func:`sigterm_raises` raised, in case it was lost."""
    if signal.SIGTERM in _RECEIVED:
        raise SimulationTerminated("received SIGTERM")
    if _RECEIVED:
        raise KeyboardInterrupt
