"""``branchkey-local serve`` keeps glibc's malloc to one arena, so buffers freed by one thread serve the
next allocation of any other (fewer MB at the peak of many uploads at once; README, issue 12)."""

from __future__ import annotations

import subprocess
import sys

import pytest

ARENAS = """
import ctypes, sys, threading
from branchkey_integrations.server.budget import limit_allocator_retention
if sys.argv[1] == "limited":
    assert limit_allocator_retention()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
together = threading.Barrier(8)
def allocate():
    together.wait()  # all alive at once: a thread that ended would hand its arena to the next
    libc.malloc(64 << 10)
    together.wait()
threads = [threading.Thread(target=allocate) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
libc.malloc_stats()  # one "Arena N:" block per arena, on stderr
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and malloc_stats")
def test_the_server_keeps_mallocs_arenas_to_one_where_threads_would_each_have_their_own() -> None:
    def arenas(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", ARENAS, mode], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stderr.count("Arena ")

    assert arenas("default") > 1
    assert arenas("limited") == 1
