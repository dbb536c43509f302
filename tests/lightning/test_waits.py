"""A waiting Lightning leaf says what it waits for (in Lightning's own output, no logging set-up), ends at once
on SIGTERM or Ctrl-C the way Lightning ends a run, and catches up when resumed from an older checkpoint.

The leaves of the first tests are real processes (``tests.lightning.quiet_leaf``) against a real branchkey-local.
"""

from __future__ import annotations

import re
import signal
import threading

import numpy as np
from lightning.pytorch.callbacks import ModelCheckpoint

from branchkey_integrations import Client
from branchkey_integrations.core.federation import Federation
from branchkey_integrations.lightning import federated_tensors

from ..leaf_process import LOG_EVERY_S, LeafProcess, check_the_wait_names_the_missing_then_the_refused_leaf
from .models import Recorder, TinyModel, loader, trainer
from .test_rounds import callback_for

#: Lightning's ending of a run after SIGTERM: its loops raise SIGTERMException, a SystemExit without a code
LIGHTNING_SIGTERM_STATUS = 0
#: Lightning's ending of a run after Ctrl-C: "Detected KeyboardInterrupt, attempting graceful shutdown", exit(1)
LIGHTNING_CTRL_C_STATUS = 1


def start_leaf(tmp_path, credentials, server, bar: str = "bar") -> LeafProcess:
    return LeafProcess("tests.lightning.quiet_leaf", [str(credentials), server.url, str(tmp_path / "out"),
                                                      str(LOG_EVERY_S), bar], tmp_path / "leaf.log")


def test_a_waiting_leaf_names_the_missing_and_the_refused_leaf_and_sigterm_ends_it_as_lightning_does(
        server_factory, tmp_path):
    server, credentials = server_factory(2)  # leaf_2 does not train: leaf_1 waits for it
    leaf = start_leaf(tmp_path, credentials[0], server)
    try:
        wrong = [t.detach().numpy() for _, t in federated_tensors(TinyModel(hidden=5))]  # leaf_2: another model
        check_the_wait_names_the_missing_then_the_refused_leaf(leaf, server, credentials[1], wrong, "stem.weight")

        code, seconds = leaf.end_with(signal.SIGTERM)
        output = leaf.output()
        assert seconds <= 2, f"SIGTERM took {seconds:.1f} s to end the waiting leaf"
        assert code == LIGHTNING_SIGTERM_STATUS, output[-3000:]
        assert "Received SIGTERM" in output  # Lightning's own handler saw it
        assert "BranchKey: SIGTERM received: ending training." in output
        assert "Traceback" not in output, output[-3000:]
        assert list((tmp_path / "out").glob("*.ckpt")), "OnExceptionCheckpoint saved nothing"
        assert not (tmp_path / "out" / "done.json").exists()
    finally:
        leaf.close()


def test_ctrl_c_ends_a_waiting_leaf_with_lightnings_graceful_shutdown(server_factory, tmp_path):
    """Without a progress bar: the report goes through Lightning's rank-zero logger, shown with no set-up."""
    server, credentials = server_factory(2)
    leaf = start_leaf(tmp_path, credentials[0], server, bar="nobar")
    try:
        leaf.wait_for(r"BranchKey: Round 1\b[^\n]*missing: leaf_2", 120, "the waiting report")
        code, seconds = leaf.end_with(signal.SIGINT)
        assert seconds <= 2, f"Ctrl-C took {seconds:.1f} s to end the waiting leaf"
        assert code == LIGHTNING_CTRL_C_STATUS, leaf.tail()
        assert "Detected KeyboardInterrupt, attempting graceful shutdown" in leaf.output()
    finally:
        leaf.close()


def test_a_leaf_resumed_two_rounds_behind_catches_up_and_the_next_round_has_both_leaves(
        server_factory, uploads, tmp_path, caplog):
    server, credentials = server_factory(2)
    partner = Federation(credentials[1], host=server.url, transport="websocket", timeout=60)
    partner.connect()
    arrays = [np.full(t.shape, 0.5, np.float32) for _, t in federated_tensors(TinyModel())]
    failures: list[BaseException] = []

    def partner_rounds(count: int) -> threading.Thread:
        def run() -> None:
            try:
                for _ in range(count):
                    partner.run_round(arrays, 24.0)
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                failures.append(exc)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    try:
        # three rounds, a checkpoint after each epoch
        thread = partner_rounds(3)
        checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
        trainer([callback_for(credentials[0], server), checkpoints], max_epochs=3, enable_checkpointing=True,
                default_root_dir=tmp_path).fit(TinyModel(), loader(8, 0))
        thread.join(60)
        assert not failures and partner.round == 3
        latest = partner.last_aggregation_id

        # resumed after round 1: the branch is at round 3; epoch 1 catches up, epoch 2 is round 4 with both leaves
        uploads.clear()
        thread = partner_rounds(1)
        callback, loaded = callback_for(credentials[0], server), Recorder("loaded")
        fit = trainer([callback, loaded], max_epochs=3, default_root_dir=tmp_path)
        with caplog.at_level("INFO"):
            fit.fit(TinyModel(), loader(8, 0), ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt")
        thread.join(60)
    finally:
        partner.close()
    assert not failures
    assert callback.round == 4 and partner.round == 4
    assert callback.federation.last_aggregation_id == partner.last_aggregation_id != latest
    assert [w for w, _ in uploads] == [24.0, 8.0] or [w for w, _ in uploads] == [8.0, 24.0]  # round 4 only
    assert re.search(r"rounds behind.*older checkpoint", caplog.text), caplog.text  # the core's WARNING
    assert "BranchKey: this leaf was behind its branch" in caplog.text  # and the callback's line in Lightning's output
    assert "is now at round 3" in caplog.text
    with Client(credentials[1], host=server.url, transport="none") as client:
        archive = client.download_aggregate(latest)
        caught_up = [layer.copy() for layer in archive.layers]
    for name, array in zip(["stem.weight", "stem.bias", "head.weight", "head.bias"], caught_up):
        np.testing.assert_array_equal(loaded.records[0][name], array)  # epoch 1 holds the branch's round 3
