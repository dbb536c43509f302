"""DDP (2 CPU processes, gloo): an error on global rank 0 surfaces on both ranks, within seconds, never a hang."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from branchkey_integrations.lightning import BranchKeyCallback

from .models import TinyModel, loader, trainer


class ErrorRecordingCallback(BranchKeyCallback):
    """Writes what each rank raised to ``error_rank<r>.json``. Rank 0 re-raises only once rank 1 has
    written its record, because the spawn launcher kills the other ranks as soon as one fails."""

    def __init__(self, out_dir: Path, **kwargs) -> None:
        super().__init__(**kwargs)
        self.out_dir = out_dir

    def _federate(self, trainer, pl_module) -> None:
        try:
            super()._federate(trainer, pl_module)
        except BaseException as exc:
            record = {"type": type(exc).__name__, "message": str(exc), "at": time.time()}
            (self.out_dir / f"error_rank{trainer.global_rank}.json").write_text(json.dumps(record))
            if trainer.global_rank == 0:
                deadline = time.monotonic() + 30
                while not (self.out_dir / "error_rank1.json").exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
            raise


def test_an_error_on_rank_0_surfaces_on_both_ranks_within_seconds(server_factory, tmp_path):
    server, credentials = server_factory(2)  # the second leaf never uploads: rank 0's wait times out
    callback = ErrorRecordingCallback(tmp_path, credentials=str(credentials[0]), host=server.url,
                                      transport="websocket", timeout=2)
    fit = trainer([callback], strategy="ddp_spawn", devices=2)
    started = time.time()
    with pytest.raises(Exception, match="still waiting for the aggregate"):
        fit.fit(TinyModel(), loader(16, 0))

    records = [json.loads((tmp_path / f"error_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert records[0]["type"] == "AggregationTimeoutError"
    assert records[1]["type"] == records[0]["type"] and records[1]["message"] == records[0]["message"]
    assert abs(records[1]["at"] - records[0]["at"]) < 5
    assert records[1]["at"] - started < 60  # the timeout was 2 s: nothing hung
