"""No leaf can lock a round: compression bombs refused, layer-layout rules, operator drop/reset, retention.

Every test runs the real server in-process and speaks its HTTP API; the archives are real NPZ files.
"""

from __future__ import annotations

import functools
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import requests

from branchkey_integrations.core import wire


def model(value: float, shape: tuple[int, ...] = (2, 3)) -> list[np.ndarray]:
    return [np.full(shape, value, np.float32), np.arange(4, dtype=np.float32) * value]


def mean(uploads: list[tuple[list[np.ndarray], float]]) -> list[np.ndarray]:
    weights = np.array([w for _, w in uploads])
    return [np.average(np.stack([u[i].astype(np.float64) for u, _ in uploads]), axis=0, weights=weights)
            .astype(uploads[0][0][i].dtype) for i in range(len(uploads[0][0]))]


def progress(live, leaf) -> dict:
    answer = requests.get(f"{live.url}/api/v1/round/{leaf['branch_id']}", headers=live.auth(leaf), timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


def upload_together(live, branch, leaves, sent: list[tuple[list[np.ndarray], float]]) -> None:
    """Each leaf uploads its ``(layers, weighting)`` at the same time; every one is answered 201, and the
    round's aggregate is NumPy's weighted mean."""
    import threading

    answers: list[int] = []
    threads = [threading.Thread(target=lambda leaf=leaf, u=u: answers.append(
        live.upload(leaf, wire.encode(*u, compression="none")).status_code)) for leaf, u in zip(leaves, sent)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert answers == [201] * len(sent)
    [layer] = live.fetch(leaves[0], live.wait_aggregate(branch["id"])).layers
    np.testing.assert_array_equal(layer, mean(sent)[0])


@functools.lru_cache(maxsize=1)
def bomb(inflated_bytes: int) -> bytes:
    """A valid BranchKey archive whose one layer is zeros deflated ~1000:1."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr("weighting.npy", _npy(np.array([1.0])))
        zf.writestr("layer_0.npy", _npy(np.zeros(inflated_bytes // 4, np.float32)))
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_a_compression_bomb_is_refused_naming_the_member_before_it_counts(live) -> None:
    branch, (a, b) = live.make_branch(2)
    content = bomb(80 * 1024**2)
    assert len(content) < 200_000  # ~80 MB of zeros in ~80 KB
    answer = live.upload(a, content)
    assert answer.status_code == 413, answer.text
    error = answer.json()["error"]
    assert "'layer_0.npy'" in error and "compression bomb" in error and "--max-compression-ratio" in error
    assert live.rounds(branch["id"])[0]["upload_count"] == 0
    # real weights go through, deflated as the official client sends them
    honest = wire.encode([np.random.default_rng(0).normal(size=(1000, 1000)).astype(np.float32)], 1.0)
    assert live.upload(a, honest).status_code == 201


def test_the_compression_ratio_limit_is_configurable(start_server) -> None:
    live = start_server(max_compression_ratio=5000)
    branch, (a, _) = live.make_branch(2)
    assert live.upload(a, bomb(80 * 1024**2)).status_code == 201


def test_a_leaf_replaces_its_own_wrong_layout_while_its_upload_is_the_only_one(live) -> None:
    branch, (a, b) = live.make_branch(2)
    assert live.upload(a, wire.encode(model(1, (7,)), 1.0)).status_code == 201  # the wrong model
    assert live.upload(a, wire.encode(model(1), 1.0)).status_code == 201        # corrected: accepted
    assert live.upload(b, wire.encode(model(3), 3.0)).status_code == 201
    aggregate = live.fetch(a, live.wait_aggregate(branch["id"]))
    for got, want in zip(aggregate.layers, mean([(model(1), 1.0), (model(3), 3.0)])):
        np.testing.assert_array_equal(got, want)


def test_with_another_leafs_upload_in_the_round_its_layout_holds(live) -> None:
    branch, (a, b, c) = live.make_branch(3)
    assert live.upload(a, wire.encode(model(1), 1.0)).status_code == 201
    assert live.upload(b, wire.encode(model(2), 1.0)).status_code == 201
    refused = live.upload(a, wire.encode(model(1, (7,)), 1.0))
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert "layer_0: expected float32[2, 3], received float32[7]" in error and f"upload of {b['name']}" in error


def test_from_the_second_round_the_previous_aggregates_layout_holds(live) -> None:
    branch, (a, b) = live.make_branch(2)
    for leaf in (a, b):
        assert live.upload(leaf, wire.encode(model(1), 1.0)).status_code == 201
    live.wait_aggregate(branch["id"])
    refused = live.upload(a, wire.encode([np.zeros((2, 3), np.float32), np.zeros(5, np.float32)], 1.0))
    assert refused.status_code == 400  # even as the only upload of round 1
    error = refused.json()["error"]
    assert "layer_1: expected float32[4], received float32[5]" in error and "aggregate of round 1" in error
    assert any(r["leaf"] == a["name"] and "layer_1" in r["reason"] for r in progress(live, a)["refused"])
    assert live.upload(a, wire.encode(model(2), 1.0)).status_code == 201


def test_an_operator_drops_the_upload_that_locked_a_round_and_it_completes(live) -> None:
    branch, (a, b) = live.make_branch(2)
    assert live.upload(a, wire.encode(model(1, (7,)), 1.0)).status_code == 201  # wrong model, a then crashes
    assert live.upload(b, wire.encode(model(2), 2.0)).status_code == 400        # locked out
    dropped = live.admin("DELETE", f"/admin/v1/branches/{branch['id']}/rounds/open/uploads/{a['name']}",
                         {"note": "wrong model"}, expect=200)
    assert dropped == {"run_number": 1, "round_index": 0, "dropped": [a["name"]]}
    refusal = next(r for r in progress(live, a)["refused"] if r["leaf"] == a["name"])
    assert "operator dropped this upload: wrong model" in refusal["reason"]
    assert live.upload(b, wire.encode(model(2), 2.0)).status_code == 201
    assert live.upload(a, wire.encode(model(5), 1.0)).status_code == 201
    aggregate = live.fetch(a, live.wait_aggregate(branch["id"]))
    for got, want in zip(aggregate.layers, mean([(model(2), 2.0), (model(5), 1.0)])):
        np.testing.assert_array_equal(got, want)
    missing = live.admin("DELETE", f"/admin/v1/branches/{branch['id']}/rounds/open/uploads/{a['name']}")
    assert "has no upload in the open round" in missing["error"]


def test_an_operator_resets_the_open_round_and_only_new_uploads_count(live) -> None:
    branch, (a, b, c) = live.make_branch(3)
    for leaf, value in ((a, 100), (b, 200)):
        assert live.upload(leaf, wire.encode(model(value), 1.0)).status_code == 201
    reset = live.admin("POST", f"/admin/v1/branches/{branch['id']}/rounds/open/reset", {}, expect=200)
    assert reset["round_index"] == 0 and sorted(reset["dropped"]) == sorted([a["name"], b["name"]])
    state = progress(live, c)
    assert state["round_index"] == 0 and state["uploaded"] == []
    assert {r["leaf"] for r in state["refused"]} == {a["name"], b["name"]}
    uploads = [(model(1), 1.0), (model(2), 2.0), (model(4), 4.0)]
    for leaf, (layers, weighting) in zip((a, b, c), uploads):
        assert live.upload(leaf, wire.encode(layers, weighting)).status_code == 201
    aggregate = live.fetch(a, live.wait_aggregate(branch["id"]))
    for got, want in zip(aggregate.layers, mean(uploads)):
        np.testing.assert_array_equal(got, want)
    assert not list(live.thread.server.store.files_dir.glob(".tmp-*"))


def run_rounds(live, leaves, branch_id: str, count: int) -> list[str]:
    ids = []
    for index in range(count):
        for number, leaf in enumerate(leaves, start=1):
            assert live.upload(leaf, wire.encode(model(index + number), float(number))).status_code == 201
        ids.append(live.wait_aggregate(branch_id, index=index))
    return ids


def test_retention_removes_aggregated_uploads_and_old_aggregates_never_the_latest(start_server) -> None:
    live = start_server(keep_rounds=2)
    store = live.thread.server.store
    branch, leaves = live.make_branch(2)
    ids = run_rounds(live, leaves, branch["id"], 4)
    live.wait_for(lambda: sorted(p.stem for p in store.files_dir.glob("*.npz")) == sorted(ids[2:]))
    for gone in ids[:2]:
        answer = live.download(leaves[0], gone)
        assert answer.status_code == 410 and "removed by the server's retention" in answer.json()["error"]
    for kept in ids[2:]:
        assert len(live.fetch(leaves[0], kept).layers) == 2
    uploads = live.admin("GET", f"/admin/v1/branches/{branch['id']}/uploads", expect=200)["uploads"]
    assert len(uploads) == 8  # the rows stay: listings and history still show every round
    usage = store.disk_usage()
    assert usage["uploads"] == 0 and usage["aggregates"] == sum(
        (store.files_dir / f"{i}.npz").stat().st_size for i in ids[2:])


def test_keep_rounds_1_keeps_only_the_latest_and_keep_uploads_keeps_uploads(start_server) -> None:
    live = start_server(keep_rounds=1, keep_uploads=True)
    store = live.thread.server.store
    branch, leaves = live.make_branch(2)
    ids = run_rounds(live, leaves, branch["id"], 3)
    live.wait_for(lambda: not (store.files_dir / f"{ids[1]}.npz").exists())
    assert (store.files_dir / f"{ids[2]}.npz").exists()
    assert len(live.fetch(leaves[0], ids[2]).layers) == 2
    assert len(list(store.files_dir.glob("*.npz"))) == 1 + 3 * 2  # the latest aggregate and every upload


def test_keep_rounds_0_keeps_every_aggregate(start_server) -> None:
    live = start_server(keep_rounds=0)
    store = live.thread.server.store
    branch, leaves = live.make_branch(2)
    ids = run_rounds(live, leaves, branch["id"], 3)
    live.wait_for(lambda: sorted(p.stem for p in store.files_dir.glob("*.npz")) == sorted(ids))


def test_the_cli_drops_an_upload_and_resets_a_round_of_a_live_server(server_factory) -> None:
    from ..conftest import cli

    server, credentials = server_factory(2)
    a, b = (json.loads(path.read_text()) for path in credentials)
    headers = {"Authorization": f"Bearer {a['id']}:{a['session_token']}"}
    answer = requests.post(server.url + "/api/v1/file/upload", headers=headers, timeout=30, data={"data": "{}"},
                           files={"file": ("w.npz", wire.encode(model(1, (7,)), 1.0))})
    assert answer.status_code == 201, answer.text
    data_dir = str(server.data_dir)
    dropped = cli("round", "drop-upload", a["name"], "--data-dir", data_dir, "--note", "wrong model")
    assert f"dropped the upload(s) of {a['name']} through {server.url}" in dropped.stdout
    state = requests.get(f"{server.url}/api/v1/round/{a['branch_id']}", headers=headers, timeout=10).json()["data"]
    assert state["uploaded"] == [] and "wrong model" in state["refused"][0]["reason"]
    missing = cli("round", "drop-upload", a["name"], "--data-dir", data_dir, check=False)
    assert missing.returncode == 1 and "has no upload in the open round" in missing.stderr
    reset = cli("round", "reset", "--data-dir", data_dir)
    assert "dropped the upload(s) of nobody" in reset.stdout
    status = cli("status", "--data-dir", data_dir)
    assert "disk    " in status.stdout and "aggregates 0.0 MB" in status.stdout
    server.stop()
    offline = cli("round", "reset", "--data-dir", data_dir, "--note", "maintenance")
    assert "in the store (no live server)" in offline.stdout


def test_uploads_share_a_small_in_flight_budget_and_all_complete(start_server, monkeypatch) -> None:
    from branchkey_integrations.server import budget as receipt

    monkeypatch.setattr(receipt, "MAX_BYTES_IN_FLIGHT", 1 << 20)  # 1 MiB for every upload together
    live = start_server()
    branch, leaves = live.make_branch(6)
    sent = [([np.full(750_000, i, np.float32)], float(i + 1)) for i in range(6)]  # 3 MB each
    upload_together(live, branch, leaves, sent)
    budget = receipt.ByteBudget._instances[live.thread.loop]
    assert budget.capacity == 1 << 20 and budget.used == 0  # every byte given back


def test_an_upload_is_answered_once_folded_so_the_last_answer_leaves_only_the_mean(start_server, monkeypatch) -> None:
    """Uploads that finish together are folded after their bodies arrived; each 201 waits until its
    upload is in the round's running sum (a fold pass, or the aggregation's own bringing up to date),
    so what follows the round's last 201 is writing the mean: O(model), however many finished with it."""
    from branchkey_integrations.server.aggregation import RunningSum

    events: list[tuple[str, object]] = []
    real_extend = RunningSum.extend

    def extend(self, *args, **kwargs) -> None:  # in a worker thread, done before the answers it lets go
        real_extend(self, *args, **kwargs)  # every fold goes through it (sync too: it checks, then extends)
        events.append(("folded", set(self.members.values())))

    monkeypatch.setattr(RunningSum, "extend", extend)
    live = start_server()
    real_upload = live.upload

    def upload(*args, **kwargs):  # the 201 arrived: after whatever the server did before sending it
        answer = real_upload(*args, **kwargs)
        events.append(("answered", answer.json()["data"]["file_id"]))
        return answer

    live.upload = upload
    branch, leaves = live.make_branch(6)
    sent = [([np.full(250_000, i, np.float32)], float(i + 1)) for i in range(6)]
    upload_together(live, branch, leaves, sent)
    folded: set[object] = set()
    for kind, what in events:
        if kind == "folded":
            folded |= what  # type: ignore[operator]
        else:
            assert what in folded, f"upload {what} was answered before it was folded: {events}"
    assert sum(kind == "answered" for kind, _ in events) == 6


def test_the_aggregate_is_written_into_the_file_prepared_while_the_round_was_open(live) -> None:
    """After a round's first upload the server writes its aggregate-to-be ahead (zeros, in the page cache);
    the aggregate is then that very file, so the time after the last upload does not pay for fresh pages."""
    files = live.thread.server.store.files_dir
    branch, leaves = live.make_branch(2)
    sent = [([np.full((300, 100), i, np.float32), np.arange(7, dtype=np.float64) * i], float(i + 1)) for i in range(2)]
    assert live.upload(leaves[0], wire.encode(*sent[0])).status_code == 201
    [prepared] = live.wait_for(lambda: [p for p in files.iterdir() if p.name.startswith(".tmp-")
                                        and p.stat().st_size >= 300 * 100 * 4 + 7 * 8])
    inode = prepared.stat().st_ino
    assert live.upload(leaves[1], wire.encode(*sent[1])).status_code == 201
    aggregate_id = live.wait_aggregate(branch["id"])
    assert (files / f"{aggregate_id}.npz").stat().st_ino == inode
    for got, want in zip(live.fetch(leaves[0], aggregate_id).layers, mean(sent)):
        np.testing.assert_array_equal(got, want)
    assert not [p for p in files.iterdir() if p.name.startswith(".tmp-")]


def test_a_full_disk_while_the_aggregate_is_written_ahead_costs_only_that(live, monkeypatch, caplog) -> None:
    import errno

    from branchkey_integrations.server.aggregation import RunningSum

    def full(self, destination, awaited: int = 0) -> bool:
        Path(destination).write_bytes(b"\0" * 1000)  # what got written before the disk filled
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RunningSum, "prepare", full)
    files = live.thread.server.store.files_dir
    branch, leaves = live.make_branch(2)
    sent = [([np.full((300, 100), i, np.float32)], float(i + 1)) for i in range(2)]
    assert live.upload(leaves[0], wire.encode(*sent[0])).status_code == 201
    live.wait_for(lambda: "ahead failed" in caplog.text)
    assert not [p for p in files.iterdir() if p.name.startswith(".tmp-")]  # the partial file removed
    assert live.upload(leaves[1], wire.encode(*sent[1])).status_code == 201
    [layer] = live.fetch(leaves[0], live.wait_aggregate(branch["id"])).layers
    np.testing.assert_array_equal(layer, mean(sent)[0])


