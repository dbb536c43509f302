"""The running parts a benchmark needs, through public surfaces only (the test suite shares some of them).

``branchkey-local`` as users run it (``init`` through the CLI, ``serve`` as the package's own
:class:`~branchkey_integrations.simulation.local_server.EmbeddedServer`, admin calls over HTTP), the official
client in a virtual environment of its own (built once, under a file lock, so test workers and benchmarks
share it), and the system Chromium. Nothing here imports the tests: the test suite imports what it shares
from here (``build_official_python``, ``CHROMIUM``).
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

from branchkey_integrations.simulation.local_server import EmbeddedServer

REPO = Path(__file__).resolve().parent.parent
AMQP_URL = os.environ.get("BRANCHKEY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
OFFICIAL_VERSIONS = ("2.7.1", "3.0.1")
CHROMIUM = os.environ.get("BRANCHKEY_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

T = TypeVar("T")


def wait_until(predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy; TimeoutError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def init_branch(data_dir: Path, leaves: int, *extra: str, creds_dir: Path | None = None) -> list[Path]:
    """``branchkey-local init``: a new tree and branch, one credentials file per leaf (``extra``: more options)."""
    creds_dir = creds_dir or data_dir.parent / f"{data_dir.name}-credentials"
    subprocess.run([sys.executable, "-m", "branchkey_integrations.cli", "init", "--data-dir", str(data_dir),
                    "--leaves", str(leaves), "--credentials-dir", str(creds_dir), *extra],
                   check=True, capture_output=True, timeout=120)
    files = sorted(creds_dir.glob("*.json"))
    if len(files) != leaves:
        raise RuntimeError(f"branchkey-local init wrote {len(files)} credential files, not {leaves}")
    return files


def serve(data_dir: Path, *, amqp_url: str | None = None, serve_args: tuple[str, ...] = ()) -> EmbeddedServer:
    """``branchkey-local serve`` over ``data_dir`` on a free port, logging at INFO (the benchmarks read its log)."""
    return EmbeddedServer(data_dir, amqp_url=amqp_url, log_level="INFO", serve_args=serve_args).start()


def build_official_python(version: str) -> Path:
    """Path to a Python that has ``branchkey==<version>`` from PyPI, in a venv of its own under
    .official-venvs (2.7.1 pins numpy 1.26.4, which cannot live beside ours). Built once under a file
    lock, so test workers and benchmarks share it; a venv without its ``ok`` marker is rebuilt."""
    if version not in OFFICIAL_VERSIONS:
        raise ValueError(f"Expected version in {OFFICIAL_VERSIONS}. Received: version={version!r}")
    root = REPO / ".official-venvs"
    root.mkdir(exist_ok=True)
    venv = root / f"branchkey-{version}"
    python = venv / "bin" / "python"
    with open(root / f"{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / "ok").exists():
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
            subprocess.run([str(python), "-m", "pip", "install", "-q", f"branchkey=={version}"],
                           check=True, timeout=600)
            (venv / "ok").write_text(version)
    return python
