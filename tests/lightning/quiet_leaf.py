"""A Lightning leaf as a new user writes it: ``python -m tests.lightning.quiet_leaf CREDENTIALS HOST OUT LOG_EVERY_S
[BAR]``.

No logging set-up, Lightning's default progress bar (none with ``BAR=nobar``: the callback then speaks through
Lightning's rank-zero logger), ``OnExceptionCheckpoint`` (Lightning's way of saving a run
that ends on an exception, SIGTERM included) into ``OUT``. Ctrl-C behaves as in a terminal (a test runner may
start this process with SIGINT ignored). Two epochs, one round each; ``OUT/done.json`` when ``fit`` returns.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from lightning.pytorch.callbacks import OnExceptionCheckpoint

from branchkey_integrations.lightning import BranchKeyCallback

from .models import TinyModel, loader, trainer


def main(credentials: str, host: str, out: str, log_every_s: str, bar: str = "bar") -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    callback = BranchKeyCallback(credentials, host=host, transport="websocket", timeout=120,
                                 log_every_s=float(log_every_s))
    fit = trainer([callback, OnExceptionCheckpoint(out)], max_epochs=2, enable_progress_bar=bar != "nobar",
                  enable_checkpointing=True, default_root_dir=out)
    fit.fit(TinyModel(), loader(16, 0))
    (Path(out) / "done.json").write_text(json.dumps({"round": callback.round}))


if __name__ == "__main__":
    main(*sys.argv[1:])