def test_an_upload_that_reads_small_pieces_has_its_socket_read_small_then_restored(live, monkeypatch) -> None:
    from branchkey_integrations.server import uploads as receipt

    monkeypatch.setattr(receipt, "FAST_UPLOADS", 0)  # every upload reads SMALL_READ pieces, as past the first four
    monkeypatch.setattr(receipt, "_MANY_UPLOADS", -1)  # ... and its socket 32 KiB at a time, as past the 16th
    seen: list[tuple[int, object]] = []
    real_read = receipt._read_or_stall

    async def read(request, *args, **kwargs):
        transport = request.transport
        seen.append((transport.max_size, transport))
        return await real_read(request, *args, **kwargs)

    monkeypatch.setattr(receipt, "_read_or_stall", read)
    branch, leaves = live.make_branch(2)
    assert live.upload(leaves[0], wire.encode([np.ones(300_000, np.float32)], 1.0)).status_code == 201
    sizes = {size for size, _ in seen}
    transport = seen[0][1]
    assert sizes == {receipt.SMALL_RECV} and receipt.SMALL_RECV < type(transport).max_size
    assert "max_size" not in vars(transport)  # the connection's next request reads as asyncio does


def archive_with_weighting(weighting: float, layers: list[np.ndarray]) -> bytes:
    """An archive whose weighting member holds any float64, as a hostile leaf writes it (wire.encode refuses)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("weighting.npy", _npy(np.array([weighting], np.float64)))
        for index, layer in enumerate(layers):
            zf.writestr(f"layer_{index}.npy", _npy(layer))
    return buffer.getvalue()


def test_a_weighting_outside_the_accepted_range_is_refused_and_the_round_aggregates(live) -> None:
    """5e-324 (finite, > 0) used to be accepted, and the next normal upload's fold overflowed: the round never
    aggregated, through restarts, until an operator dropped it. Now it is a 400 that names the range."""
    branch, (a, b) = live.make_branch(2)
    for weighting in (5e-324, 1e300):
        refused = live.upload(a, archive_with_weighting(weighting, model(1)))
        assert refused.status_code == 400, refused.text
        assert f"from {wire.MIN_WEIGHTING:.4g} to {wire.MAX_WEIGHTING:.4g}" in refused.json()["error"]
    sent = [(model(1), wire.MIN_WEIGHTING), (model(3), wire.MAX_WEIGHTING)]  # the extremes aggregate exactly
    assert live.upload(a, archive_with_weighting(sent[0][1], sent[0][0])).status_code == 201
    assert live.upload(b, archive_with_weighting(sent[1][1], sent[1][0])).status_code == 201
    aggregate = live.fetch(a, live.wait_aggregate(branch["id"]))
    for got, want in zip(aggregate.layers, mean(sent)):
        np.testing.assert_array_equal(got, want)


def test_a_fold_that_fails_ends_neither_the_fold_task_nor_the_round(live, monkeypatch, caplog) -> None:
    """Folding raised OverflowError once; the fold task died without a word and the round never aggregated.
    Now the failure is an ERROR line, the aggregation tries again while it fails, and the round completes."""
    from branchkey_integrations.server.aggregation import RunningSum

    failing = {"on": True}
    original = RunningSum.sync

    def sync(self, *args, **kwargs):
        if failing["on"]:
            raise OverflowError("math range error")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RunningSum, "sync", sync)
    branch, (a, b) = live.make_branch(2)
    with caplog.at_level("DEBUG", logger="branchkey_integrations.server.rounds"):
        assert live.upload(a, wire.encode(model(1), 1.0)).status_code == 201
        assert live.upload(b, wire.encode(model(2), 3.0)).status_code == 201
        live.wait_for(lambda: any("aggregating branch" in r.message and "OverflowError" in r.message
                                  for r in caplog.records))
    assert any(r.levelname == "ERROR" and "folding branch" in r.message for r in caplog.records)
    failing["on"] = False
    aggregate = live.fetch(a, live.wait_aggregate(branch["id"]))
    for got, want in zip(aggregate.layers, mean([(model(1), 1.0), (model(2), 3.0)])):
        np.testing.assert_array_equal(got, want)
