"""Federated learning on one machine, in one call: an embedded ``branchkey-local``, a branch of N
leaves training round by round with the framework (a worker process per leaf, or Ray tasks on a local Ray
or a cluster: :mod:`.simulation.backends`), and a report that compares the federated model with local-only training and a centralized baseline.

``branchkey-local simulate`` is this module's :func:`run` with a terminal progress display.

Example (skipped: a whole simulation takes minutes; tests/simulate runs it):
    >>> from branchkey_integrations.simulate import run
    >>> report = run(framework="lightning", leaves=3, rounds=2, epochs_per_round=1)  # doctest: +SKIP
    >>> print(report.table())  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .simulation.config import SimulationConfig
from .simulation.frameworks import check_installed
from .core.errors import EmbeddedServerError, LeafFailedError, SimulationError, SimulationTerminated
from .simulation.orchestrator import Simulation
from .simulation.ray_backend import check_ray_installed
from .simulation.progress import ProgressHook, RoundProgress, Stage, TerminalProgress
from .simulation.report import Report, RoundRow, plot_rounds
from .simulation.supervisor import sigterm_raises
from .server.strategies import check_strategy

logger = logging.getLogger(__name__)


def run(config: SimulationConfig | None = None, *, output: str | Path | None = None,
        progress: ProgressHook | None = None, hold: Callable[[Report], None] | None = None,
        **options: Any) -> Report:
    """Run one simulation to the end and return its :class:`Report`.

    Pass a :class:`SimulationConfig`, or its fields as keywords (``run(leaves=5, partition="dirichlet")``).
    ``output`` gets ``report.json`` and ``accuracy.png``; ``progress`` receives
    :class:`~branchkey_integrations.simulation.progress.RoundProgress` and ``Stage`` events (for example
    :class:`~branchkey_integrations.simulation.progress.TerminalProgress`). ``hold``, if given, is called
    with the finished report (saved already) while the embedded server still runs, so its dashboard
    stays open until ``hold`` returns.

    Raises:
        ValueError: a setting is out of range, or the server has no such strategy or strategy parameter
            (checked by the server's own catalogue before any process starts).
        LeafFailedError: a leaf process died (its log's last lines are in the message).
        SimulationError: the server failed, the run timed out, or SIGTERM arrived. Every process the
            simulation started is stopped before any of these propagate (KeyboardInterrupt included).
    """
    config = dataclasses.replace(config, **options) if config else SimulationConfig(**options)
    check_installed(config.framework)  # a missing framework fails here, not in N leaf logs
    if config.backend == "ray":
        check_ray_installed()
    check_strategy(config.strategy, config.strategy_params)  # and a strategy typo here, not in the server's log
    emit = progress or _log_event
    started = time.monotonic()

    def finish(report: Report) -> Report:
        report.elapsed_s = time.monotonic() - started
        if output is not None:
            report.save(output)
        return report
    workdir = Path(tempfile.mkdtemp(prefix="branchkey-simulate-"))
    try:
        with sigterm_raises():
            report = Simulation(config, workdir, emit, None if hold is None else lambda r: hold(finish(r))).run()
    except ValueError:  # a setting (PartitionError too), not a process: the logs say nothing
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    except (SimulationError, KeyboardInterrupt) as exc:
        logger.error("Simulation %s; its logs are kept in %s",
                     "failed" if isinstance(exc, SimulationError) else "interrupted", workdir)
        raise
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)  # a bug, not a process: the logs say nothing
        raise
    shutil.rmtree(workdir, ignore_errors=True)
    return report if hold is not None else finish(report)


def _log_event(event: Stage | RoundProgress) -> None:
    if isinstance(event, Stage):
        logger.info("%s", event.text)
    elif event.complete:
        logger.info("Round %d/%d: global accuracy %.3f (waited %.1f s)", event.round, event.rounds,
                    event.global_accuracy, event.wait_s)


__all__ = ["run", "SimulationConfig", "Report", "RoundRow", "plot_rounds", "TerminalProgress", "SimulationError",
           "LeafFailedError", "EmbeddedServerError", "SimulationTerminated"]
