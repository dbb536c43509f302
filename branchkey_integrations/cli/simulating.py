"""``branchkey-local simulate``: an embedded server and N leaves (processes or Ray tasks) (:mod:`branchkey_integrations.simulate`),
its progress on the terminal and its report."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from .failures import CliError, missing_dependency


def cmd_simulate(args: argparse.Namespace) -> int:
    try:
        from ..simulate import SimulationConfig, TerminalProgress, SimulationTerminated, run
    except ModuleNotFoundError as exc:
        raise missing_dependency("simulate", exc) from None

    if args.log_level == "INFO":  # the progress display says what these would
        logging.getLogger("branchkey_integrations.simulation").setLevel(logging.WARNING)
    try:
        config = SimulationConfig(framework=args.framework, leaves=args.leaves, rounds=args.rounds,
                                  epochs_per_round=args.epochs_per_round, partition=args.partition,
                                  alpha=args.alpha, seed=args.seed, amqp_url=args.amqp_url, dashboard=args.dashboard,
                                  baselines=args.baselines, strategy=args.strategy,
                                  strategy_params=dict(args.strategy_param), proximal_mu=args.proximal_mu,
                                  quantize=args.quantize, error_feedback=args.error_feedback,
                                  leaves_per_round=args.leaves_per_round, backend=args.backend,
                                  ray_address=args.ray_address, leaf_cpus=args.leaf_cpus, leaf_gpus=args.leaf_gpus,
                                  max_concurrent_leaves=args.max_concurrent_leaves,
                                  advertise_host=args.advertise_host, calibrate_head=args.calibrate_head,
                                  min_class_count=args.min_class_count)
        report = run(config, output=args.output, progress=TerminalProgress(),
                     hold=_hold_dashboard if args.dashboard else None)
    except ModuleNotFoundError as exc:
        raise missing_dependency("simulate", exc) from None
    except (ValueError, ImportError) as exc:
        raise CliError(str(exc)) from exc
    except KeyboardInterrupt:
        print("branchkey-local simulate: interrupted; the server and every leaf were stopped", file=sys.stderr)
        return 130
    except SimulationTerminated as exc:
        print(f"branchkey-local simulate: {exc}; the server and every leaf were stopped", file=sys.stderr)
        return 143
    if not args.dashboard:  # with it, _hold_dashboard printed the report already
        print_report(report)
    return 0


def _hold_dashboard(report: Any) -> None:
    """Print the report, then keep the embedded server (and its dashboard) up until Ctrl-C or SIGTERM."""
    import threading

    from ..simulate import SimulationTerminated

    print_report(report)
    print("the dashboard stays open; press Ctrl-C to stop the server", flush=True)
    try:
        threading.Event().wait()
    except (KeyboardInterrupt, SimulationTerminated):
        print("\nstopping the server", flush=True)


def print_report(report: Any) -> None:
    from ..simulation.report import percent, strategy_label

    config, final = report.config, report.final
    print(f"\n{report.table()}\n")
    print(f"strategy {strategy_label(config)}")
    print(f"after {config['rounds']} rounds: federated {final.global_accuracy:.1%}, local-only (mean) "
          f"{percent(final.local_accuracy)}, centralized {percent(final.centralized_accuracy)}; "
          f"took {report.elapsed_s:.0f} s")
    print(f"report  {report.files['report']}\nplot    {report.files['plot']}", flush=True)
