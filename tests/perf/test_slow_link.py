"""The slow-link benchmark's namespaces and shaping: made, measurably limited, removed; and a tiny round over them.

Network namespaces need root and iproute2: where ``ip netns add`` fails (a non-root developer machine, a
container without CAP_NET_ADMIN) these tests skip and say why; everywhere else they run, CI included.
"""

from __future__ import annotations

import subprocess

import pytest

from benchmarks import netns, slow_link

REASON = netns.unavailable_reason()
needs_namespaces = pytest.mark.skipif(REASON is not None, reason=f"network namespaces cannot be made here: {REASON}")


def _namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


@needs_namespaces
def test_a_shaped_link_limits_both_directions_and_everything_is_removed_afterwards():
    with netns.shaped(1, 20) as topology:
        made = {topology.server_ns, topology.leaf_ns(0)}
        assert made <= _namespaces()
        up = netns.timed_transfer(topology, 5_000_000)
        down = netns.timed_transfer(topology, 5_000_000, upload=False)
        sent, received = topology.leaf_bytes(0)
    # 5 MB at 20 Mbit/s is 2.0 s on the wire; loopback veth unshaped moves it in well under 0.1 s
    assert up >= 1.5 and down >= 1.5, (up, down)
    assert up < 10 and down < 10, (up, down)
    assert sent >= 5_000_000 and received >= 5_000_000
    assert not made & _namespaces()


@needs_namespaces
def test_namespaces_are_removed_when_the_body_raises():
    with pytest.raises(RuntimeError, match="boom"):
        with netns.shaped(2, 100) as topology:
            made = {topology.server_ns, topology.leaf_ns(0), topology.leaf_ns(1)}
            assert made <= _namespaces()
            raise RuntimeError("boom")
    assert not made & _namespaces()


@needs_namespaces
@pytest.mark.slow
def test_a_tiny_round_of_ours_crosses_the_shaped_links_and_reports_bytes_and_errors():
    results = slow_link.measure(20_000, [100.0], ["float32"], None, None, timeout=300)
    row = results["100"]["float32"]
    assert "error" not in row, row
    model_bytes = 4 * 20_000
    for moved in row["leaf_bytes"]:
        assert moved["sent"] >= model_bytes and moved["received"] >= model_bytes
    assert row["seconds"] > 0 and row["max_abs_error"] < 1e-6
    summary = slow_link.summarize(results, model_bytes)
    assert summary["100/float32"]["vs_our_float32"] == 1.0
