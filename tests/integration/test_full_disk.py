"""A full disk (issue 11): an upload is answered 507 once, not retried; a failed aggregation completes by itself.

The server (a ``branchkey-local serve`` subprocess) keeps its data directory on a small tmpfs mounted for
the test, which needs root (``mount -t tmpfs``); elsewhere the test is skipped, as it cannot fill a disk
honestly without one. The disk is "full" because a filler file takes the free space, as another program
would; freeing it is deleting the filler.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from branchkey_integrations import Client
from branchkey_integrations.core.errors import InsufficientStorageError

from ..conftest import wait_until

pytestmark = pytest.mark.slow

N = 500_000  # float32 values: 2 MB per upload and per aggregate


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def leave_free(filler: Path, mount: Path, target: int) -> None:
    """Grow (by writing, so tmpfs charges the pages) or shrink the filler so ``target`` bytes stay free."""
    delta = free_bytes(mount) - target
    if delta > 0:
        with open(filler, "ab") as handle:
            chunk = b"\1" * (1 << 20)
            while delta > 0:
                try:
                    delta -= handle.write(chunk[:delta])
                    handle.flush()
                except OSError:  # ENOSPC: as full as it gets
                    break
    elif delta < 0:
        os.truncate(filler, max(filler.stat().st_size + delta, 0))
    assert abs(free_bytes(mount) - target) < 64 * 1024, (free_bytes(mount), target)


@pytest.fixture
def tmpfs(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "data"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_answers_507_once_and_a_failed_aggregation_completes_once_space_is_freed(tmpfs, server_factory):
    server, (cred_a, cred_b) = server_factory(2, name="data")
    filler = tmpfs / "filler"
    upload_a = np.arange(N, dtype=np.float32)
    upload_b = np.arange(N, dtype=np.float32) * 2
    log_before = server.log()

    leave_free(filler, tmpfs, 256 * 1024)  # the disk is full for a 2 MB upload
    with Client(str(cred_a), host=server.url, transport="none") as client, \
            pytest.raises(InsufficientStorageError) as full:
        client.upload_weights(1.0, [upload_a])
    assert "out of disk space" in str(full.value)
    refusals = server.log()[len(log_before):].count("refused with 507")
    assert refusals == 1, f"the client sent the upload {refusals} times; a 507 must not be retried"
    assert not [p for p in (tmpfs / "files").iterdir() if p.name.startswith(".")], "a temporary file was left"

    # room for both uploads (2 x 2 MB) but not for the aggregate (2 MB more)
    leave_free(filler, tmpfs, 5 * 1024 * 1024)
    for credentials, (arrays, weighting) in ((cred_a, (upload_a, 1.0)), (cred_b, (upload_b, 3.0))):
        with Client(str(credentials), host=server.url, transport="none") as client:
            client.upload_weights(weighting, [arrays])
    wait_until(lambda: "aggregating branch" in server.log() and "failed (attempt 1;" in server.log(), 20,
               "the aggregation to fail on the full disk")
    [branch] = server.admin("GET", "/admin/v1/branches").json()["data"]["branches"]
    rounds = server.admin("GET", f"/admin/v1/branches/{branch['id']}/rounds").json()["data"]["rounds"]
    assert [(r["status"], r["upload_count"]) for r in rounds] == [("open", 2)]

    filler.unlink()  # space is freed; no restart
    freed = time.monotonic()

    def aggregated():
        items = server.admin("GET", f"/admin/v1/branches/{branch['id']}/rounds").json()["data"]["rounds"]
        return next((r["aggregate_id"] for r in items if r["status"] == "aggregated"), None)

    aggregate_id = wait_until(aggregated, 30, "the round to aggregate by itself once space was freed")
    took = time.monotonic() - freed
    with Client(str(cred_a), host=server.url, transport="none") as client:
        archive = client.download_aggregate(aggregate_id)
    expected = ((upload_a.astype(np.float64) * 1.0 + upload_b.astype(np.float64) * 3.0) / 4.0).astype(np.float32)
    np.testing.assert_array_equal(archive.layers[0], expected)
    assert took < 30
    server.stop()
