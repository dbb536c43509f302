"""Store: atomic file installs, round bookkeeping, run semantics, restart safety."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from branchkey_integrations.core import wire
from branchkey_integrations.core.errors import (
    InvalidValueError,
    RecordNotFoundError,
    RoundClosedError,
    RunNotStartedError,
)
from branchkey_integrations.server.durable import start_writeback
from branchkey_integrations.server.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "data")
    yield store
    store.close()


def make_branch(store: Store, leaves: int = 2, **settings):
    tree = store.create_tree("t")
    branch = store.create_branch(tree["id"], "b", **settings)
    return branch, store.create_leaves(branch.id, leaves)


def put_upload(store: Store, leaf, value: float = 1.0, weighting: float = 1.0) -> str:
    branch = store.require_branch(leaf.branch_id)
    current = store.open_round(branch.id)
    layers = [np.full((2,), value, np.float32)]
    temp = store.new_temp_path()
    temp.write_bytes(wire.encode(layers, weighting))
    file_id, replaced = store.commit_upload(
        temp, leaf=leaf, run_number=current.run_number, round_index=current.round_index, weighting=weighting,
        specs=[wire.LayerSpec.of(a) for a in layers], size=temp.stat().st_size, sha256="00", metadata=None,
    )
    store.remove_files(replaced)
    return file_id


def test_new_branch_starts_run_1_round_0(store: Store) -> None:
    branch, leaves = make_branch(store, 3)
    assert (branch.run_status, branch.run_number) == ("start", 1)
    assert store.open_round(branch.id).round_index == 0
    assert [leaf.name for leaf in leaves] == ["leaf_1", "leaf_2", "leaf_3"]
    assert set(leaves[0].credentials()) == {"id", "name", "session_token", "owner_id", "tree_id", "branch_id"}
    assert store.required_uploads(branch) == 3


def test_commit_upload_installs_file_and_leaves_no_temp(store: Store) -> None:
    branch, (leaf, _) = make_branch(store)
    file_id = put_upload(store, leaf)
    record = store.get_file(file_id)
    path = store.file_path(record)
    assert path.exists() and path.name == f"{file_id}.npz"
    assert [p.name for p in store.files_dir.iterdir()] == [path.name]
    assert wire.decode(path).weighting == 1.0


def test_reupload_replaces_earlier_one_in_the_round(store: Store) -> None:
    branch, (leaf, _) = make_branch(store)
    first = put_upload(store, leaf, value=1.0)
    temp = store.new_temp_path()
    temp.write_bytes(wire.encode([np.full((2,), 2.0, np.float32)], 1.0))
    second, replaced = store.commit_upload(
        temp, leaf=leaf, run_number=1, round_index=0, weighting=1.0,
        specs=[wire.LayerSpec((2,), np.dtype(np.float32))], size=1, sha256="00", metadata=None,
    )
    uploads = store.round_uploads(branch.id, 1, 0)
    assert [u.file_id for u in uploads] == [second]
    assert replaced == [store.files_dir / f"{first}.npz"]
    # the replaced upload no longer counts, so it does not keep its disk space either
    store.remove_files(replaced + replaced)  # removing twice is harmless
    assert [p.name for p in store.files_dir.iterdir()] == [f"{second}.npz"]


def test_round_uploads_after_lists_only_the_later_ones_while_the_held_ones_lead(store: Store) -> None:
    branch, leaves = make_branch(store, 4)
    first, second, third = (put_upload(store, leaf) for leaf in leaves[:3])
    held = [(leaves[0].id, first), (leaves[1].id, second)]
    later = store.round_uploads_after(branch.id, 1, 0, held)
    assert [(u.leaf_id, u.file_id) for u in later] == [(leaves[2].id, third)]
    assert later[0].specs == store.round_uploads(branch.id, 1, 0)[2].specs
    assert store.round_uploads_after(branch.id, 1, 0, []) is not None and \
        len(store.round_uploads_after(branch.id, 1, 0, [])) == 3
    assert store.round_upload_count(branch.id, 1, 0) == 3
    replacement = put_upload(store, leaves[0], value=2.0)  # the first upload replaced: the held ones no longer lead
    assert store.round_uploads_after(branch.id, 1, 0, held) is None
    assert [u.file_id for u in store.round_uploads(branch.id, 1, 0)][-1] == replacement


def test_commit_upload_refused_when_paused_removes_the_file(store: Store) -> None:
    branch, (leaf, _) = make_branch(store)
    store.set_run_status(branch.id, "pause")
    with pytest.raises(RunNotStartedError, match="run is pause"):
        put_upload(store, leaf)
    assert list(store.files_dir.iterdir()) == []


def test_commit_upload_refused_when_round_closed(store: Store) -> None:
    branch, (leaf, _) = make_branch(store)
    temp = store.new_temp_path()
    temp.write_bytes(b"x")
    with pytest.raises(RoundClosedError):
        store.commit_upload(temp, leaf=leaf, run_number=1, round_index=5, weighting=1.0, specs=[], size=1,
                            sha256="00", metadata=None)
    assert list(store.files_dir.iterdir()) == []


@pytest.mark.skipif(sys.platform != "linux", reason="sync_file_range is Linux-only; elsewhere fsync does it all")
def test_start_writeback_is_taken_by_the_kernel_and_keeps_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "upload"
    data = os.urandom(1 << 20)
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        assert start_writeback(handle.fileno())
    assert path.read_bytes() == data
    assert not start_writeback(-1)  # a bad descriptor is refused, never raised


def test_run_semantics_pause_stop_start(store: Store) -> None:
    branch, (leaf, _) = make_branch(store)
    put_upload(store, leaf)
    store.set_run_status(branch.id, "pause")
    assert store.open_round(branch.id).round_index == 0
    resumed = store.set_run_status(branch.id, "start")
    assert resumed.run_number == 1 and len(store.round_uploads(branch.id, 1, 0)) == 1
    stopped = store.set_run_status(branch.id, "stop")
    assert stopped.run_status == "stop" and store.open_round(branch.id) is None
    assert [r["status"] for r in store.list_rounds(branch.id)] == ["abandoned"]
    restarted = store.set_run_status(branch.id, "start")
    assert restarted.run_number == 2 and store.open_round(branch.id).round_index == 0
    assert store.set_run_status(branch.id, "start").run_number == 2  # start while started changes nothing


def test_commit_aggregate_closes_round_and_opens_next(store: Store) -> None:
    branch, (leaf, _) = make_branch(store)
    put_upload(store, leaf)
    temp = store.new_temp_path()
    temp.write_bytes(wire.encode([np.zeros(2, np.float32)], compression="none"))
    specs = [wire.LayerSpec((2,), np.dtype(np.float32))]
    aggregate_id = store.commit_aggregate(temp, branch_id=branch.id, run_number=1, round_index=0, specs=specs,
                                          size=temp.stat().st_size, sha256="00")
    rounds = store.list_rounds(branch.id)
    assert [(r["round_index"], r["status"], r["aggregate_id"]) for r in rounds] == [
        (0, "aggregated", aggregate_id), (1, "open", None)]
    assert store.expected_specs(branch.id, 1, 1) == specs  # the next round expects the aggregate's layout
    temp = store.new_temp_path()
    temp.write_bytes(b"again")
    with pytest.raises(RoundClosedError):
        store.commit_aggregate(temp, branch_id=branch.id, run_number=1, round_index=0, specs=specs,
                               size=5, sha256="00")


def test_cleanup_removes_temp_and_orphan_files_only(store: Store) -> None:
    branch, (leaf, _) = make_branch(store)
    kept = store.file_path(store.get_file(put_upload(store, leaf)))
    store.new_temp_path().write_bytes(b"partial")
    (store.files_dir / "0000-orphan.npz").write_bytes(b"renamed but never committed")
    assert store.cleanup_stray_files() == 2
    assert list(store.files_dir.iterdir()) == [kept]


def test_reopen_keeps_secret_token_and_data(tmp_path: Path) -> None:
    first = Store(tmp_path / "d")
    branch, (leaf, _) = make_branch(first)
    file_id = put_upload(first, leaf)
    secret, token = first.secret, first.admin_token
    first.close()
    second = Store(tmp_path / "d")
    try:
        assert (second.secret, second.admin_token) == (secret, token)
        assert second.get_file(file_id) is not None and second.get_leaf(leaf.id) == leaf
        token_file = tmp_path / "d" / "admin_token"
        assert token_file.read_text().strip() == token
        assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(tmp_path / "d" / "store.sqlite3").st_mode) == 0o600
    finally:
        second.close()


def test_invalid_values_and_missing_ids(store: Store) -> None:
    tree = store.create_tree("t")
    with pytest.raises(InvalidValueError, match="min_leaves"):
        store.create_branch(tree["id"], "b", min_leaves=0)
    with pytest.raises(InvalidValueError, match="round_deadline_s"):
        store.create_branch(tree["id"], "b", round_deadline_s=-1)
    with pytest.raises(RecordNotFoundError):
        store.create_branch("nope", "b")
    branch = store.create_branch(tree["id"], "b")
    with pytest.raises(InvalidValueError, match="run_status"):
        store.set_run_status(branch.id, "go")
    with pytest.raises(InvalidValueError, match="count"):
        store.create_leaves(branch.id, 0)


def test_required_uploads_is_capped_by_leaf_count(store: Store) -> None:
    branch, _ = make_branch(store, 2, min_leaves=5)
    assert store.required_uploads(branch) == 2
    branch, _ = make_branch(store, 3, min_leaves=2)
    assert store.required_uploads(branch) == 2


def test_commit_aggregate_leaves_no_file_when_a_state_file_cannot_be_installed(store: Store) -> None:
    """A failed install of the optimizer state (here v's temp is missing) unlinks the aggregate and m at once,
    not at the next start."""
    from branchkey_integrations.server.records import StateUpdate

    branch, (leaf, _) = make_branch(store)
    put_upload(store, leaf)
    before = sorted(p.name for p in store.files_dir.iterdir())
    temp = store.new_temp_path()
    temp.write_bytes(wire.encode([np.zeros(2, np.float32)], compression="none"))
    m_temp = store.new_state_temp_path()
    m_temp.write_bytes(wire.encode([np.zeros(2)], compression="none"))
    state = StateUpdate("fedadam", {}, m_temp, store.new_state_temp_path())  # v's temp was never written
    with pytest.raises(FileNotFoundError):
        store.commit_aggregate(temp, branch_id=branch.id, run_number=1, round_index=0,
                               specs=[wire.LayerSpec((2,), np.dtype(np.float32))], size=temp.stat().st_size,
                               sha256="00", state=state)
    assert sorted(p.name for p in store.files_dir.iterdir()) == before
    assert list(store.state_dir.iterdir()) == []
    assert store.open_round(branch.id).round_index == 0


def test_each_table_and_each_method_belongs_to_one_record_family(store: Store) -> None:
    """Store composes the record families (store_*.py): every table of the database is created by exactly one
    of them, and no two define a method of the same name (Store would silently use the first one's)."""
    import re

    from branchkey_integrations.server.store_db import StoreDatabase

    declared = [name for tables in Store.TABLES for name in re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", tables.schema)]
    present = {row[0] for row in store._query("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert sorted(declared) == sorted(set(declared)) and present - {"sqlite_sequence"} == {*declared, "kv"}
    owner: dict[str, str] = {}
    for family in Store.__mro__[1:Store.__mro__.index(StoreDatabase)]:
        for name in vars(family):
            if not name.startswith("__"):
                assert name not in owner, f"{family.__name__} and {owner[name]} both define {name}"
                owner[name] = family.__name__
    assert {"create_branch", "commit_upload", "prune", "optimizer_state", "record_refusal", "add_outbox",
            "add_metric"} <= owner.keys()
