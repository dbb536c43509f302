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

from .conftest import REPO, partner_upload, wait_until

#: how often the leaves of these tests report a wait (``log_every_s``)
LOG_EVERY_S = 2.0


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


def wait_until_counted(credentials, server, leaf: LeafProcess, name: str = "leaf_1") -> None:
    """Until the server counts ``name``'s upload in the open round (asked as another leaf of the branch)."""
    from branchkey_integrations import Client

    with Client(credentials, host=server.url, transport="none") as client:
        def counted() -> bool:
            if leaf.process.poll() is not None:
                raise AssertionError(f"the leaf exited ({leaf.process.returncode}):\n{leaf.tail()}")
            return name in client.get_round().uploaded
        wait_until(counted, 120, f"{name}'s upload to be counted")


def check_the_wait_names_the_missing_then_the_refused_leaf(leaf: LeafProcess, server, other_credentials,
                                                          other_model: list, first_layer: str) -> None:
    """``leaf`` (leaf_1 of a 2-leaf branch) waits for leaf_2: once the server counts leaf_1's upload, its output
    names the round, the count and the missing leaf within ``LOG_EVERY_S + 5`` s, and again with more seconds
    waited; then leaf_2 uploads ``other_model`` (another architecture), the server refuses it, and leaf_1's
    output names leaf_2 and the refused layer (``layer_0``, which this leaf calls ``first_layer``) within 10 s."""
    from branchkey_integrations.core.errors import RequestRejectedError

    wait_until_counted(other_credentials, server, leaf)
    leaf.wait_for(r"Round 1\b[^\n]*waiting for the aggregate[^\n]*1 of 2 uploads; missing: leaf_2",
                  LOG_EVERY_S + 5, "the round, the count and the missing leaf")
    leaf.wait_for(r"Round 1\b[^\n]*for [1-9][0-9]* s[^\n]*missing: leaf_2", LOG_EVERY_S + 5, "a refreshed report")
    try:
        partner_upload(other_credentials, server, other_model, 8.0)
    except RequestRejectedError as exc:
        assert "layer_0" in str(exc), exc
    else:
        raise AssertionError("the server accepted an upload of another model")
    leaf.wait_for(rf"upload of leaf_2 refused[^\n]*layer_0[^\n]*; on this leaf layer_0 is '{re.escape(first_layer)}'"
                  r"; the round completes when leaf_2 uploads[^\n]*'branchkey-local round drop-upload LEAF'[^\n]*"
                  r"--round-deadline", 10, "leaf_2's refused upload, with the layer and what unblocks the round")
