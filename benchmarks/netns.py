"""Network namespaces joined by shaped veth pairs: a slow link on one machine, made and removed by the benchmark.

A :class:`Topology` is one namespace for the server and one per leaf; leaf ``i`` reaches the server at
``10.<net>.<i+1>.1`` through a veth pair of its own, so each leaf has its own link as behind a home or
hospital uplink. Both ends of every pair get a ``tc`` token bucket (``tbf``) at the link's rate, so each
direction is shaped at its sender's egress (a leaf's upload at the leaf, the aggregate at the server);
``netem`` adds a one-way delay where the kernel has it (``delay_ms``; ``None`` in :attr:`Topology.delay_ms`
says it could not). Needs root and ``ip``/``tc`` (iproute2).

Everything made is removed on exit: the context manager's ``finally``, an ``atexit`` hook and SIGTERM/SIGHUP
(which become ``SystemExit``, so ``finally`` runs) cover Ctrl-C, errors and a killed parent alike. Processes
still inside a namespace are killed before it is deleted (only namespaces this module made, whose names
carry this process's id).

>>> shaping_commands("veth0", 100, None)[0][:6]
['tc', 'qdisc', 'replace', 'dev', 'veth0', 'root']
>>> burst_bytes(100), burst_bytes(20)
(125000, 32768)
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

_MADE: set[str] = set()  # namespaces alive now, removed by the atexit hook if nothing else did


class NamespacesUnavailable(RuntimeError):
    """Namespaces or shaping cannot be made here (not root, no iproute2, a kernel without veth/tbf)."""


def _run(command: Sequence[str], netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    full = ["ip", "netns", "exec", netns, *command] if netns else list(command)
    done = subprocess.run(full, capture_output=True, text=True, timeout=60)
    if check and done.returncode:
        raise NamespacesUnavailable(f"{' '.join(full)!r} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def burst_bytes(rate_mbit: float) -> int:
    """The bucket: 10 ms at the rate and at least 32 KiB (tbf needs more than one timer tick's worth)."""
    return max(32768, int(rate_mbit * 1e6 / 8 * 0.01))


def shaping_commands(device: str, rate_mbit: float, delay_ms: float | None) -> list[list[str]]:
    """``tc`` commands shaping ``device``'s egress: tbf at the rate, under a netem delay if one is asked for."""
    tbf = ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst_bytes(rate_mbit)), "latency", "50ms"]
    if not delay_ms:
        return [["tc", "qdisc", "replace", "dev", device, "root", *tbf]]
    return [["tc", "qdisc", "replace", "dev", device, "root", "handle", "1:", "netem", "delay", f"{delay_ms}ms"],
            ["tc", "qdisc", "add", "dev", device, "parent", "1:1", "handle", "10:", *tbf]]


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they can (tried: one made and removed)."""
    if os.name != "posix" or os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the {tool!r} command (iproute2) is not installed"
    probe = f"bkprobe{os.getpid()}"
    try:
        _run(["ip", "netns", "add", probe])
    except NamespacesUnavailable as exc:
        return str(exc)
    finally:
        _run(["ip", "netns", "del", probe], check=False)
    return None


@dataclass
class Topology:
    """A server namespace and one leaf namespace per leaf, each leaf on a shaped veth pair of its own."""

    leaves: int
    rate_mbit: float
    delay_ms: float | None = None
    net: int = 77
    prefix: str = field(default_factory=lambda: f"bk{os.getpid() % 100000}")
    made: list[str] = field(default_factory=list, init=False)

    @property
    def server_ns(self) -> str:
        return f"{self.prefix}-srv"

    def leaf_ns(self, leaf: int) -> str:
        return f"{self.prefix}-leaf{leaf}"

    def server_ip(self, leaf: int) -> str:
        """The server's address on leaf ``leaf``'s link (each leaf sees the server on its own subnet)."""
        return f"10.{self.net}.{leaf + 1}.1"

    def leaf_ip(self, leaf: int) -> str:
        return f"10.{self.net}.{leaf + 1}.2"

    def leaf_device(self, leaf: int) -> str:
        return f"{self.prefix}l{leaf}"  # at most 15 characters: bk + 5 digits + l + index

    def server_device(self, leaf: int) -> str:
        return f"{self.prefix}s{leaf}"

    def create(self) -> "Topology":
        _install_cleanup()
        try:
            for name in [self.server_ns] + [self.leaf_ns(i) for i in range(self.leaves)]:
                _run(["ip", "netns", "add", name])
                self.made.append(name)
                _MADE.add(name)
                _run(["ip", "link", "set", "lo", "up"], name)
            delays: list[bool] = []
            for i in range(self.leaves):
                leaf_dev, server_dev = self.leaf_device(i), self.server_device(i)
                _run(["ip", "link", "add", leaf_dev, "netns", self.leaf_ns(i), "type", "veth", "peer", "name",
                      server_dev, "netns", self.server_ns])
                for ns, dev, ip in ((self.leaf_ns(i), leaf_dev, self.leaf_ip(i)),
                                    (self.server_ns, server_dev, self.server_ip(i))):
                    _run(["ip", "addr", "add", f"{ip}/24", "dev", dev], ns)
                    _run(["ip", "link", "set", dev, "up"], ns)
                    delays.append(self._shape(ns, dev))
            if self.delay_ms and not all(delays):
                self.delay_ms = None  # no netem in this kernel: the link is shaped, without added delay
        except BaseException:
            self.remove()
            raise
        return self

    def _shape(self, ns: str, device: str) -> bool:
        """Shape ``device``; True when the asked-for delay is in place too."""
        if self.delay_ms:
            try:
                for command in shaping_commands(device, self.rate_mbit, self.delay_ms):
                    _run(command, ns)
                return True
            except NamespacesUnavailable:
                _run(["tc", "qdisc", "del", "dev", device, "root"], ns, check=False)
        for command in shaping_commands(device, self.rate_mbit, None):
            _run(command, ns)
        return False

    def remove(self) -> None:
        """Kill what still runs inside and delete the namespaces (their veth ends go with them)."""
        for name in reversed(self.made):
            _remove_namespace(name)
        self.made.clear()

    def leaf_bytes(self, leaf: int) -> tuple[int, int]:
        """(sent, received) bytes on leaf ``leaf``'s veth end so far, Ethernet headers included."""
        ns, dev = self.leaf_ns(leaf), self.leaf_device(leaf)
        out = _run(["cat", f"/sys/class/net/{dev}/statistics/tx_bytes", f"/sys/class/net/{dev}/statistics/rx_bytes"],
                   ns).stdout.split()
        return int(out[0]), int(out[1])

    def __enter__(self) -> "Topology":
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _remove_namespace(name: str) -> None:
    pids = _run(["ip", "netns", "pids", name], check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _run(["ip", "netns", "del", name], check=False)
    _MADE.discard(name)


def _remove_all() -> None:
    for name in sorted(_MADE):
        _remove_namespace(name)


_INSTALLED = False


def _install_cleanup() -> None:
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    atexit.register(_remove_all)

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through every ``finally``, then atexit runs

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, _exit)


