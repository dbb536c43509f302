"""A bomb under the ratio limit costs neither disk nor memory: a branch's expected model size (set by its
operator, or learned from its first aggregate) refuses a larger upload before anything is inflated, a round
of one deflated upload is streamed to its aggregate, the file written ahead follows the round's layout, and
an archive of more members than the server takes is refused from its directory (issue 22, defects 4 and 8).

The server is the real one, in-process, except where its memory is measured (a subprocess). Bombs are built
with zipfile from zeros, so they are small on disk.
"""

from __future__ import annotations

import contextlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import requests

from branchkey_integrations.core import wire
from branchkey_integrations.server.state import DEFAULT_MAX_MEMBERS
from branchkey_integrations.server.store import LEARNED_MODEL_SLACK, Store

from ..conftest import LocalServer, cli, init_branch, wait_until


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def zeros_upload(inflated: int, *, corrupt: bool = False) -> bytes:
    """An upload whose one layer is ``inflated`` bytes of float32 zeros, deflated ~1000:1; ``corrupt``: its
    deflate stream damaged, so that a server that inflated any of it would refuse it as corrupt (400)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("weighting.npy", npy(np.array([1.0])))
        with zf.open("layer_0.npy", "w") as member:
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                          "shape": (inflated // 4,)})
            member.write(header.getvalue())
            for start in range(0, inflated - inflated % 4, 1 << 20):
                member.write(bytes(min(1 << 20, inflated - inflated % 4 - start)))
        offset = zf.getinfo("layer_0.npy").header_offset
    data = bytearray(buffer.getvalue())
    if corrupt:
        data[offset + 200:offset + 264] = b"\xff" * 64
    return bytes(data)


def small_model(value: float = 1.0) -> bytes:
    return wire.encode([np.full((8, 8), value, np.float32), np.arange(5, dtype=np.float32)], 1.0)


def test_a_branch_refuses_an_upload_past_its_max_model_bytes_before_inflating_it(live) -> None:
    branch, (a, _) = live.make_branch(2, max_model_bytes=1_000_000)
    assert branch["max_model_bytes"] == 1_000_000
    bomb = zeros_upload(8 << 20, corrupt=True)
    refused = live.upload(a, bomb)
    assert refused.status_code == 413, refused.text
    error = refused.json()["error"]
    declared = (8 << 20) + 128 + 136  # the layer with its .npy header, and the weighting member
    assert f"would decompress to {declared} bytes" in error and "up to 1000000 bytes (set for this branch)" in error
    assert "Nothing was inflated" in error and "branchkey-local branch max-model-mb" in error
    # a branch without the limit inflates it, and so finds the damage: the 413 came before any inflating
    _, (other, _) = live.make_branch(2)
    inflated = live.upload(other, bomb)
    assert inflated.status_code == 400 and "layer_0" in inflated.json()["error"], inflated.text  # damaged
    assert live.upload(a, small_model()).status_code == 201


def test_a_branch_learns_its_model_size_from_its_first_aggregate_and_the_operator_overrides_it(live) -> None:
    branch, (a, b) = live.make_branch(2)
    assert branch["max_model_bytes"] is None
    for leaf in (a, b):  # nothing learned yet: only the server's limits
        assert live.upload(leaf, zeros_upload(20 << 20)).status_code == 201
    aggregate_id = live.wait_aggregate(branch["id"])
    for status in ("stop", "start"):  # a new run takes any layout (a's upload, the only one, may change it)
        live.admin("POST", f"/admin/v1/branches/{branch['id']}/run", {"run_status": status}, expect=200)
    first_size = live.thread.server.store.get_file(aggregate_id).size
    limit = 2 * first_size + LEARNED_MODEL_SLACK
    refused = live.upload(a, zeros_upload(limit + 4))
    assert refused.status_code == 413, refused.text
    error = refused.json()["error"]
    assert f"up to {limit} bytes (learned from its first aggregate, round 1 of run 1: {first_size} bytes" in error
    assert live.upload(a, zeros_upload(limit - 1000)).status_code == 201

    changed = live.admin("PUT", f"/admin/v1/branches/{branch['id']}/max-model-bytes",
                         {"max_model_bytes": 3 * limit}, expect=200)
    assert changed["max_model_bytes"] == 3 * limit
    assert live.upload(a, zeros_upload(limit + 4)).status_code == 201
    live.admin("PUT", f"/admin/v1/branches/{branch['id']}/max-model-bytes", {"max_model_bytes": None}, expect=200)
    assert live.upload(a, zeros_upload(limit + 4)).status_code == 413
    for bad in ({"max_model_bytes": 0}, {"max_model_bytes": "1e9"}, {}):
        answer = live.admin("PUT", f"/admin/v1/branches/{branch['id']}/max-model-bytes", bad)
        assert "max_model_bytes" in answer["error"], answer


def test_the_file_written_ahead_goes_when_the_rounds_layout_changes(live) -> None:
    """A leaf whose upload is the round's only one may replace it with another layout: the aggregate-to-be
    written ahead for the first (8 MiB here; 1.2 GB for a bomb) is removed, and one of the new size written."""
    files = live.thread.server.store.files_dir
    branch, (a, b) = live.make_branch(2)

    def ahead() -> list[int]:
        return sorted(p.stat().st_size for p in files.iterdir() if p.name.startswith(".tmp-"))

    assert live.upload(a, zeros_upload(8 << 20)).status_code == 201
    live.wait_for(lambda: bool(sizes := ahead()) and sizes[-1] >= 8 << 20)  # one listing: a file may go between two
    assert live.upload(a, small_model(1)).status_code == 201
    live.wait_for(lambda: bool(sizes := ahead()) and sizes[-1] < 8 << 10)
    assert live.upload(b, small_model(3)).status_code == 201
    [layer, _] = live.fetch(a, live.wait_aggregate(branch["id"])).layers
    assert layer.tolist() == np.full((8, 8), 2.0).tolist()
    assert ahead() == []


def test_an_operator_reset_removes_the_file_written_ahead(live) -> None:
    files = live.thread.server.store.files_dir
    branch, (a, _) = live.make_branch(2)
    assert live.upload(a, zeros_upload(8 << 20)).status_code == 201
    live.wait_for(lambda: any(p.name.startswith(".tmp-") for p in files.iterdir()))
    live.admin("POST", f"/admin/v1/branches/{branch['id']}/rounds/open/reset", {}, expect=200)
    live.wait_for(lambda: not any(p.name.startswith(".tmp-") for p in files.iterdir()))


def test_an_archive_of_more_members_than_the_server_takes_is_refused_naming_the_option(live) -> None:
    branch, (a, _) = live.make_branch(2)
    many = wire.encode([np.zeros(1, np.float32)] * DEFAULT_MAX_MEMBERS, 1.0)  # with weighting: one too many
    refused = live.upload(a, many)
    assert refused.status_code == 413, refused.text
    error = refused.json()["error"]
    assert f"Archive has {DEFAULT_MAX_MEMBERS + 1} members; the limit is {DEFAULT_MAX_MEMBERS}" in error
    assert "branchkey-local serve --max-members N" in error
    assert live.rounds(branch["id"])[0]["upload_count"] == 0
    assert live.upload(a, wire.encode([np.zeros(1, np.float32)] * (DEFAULT_MAX_MEMBERS - 1), 1.0)).status_code == 201


def test_the_cli_sets_a_branchs_max_model_size_at_init_and_later(tmp_path: Path) -> None:
    data = tmp_path / "data"
    created = cli("init", "--data-dir", str(data), "--leaves", "1", "--credentials-dir", str(tmp_path / "c"),
                  "--max-model-mb", "5")
    assert "models  uploads up to 5.0 MB inflated" in created.stdout
    learned = cli("branch", "max-model-mb", "learn", "--data-dir", str(data))
    assert "uploads up to twice the branch's first aggregate + 16 MiB (learned)" in learned.stdout
    cli("branch", "max-model-mb", "250", "--data-dir", str(data))
    store = Store(data)
    try:
        [branch] = store.list_branches()
        assert branch.max_model_bytes == 250_000_000
        assert store.model_size_limit(branch.id) == (250_000_000, "set for this branch")
    finally:
        store.close()
    bad = cli("branch", "max-model-mb", "0", "--data-dir", str(data), check=False)
    assert bad.returncode == 2 and "a number of MB > 0, or 'learn'" in bad.stderr


@pytest.mark.slow
def test_a_round_of_one_deflated_300_mb_upload_costs_the_server_little_memory(tmp_path: Path) -> None:
    """min-leaves 1: the upload is its round's aggregate. A deflated one was read whole, twice (a 1.2 GB bomb
    peaked at 2.36 GB); now it streams, in a 1 MiB buffer while checked and 4 MiB ones while copied."""
    data = tmp_path / "data"
    [credentials] = init_branch(data, 1)
    server = LocalServer(data, serve_args=("--max-compression-ratio", "5000")).start()
    try:
        leaf = json.loads(credentials.read_text())
        headers = {"Authorization": f"Bearer {leaf['id']}:{leaf['session_token']}"}
        body = zeros_upload(300 * 10**6)
        status = Path(f"/proc/{server.process.pid}/status")
        with contextlib.suppress(OSError):  # the peak (VmHWM) starts again from now, where the kernel lets us
            Path(f"/proc/{server.process.pid}/clear_refs").write_text("5")
        before = _kib(status, "VmRSS")
        answer = requests.post(server.url + "/api/v1/file/upload", files={"file": ("w.npz", body)},
                               data={"data": json.dumps({"leaf_name": leaf["name"], "metadata": "{}"})},
                               headers=headers, timeout=120)
        assert answer.status_code == 201, answer.text
        rounds = f"/admin/v1/branches/{leaf['branch_id']}/rounds"
        wait_until(lambda: server.admin("GET", rounds).json()["data"]["rounds"][0]["status"] == "aggregated", 120,
                   "the round of one upload to aggregate")
        growth = (_kib(status, "VmHWM") - before) >> 10
        assert growth < 100, f"the server's peak memory grew {growth} MiB for a 300 MB round of one upload"
    finally:
        server.stop()


def _kib(status: Path, field: str) -> int:
    line = next(line for line in status.read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])
