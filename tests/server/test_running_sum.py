"""The running FedAvg: folded upload by upload, exact against NumPy, rebuilt on a replacement, and
recovered from the stored uploads after a kill -9 in the middle of an aggregation (subprocess server)."""

from __future__ import annotations

import hashlib
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import requests

from branchkey_integrations.core import wire
from branchkey_integrations.core.errors import AggregationError
from branchkey_integrations.server.aggregation import FOLD_PIECE_BYTES, RunningSum
from branchkey_integrations.server.store import Store


def numpy_mean(uploads: list[tuple[list[np.ndarray], float]]) -> list[np.ndarray]:
    weights = np.array([w for _, w in uploads])
    result = []
    for index, first in enumerate(uploads[0][0]):
        wide = np.complex128 if first.dtype.kind == "c" else np.float64
        mean = np.average(np.stack([u[index].astype(wide) for u, _ in uploads]), axis=0, weights=weights)
        result.append(np.rint(mean).astype(first.dtype) if first.dtype.kind in "iu" else mean.astype(first.dtype))
    return result


def stored(tmp_path: Path, uploads: list[tuple[list[np.ndarray], float]], **options: str) -> list[tuple]:
    """``(leaf, file_id, path, weighting)`` of upload archives written to ``tmp_path``."""
    refs = []
    for number, (layers, weighting) in enumerate(uploads):
        path = tmp_path / f"upload-{number}-{len(list(tmp_path.iterdir()))}.npz"
        wire.encode(layers, weighting, path, **options)
        refs.append((f"leaf-{number}", path.stem, path, weighting))
    return refs


def written(running: RunningSum, path: Path) -> list[np.ndarray]:
    size, digest = running.write(path)
    assert size == path.stat().st_size
    return wire.decode(path).layers


def model(rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.normal(size=(64, 33)).astype(np.float32), rng.normal(size=7).astype(np.float16),
            rng.integers(-50, 50, size=9).astype(np.int64), (rng.normal(size=4) + 1j).astype(np.complex64)]


@pytest.mark.parametrize("compression", ["none", "deflate"])
def test_the_running_mean_equals_numpy_bit_for_bit(tmp_path: Path, compression: str) -> None:
    rng = np.random.default_rng(0)
    uploads = [(model(rng), w) for w in (3.0, 250.0, 1.5, 7.0)]
    running = RunningSum()
    refs = stored(tmp_path, uploads, compression=compression)
    for count in range(1, 5):  # folded one by one, as uploads arrive
        running.sync(refs[:count])
    for got, want in zip(written(running, tmp_path / "mean.npz"), numpy_mean(uploads)):
        assert got.dtype == want.dtype and got.flags.c_contiguous
        np.testing.assert_array_equal(got, want)