@contextlib.contextmanager
def shaped(leaves: int, rate_mbit: float, delay_ms: float | None = None) -> Iterator[Topology]:
    """A :class:`Topology`, created on entry and removed on exit (errors and Ctrl-C included)."""
    topology = Topology(leaves, rate_mbit, delay_ms)
    with topology:
        yield topology


_RECEIVER = textwrap.dedent("""
    import socket, sys, time
    server = socket.socket(); server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((sys.argv[1], 0)); server.listen(1)
    print(server.getsockname()[1], flush=True)
    conn, _ = server.accept()
    total, started = 0, None
    while True:
        chunk = conn.recv(1 << 20)
        if started is None:
            started = time.perf_counter()
        if not chunk:
            break
        total += len(chunk)
    print(total, time.perf_counter() - started, flush=True)
""")

_SENDER = textwrap.dedent("""
    import socket, sys
    conn = socket.create_connection((sys.argv[1], int(sys.argv[2])))
    conn.sendall(bytes(int(sys.argv[3]))); conn.shutdown(socket.SHUT_WR); conn.recv(1); conn.close()
""")


def timed_transfer(topology: Topology, nbytes: int, leaf: int = 0, upload: bool = True) -> float:
    """Seconds to send ``nbytes`` over leaf ``leaf``'s link (leaf to server when ``upload``), from the
    receiver's first byte to its last: the shaped rate, not the connection set-up."""
    rx_ns, tx_ns = (topology.server_ns, topology.leaf_ns(leaf)) if upload else (topology.leaf_ns(leaf), topology.server_ns)
    rx_ip = topology.server_ip(leaf) if upload else topology.leaf_ip(leaf)
    receiver = subprocess.Popen(["ip", "netns", "exec", rx_ns, sys.executable, "-c", _RECEIVER, rx_ip],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout is not None
        port = receiver.stdout.readline().strip()
        _run([sys.executable, "-c", _SENDER, rx_ip, port, str(nbytes)], tx_ns)
        total, seconds = receiver.stdout.readline().split()
        receiver.wait(60)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    if int(total) != nbytes:
        raise RuntimeError(f"received {total} bytes of {nbytes}")
    return float(seconds)


if __name__ == "__main__":  # a quick look: python -m benchmarks.netns [RATE_MBIT] [MB]
    reason = unavailable_reason()
    if reason:
        sys.exit(f"cannot make network namespaces here: {reason}")
    rate, mb = (float(sys.argv[1]) if len(sys.argv) > 1 else 20.0), (float(sys.argv[2]) if len(sys.argv) > 2 else 5.0)
    with shaped(1, rate) as topo:
        started = time.perf_counter()
        up = timed_transfer(topo, int(mb * 1e6))
        down = timed_transfer(topo, int(mb * 1e6), upload=False)
        print(f"{mb} MB at {rate} Mbit/s: up {up:.2f} s ({mb * 8 / up:.1f} Mbit/s), down {down:.2f} s "
              f"({mb * 8 / down:.1f} Mbit/s); bytes on the leaf's end {topo.leaf_bytes(0)}")
