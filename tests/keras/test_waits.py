"""A waiting Keras leaf (torch backend, a real process, no logging set-up) says what it waits for through Keras's
own printing, names a refused upload, and ends at once on SIGTERM (``SystemExit(143)``) or Ctrl-C
(``KeyboardInterrupt``); ``verbose=0`` keeps it silent."""

from __future__ import annotations

import json
import signal

from ..leaf_process import LOG_EVERY_S, LeafProcess, check_the_wait_names_the_missing_then_the_refused_leaf

#: what the Keras callback ends a run with after SIGTERM: SystemExit(128 + 15), as a shell reports a SIGTERM'd process
KERAS_SIGTERM_STATUS = 143


def start_leaf(tmp_path, credentials, server, **config) -> LeafProcess:
    config = {"credentials": str(credentials), "host": server.url, "out": str(tmp_path / "out"),
              "log_every_s": LOG_EVERY_S, **config}
    return LeafProcess("tests.keras.quiet_leaf", [json.dumps(config)], tmp_path / "leaf.log",
                       env={"KERAS_BACKEND": "torch", "CUDA_VISIBLE_DEVICES": ""})


def wrong_model() -> list:
    import numpy as np
    return [np.zeros((4, 5), np.float32), np.zeros(5, np.float32), np.zeros((5, 2), np.float32),
            np.zeros(2, np.float32)]  # Dense(5) where the leaves have Dense(3)


def test_a_waiting_leaf_names_the_missing_and_the_refused_leaf_and_sigterm_ends_it(server_factory, tmp_path):
    server, credentials = server_factory(2)  # leaf_2 does not train: leaf_1 waits for it
    leaf = start_leaf(tmp_path, credentials[0], server)
    try:
        check_the_wait_names_the_missing_then_the_refused_leaf(leaf, server, credentials[1], wrong_model(),
                                                               "tiny/stem/kernel")

        code, seconds = leaf.end_with(signal.SIGTERM)
        output = leaf.output()
        assert seconds <= 2, f"SIGTERM took {seconds:.1f} s to end the waiting leaf"
        assert code == KERAS_SIGTERM_STATUS, output[-3000:]
        assert "BranchKey: SIGTERM received: ending training." in output
        assert "Traceback" not in output, output[-3000:]
        assert (tmp_path / "out" / "finally").exists()  # the script's finally block ran
        assert not (tmp_path / "out" / "done.json").exists()
    finally:
        leaf.close()


def test_ctrl_c_ends_a_waiting_leaf_with_keyboard_interrupt(server_factory, tmp_path):
    server, credentials = server_factory(2)
    leaf = start_leaf(tmp_path, credentials[0], server)
    try:
        leaf.wait_for(r"Round 1\b[^\n]*missing: leaf_2", 120, "the waiting report")
        code, seconds = leaf.end_with(signal.SIGINT)
        assert seconds <= 2, f"Ctrl-C took {seconds:.1f} s to end the waiting leaf"
        assert code == -signal.SIGINT, leaf.tail()  # Python's exit on an uncaught KeyboardInterrupt (130 in a shell)
        assert "KeyboardInterrupt" in leaf.output()
        assert (tmp_path / "out" / "finally").exists()
    finally:
        leaf.close()


def test_verbose_0_prints_nothing_of_the_rounds(server_factory, tmp_path):
    server, credentials = server_factory(1)  # rounds complete with this leaf alone
    leaf = start_leaf(tmp_path, credentials[0], server, verbose=0)
    try:
        assert leaf.process.wait(120) == 0, leaf.tail()
    finally:
        leaf.close()
    assert json.loads((tmp_path / "out" / "done.json").read_text())["round"] == 2
    assert "BranchKey" not in leaf.output(), leaf.tail()