def test_extending_with_the_later_uploads_only_equals_numpy_bit_for_bit(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    uploads = [(model(rng), w) for w in (3.0, 250.0, 1.5, 7.0)]
    refs = stored(tmp_path, uploads)
    running = RunningSum()
    running.sync(refs[:1])
    for count in range(2, 5):  # a fold pass hands over only what came after the held uploads
        running.extend(refs[count - 1:count])
    assert list(running.members) == [leaf for leaf, *_ in refs]
    for got, want in zip(written(running, tmp_path / "mean.npz"), numpy_mean(uploads)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("compression", ["none", "deflate"])  # stored: copied in the kernel; deflated: decoded
def test_one_upload_is_its_own_mean_exactly(tmp_path: Path, compression: str) -> None:
    layers = [np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32), np.arange(3),
              np.asfortranarray(np.arange(12.0).reshape(3, 4))]
    running = RunningSum()
    running.sync(stored(tmp_path, [(layers, wire.MAX_WEIGHTING)], compression=compression))
    size, digest = running.write(tmp_path / "mean.npz")
    content = (tmp_path / "mean.npz").read_bytes()
    assert (size, digest) == (len(content), hashlib.sha256(content).hexdigest())
    archive = wire.decode(content)
    assert archive.weighting is None and len(archive.layers) == 3
    for got, want in zip(archive.layers, layers):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_one_deflated_upload_becomes_its_mean_a_piece_at_a_time(tmp_path: Path) -> None:
    """A round of one deflated upload (a bomb's 64 MiB of zeros, ~64 KiB sent) is copied to its aggregate
    in 4 MiB pieces: it was read whole, twice (1.2 GB inflated peaked at 2.36 GB of server memory)."""
    layer = np.zeros(16 << 20, np.float32)
    running = RunningSum()
    running.sync(stored(tmp_path, [([layer, np.ones(3)], 1.0)], compression="deflate"))
    tracemalloc.start()
    try:
        running.write(tmp_path / "mean.npz")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * FOLD_PIECE_BYTES, f"the mean of one {layer.nbytes >> 20} MiB upload peaked at {peak >> 20} MiB"
    got = wire.decode(tmp_path / "mean.npz").layers
    assert got[0].shape == layer.shape and not got[0].any() and got[1].tolist() == [1.0, 1.0, 1.0]


def test_a_replaced_upload_is_taken_out_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    first, second, replacement = (model(rng), 2.0), (model(rng), 5.0), (model(rng), 1.0)
    running = RunningSum()
    [a, b] = stored(tmp_path, [first, second])
    running.sync([a, b])
    [a2] = stored(tmp_path, [replacement])
    running.sync([b, ("leaf-0", *a2[1:])])  # leaf-0 re-uploaded: its earlier upload is gone
    assert running.members == {"leaf-1": b[1], "leaf-0": a2[1]}
    for got, want in zip(written(running, tmp_path / "mean.npz"), numpy_mean([second, replacement])):
        np.testing.assert_array_equal(got, want)
    running.sync([b])  # leaf-0's upload dropped by the operator
    for got, want in zip(written(running, tmp_path / "mean2.npz"), numpy_mean([second])):
        np.testing.assert_array_equal(got, want)


def test_writing_again_writes_the_same_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    running = RunningSum()
    running.sync(stored(tmp_path, [(model(rng), 1.0), (model(rng), 2.0)]))
    first, again = tmp_path / "one.npz", tmp_path / "two.npz"
    assert running.write(first) == running.write(again)
    assert first.read_bytes() == again.read_bytes()


def test_fortran_ordered_layers_fold_like_c_ordered_ones(tmp_path: Path) -> None:
    base = np.random.default_rng(4).normal(size=(6, 4)).astype(np.float32)
    uploads = [([np.asfortranarray(base)], 1.0), ([base * 2], 3.0)]
    running = RunningSum()
    running.sync(stored(tmp_path, uploads))
    [got] = written(running, tmp_path / "mean.npz")
    np.testing.assert_array_equal(got, numpy_mean(uploads)[0])


def test_a_layout_mismatch_empties_the_sum_and_names_the_layer(tmp_path: Path) -> None:
    running = RunningSum()
    refs = stored(tmp_path, [([np.zeros(3, np.float32)], 1.0), ([np.zeros(4, np.float32)], 1.0)])
    with pytest.raises(AggregationError, match=r"layer_0: expected float32\[3\], holds float32\[4\]"):
        running.sync(refs)
    assert running.members == {}
    with pytest.raises(AggregationError, match="no uploads"):
        running.write(tmp_path / "mean.npz")


def test_uploads_given_in_another_order_are_folded_again_in_that_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    refs = stored(tmp_path, [(model(rng), w) for w in (1.0, 3e-7, 5e5)])
    running = RunningSum()
    running.sync(refs[:2])
    running.sync([refs[1], refs[0], refs[2]])  # held uploads no longer first: the sum starts again
    assert list(running.members) == [refs[1][0], refs[0][0], refs[2][0]]
    fresh = RunningSum()
    fresh.sync([refs[1], refs[0], refs[2]])
    assert running.write(tmp_path / "a.npz") == fresh.write(tmp_path / "b.npz")  # same bytes: same order


# -- an aggregate committed before its fsync ----------------------------------------------------


def three_uploads(live, leaves: list[dict[str, str]], index: int) -> None:
    rng = np.random.default_rng(index)
    for number, leaf in enumerate(leaves):
        answer = live.upload(leaf, wire.encode(model(rng), 1.0 + number * 2.5, compression="none"))
        assert answer.status_code == 201, answer.text


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_an_aggregate_lost_in_an_os_crash_is_made_again_from_its_uploads(start_server, tmp_path: Path,
                                                                          damage: str) -> None:
    from ..inprocess import ServerThread

    live = start_server(tmp_path / "first", keep_uploads=True)  # the uploads stay, as before a pending fsync
    branch, leaves = live.make_branch(3)
    three_uploads(live, leaves, 0)
    aggregate_id = live.wait_aggregate(branch["id"])
    store = live.thread.server.store
    path = store.files_dir / f"{aggregate_id}.npz"
    content, record = path.read_bytes(), store.get_file(aggregate_id)
    live.thread.stop()
    live.thread.stop = lambda: None  # the fixture would stop it again
    if damage == "truncated":  # what an operating-system crash leaves of a file never fsynced
        with open(path, "r+b") as handle:
            handle.truncate(len(content) // 2)
    else:  # or of a rename never fsynced
        path.unlink()
    thread = ServerThread(tmp_path / "first", keep_uploads=True)  # recovery checks and remakes it
    try:
        assert path.read_bytes() == content
        assert hashlib.sha256(content).hexdigest() == record.sha256 and len(content) == record.size
    finally:
        thread.stop()


def test_an_aggregate_its_uploads_cannot_remake_is_left_and_so_are_they(start_server, tmp_path: Path,
                                                                         caplog) -> None:
    from ..inprocess import ServerThread

    live = start_server(tmp_path / "first", keep_uploads=True)
    branch, leaves = live.make_branch(3)
    three_uploads(live, leaves, 0)
    aggregate_id = live.wait_aggregate(branch["id"])
    store = live.thread.server.store
    uploads = sorted(store.files_dir.glob("*.npz"))
    live.thread.stop()
    live.thread.stop = lambda: None  # the fixture would stop it again
    (store.files_dir / f"{aggregate_id}.npz").unlink()  # lost in a crash
    upload = next(path for path in uploads if path.stem != aggregate_id)
    upload.write_bytes(upload.read_bytes()[:100])  # and an upload damaged too
    thread = ServerThread(tmp_path / "first")  # default retention: it would remove the uploads
    try:
        assert "cannot be made again" in caplog.text
        assert all(path.exists() for path in uploads if path.stem != aggregate_id)  # kept for the operator
    finally:
        thread.stop()


def test_retention_keeps_a_rounds_uploads_until_its_aggregate_is_durable(live, monkeypatch, caplog) -> None:
    store = live.thread.server.store
    real_sync = store.sync_file
    failing = {"on": True}

    def sync_file(file_id: str) -> None:  # the disk refuses the fsync (injected fault)
        if failing["on"]:
            raise OSError(5, "Input/output error")
        real_sync(file_id)

    monkeypatch.setattr(store, "sync_file", sync_file)
    branch, leaves = live.make_branch(3)
    three_uploads(live, leaves, 0)
    first = live.wait_aggregate(branch["id"])
    listed = live.admin("GET", f"/admin/v1/branches/{branch['id']}/uploads", expect=200)["uploads"]
    uploads = [u["file_id"] for u in listed]
    live.wait_for(lambda: "making aggregate" in caplog.text and "retention for branch" in caplog.text)
    assert all((store.files_dir / f"{file_id}.npz").exists() for file_id in uploads)  # kept: not durable
    assert len(live.fetch(leaves[0], first).layers) == 4  # the leaves got it all the same
    failing["on"] = False
    three_uploads(live, leaves, 1)
    second = live.wait_aggregate(branch["id"], index=1)
    live.wait_for(lambda: sorted(p.stem for p in store.files_dir.glob("*.npz")) == sorted([first, second]))


# -- kill -9 ------------------------------------------------------------------------------------


def big_model(value: float) -> list[np.ndarray]:
    rng = np.random.default_rng(int(value))
    return [rng.normal(size=(2048, 2048)).astype(np.float32) * np.float32(value), np.full(1000, value, np.float32)]


def send(server, credentials: Path, layers: list[np.ndarray], weighting: float) -> None:
    leaf = json.loads(credentials.read_text())
    answer = requests.post(server.url + "/api/v1/file/upload", timeout=60,
                           files={"file": ("w.npz", wire.encode(layers, weighting, compression="none"))},
                           data={"data": "{}"}, headers={"Authorization": f"Bearer {leaf['id']}:{leaf['session_token']}"})
    assert answer.status_code == 201, answer.text


def aggregate_of(server, branch_id: str, index: int) -> list[np.ndarray]:
    from ..conftest import wait_until

    def done() -> str | None:
        rounds = server.admin("GET", f"/admin/v1/branches/{branch_id}/rounds").json()["data"]["rounds"]
        return next((r["aggregate_id"] for r in rounds if r["round_index"] == index and r["aggregate_id"]), None)

    aggregate_id = wait_until(done, 60, f"the aggregate of round {index}")
    path = server.data_dir / "files" / f"{aggregate_id}.npz"
    return wire.decode(path.read_bytes()).layers


def test_kill_9_during_a_round_and_its_aggregation_loses_and_doubles_nothing(server_factory) -> None:
    server, credentials = server_factory(3)
    branch_id = json.loads(credentials[0].read_text())["branch_id"]
    round0 = [(big_model(1), 3.0), (big_model(2), 1.0), (big_model(3), 2.5)]
    send(server, credentials[0], *round0[0])
    send(server, credentials[1], *round0[1])
    server.kill()  # two uploads folded (or being folded) in memory, gone
    server.start()
    send(server, credentials[2], *round0[2])
    for got, want in zip(aggregate_of(server, branch_id, 0), numpy_mean(round0)):
        np.testing.assert_array_equal(got, want)

    round1 = [(big_model(4), 1.0), (big_model(5), 6.0), (big_model(6), 2.0)]
    for path, upload in zip(credentials, round1):
        send(server, path, *upload)
    server.kill()  # right after the last 201: the round's fold and aggregation are under way
    store = Store(server.data_dir)
    try:
        rounds = {r["round_index"]: r for r in store.list_rounds(branch_id)}
        assert rounds[1]["status"] == "open" and rounds[1]["upload_count"] == 3, "the kill came too late"
    finally:
        store.close()
    server.start()
    for got, want in zip(aggregate_of(server, branch_id, 1), numpy_mean(round1)):
        np.testing.assert_array_equal(got, want)
    files = sorted(p.name for p in (server.data_dir / "files").iterdir())
    assert len(files) == 2 and not any(name.startswith(".tmp-") for name in files)  # two aggregates, no uploads


@pytest.mark.parametrize("prepared_bytes", ["as prepare writes them", "larger", "smaller"])
def test_the_mean_written_over_a_prepared_file_is_the_mean_written_fresh(tmp_path: Path, prepared_bytes: str) -> None:
    rng = np.random.default_rng(3)
    running = RunningSum()
    running.sync(stored(tmp_path, [(model(rng), 2.0), (model(rng), 5.0)]))
    fresh = running.write(tmp_path / "fresh.npz")
    prepared = tmp_path / "prepared.npz"
    assert not running.prepare(prepared, awaited=1 << 50) and not prepared.exists()  # no room left for the uploads
    assert running.prepare(prepared)
    assert prepared.read_bytes() == bytes(prepared.stat().st_size) and prepared.stat().st_size >= fresh[0]
    if prepared_bytes != "as prepare writes them":  # whatever a crash or another model left there
        prepared.write_bytes(b"\xff" * (fresh[0] * 3 if prepared_bytes == "larger" else 100))
    inode = prepared.stat().st_ino
    assert running.write(prepared) == fresh  # same size and SHA-256: the file ends where the archive does
    assert prepared.read_bytes() == (tmp_path / "fresh.npz").read_bytes() and prepared.stat().st_ino == inode
