"""A training leaf in a process of its own, watched through its output: what the waiting-leaf tests share.

The leaf's stdout and stderr go, merged, to a file (no logging is configured by the test: the leaf shows what
a user's plain ``python train.py`` shows). :meth:`LeafProcess.wait_for` waits on that output, and
:meth:`LeafProcess.end_with` sends a signal and measures how long the process takes to exit.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from .conftest import REPO, wait_until


class LeafProcess:
    """``python -m <module> <args>`` in the repository root, output to ``log_path``; killed by :meth:`close`."""

    def __init__(self, module: str, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(log_path, "w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=environment,
                                            stdout=log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float, what: str) -> re.Match:
        """The first match of the regular expression ``pattern`` in the output; fails (with the output) after
        ``timeout`` s, or at once when the process ended without it."""
        def found() -> re.Match | None:
            match = re.search(pattern, self.output())
            if match is None and self.process.poll() is not None:
                raise AssertionError(f"the leaf exited ({self.process.returncode}) without {what}:\n{self.tail()}")
            return match

        try:
            return wait_until(found, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.tail()}") from None

    def end_with(self, signum: int, timeout: float = 30) -> tuple[int, float]:
        """Send ``signum``; return the exit status and the seconds until the process was gone."""
        sent = time.monotonic()
        self.process.send_signal(signum)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {timeout} s after {signal.Signals(signum).name}:\n{self.tail()}")
        return code, time.monotonic() - sent

    def tail(self, characters: int = 4000) -> str:
        return self.output()[-characters:]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
