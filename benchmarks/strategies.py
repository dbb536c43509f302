"""``python -m benchmarks.strategies``: the server strategies, and FedAvg with FedProx, each with and without
classifier calibration, on strongly skewed data (``branchkey-local simulate --partition dirichlet --alpha 0.1
--leaves 10 --rounds 10 --calibrate-head``), on Lightning and Keras, over seeds 0, 1 and 2; ``--summary`` prints
the table of docs/results/strategies.md.

Calibration runs after the last round and changes nothing before it, so one run gives both rows of a setting:
``federated`` (the last aggregate) and ``calibrated`` (its final layer refit from the leaves' class statistics);
the result also holds what calibration cost (``calibration``: bytes a leaf sent, seconds, whether every leaf's
refit layer was identical). The default settings are that table's (fedavg, fedavgm, scaffold, fedprox);
the older strategies (``--settings fedadam ...``) run as before, with calibration too.

Resumable: each (framework, setting, seed) is one JSON file under ``results/strategies/``, and a file that
exists is not run again, so the sweep can be stopped and restarted at will. Runs go seed by seed, the two
frameworks taking turns, so a sweep cut short still has every setting at the first seeds on both.
The local-only and centralized baselines do not depend on the strategy: only the ``fedavg`` run of each
(framework, seed) trains them, the others run with ``baselines=False`` and the summary reuses them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import statistics
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "strategies-calibrated"
FRAMEWORKS = ("lightning", "keras")
SEEDS = (0, 1, 2)
#: the issue's setting: 10 leaves with few classes each, 10 rounds of 5 local epochs
RUN: dict[str, Any] = {"leaves": 10, "rounds": 10, "partition": "dirichlet", "alpha": 0.1}
BASELINE_SETTING = "fedavg"

logger = logging.getLogger("benchmarks.strategies")


@dataclass(frozen=True)
class Setting:
    """One row of the table: a server strategy with its parameters, and the leaves' proximal mu."""

    strategy: str = "fedavg"
    params: dict[str, float] = field(default_factory=dict)
    proximal_mu: float = 0.0

    def options(self) -> dict[str, Any]:
        """The keywords for ``simulate.run``; FedAvg without FedProx passes none (it is the default)."""
        options: dict[str, Any] = {}
        if self.strategy != "fedavg" or self.params:
            options |= {"strategy": self.strategy, "strategy_params": dict(self.params)}
        if self.proximal_mu:
            options["proximal_mu"] = self.proximal_mu
        return options

    def describe(self) -> str:
        from branchkey_integrations.simulation.report import strategy_label

        return strategy_label({"strategy": self.strategy, "strategy_params": self.params,
                               "proximal_mu": self.proximal_mu})


SETTINGS: dict[str, Setting] = {
    "fedavg": Setting(),
    "fedavgm": Setting("fedavgm", {"momentum": 0.5}),  # picked at seed 0 (TUNING): 0.9 scored lower
    # a server step 1.25x the momentum-averaged update: best of a grid over 6 seeds (see docs/results/strategies.md)
    "fedavgm-eta1.25": Setting("fedavgm", {"eta": 1.25, "momentum": 0.5}),
    "fedadam": Setting("fedadam"),
    "fedyogi": Setting("fedyogi"),
    "fedadagrad": Setting("fedadagrad"),
    "median": Setting("median"),
    "trimmed-mean": Setting("trimmed-mean"),
    "fedprox": Setting("fedavg", proximal_mu=0.01),
    "scaffold": Setting("scaffold"),
}
#: the settings of docs/results/strategies.md's table, each run with calibration (its rows with and without come from the same run)
TABLE = ("fedavg", "fedavgm", "scaffold", "fedprox")
#: the few parameter values tried at seed 0 only (``--settings NAME --seeds 0``), to pick the table's
TUNING: dict[str, Setting] = {
    "fedprox-mu0.1": Setting("fedavg", proximal_mu=0.1),
    "fedprox-mu1": Setting("fedavg", proximal_mu=1.0),
    "fedavgm-momentum0.9": Setting("fedavgm", {"momentum": 0.9}),
    "fedadam-eta0.1": Setting("fedadam", {"eta": 0.1}),
}


def result_path(framework: str, name: str, seed: int, results: Path = RESULTS) -> Path:
    return results / f"{framework}__{name}__seed{seed}.json"


def plan(settings: list[str], frameworks: list[str], seeds: list[int]) -> list[tuple[str, str, int]]:
    """(framework, setting, seed) in run order: seed-major, the baseline-carrying fedavg first, frameworks
    alternating, so partial results stay balanced."""
    ordered = sorted(settings, key=lambda name: name != BASELINE_SETTING)
    return [(framework, name, seed) for seed in seeds for name in ordered for framework in frameworks]


def _commit() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_one(framework: str, name: str, seed: int, results: Path = RESULTS) -> Path | None:
    """Run one setting; write its result file, or log why it could not run (and write nothing)."""
    from branchkey_integrations.simulate import (SimulationConfig, SimulationError, SimulationTerminated,
                                                 TerminalProgress, run)

    setting = {**SETTINGS, **TUNING}[name]
    try:
        config = SimulationConfig(framework=framework, seed=seed, baselines=name == BASELINE_SETTING,
                                  calibrate_head=True, **RUN, **setting.options())
    except (TypeError, ValueError) as exc:  # a strategy or option this checkout does not have yet
        logger.warning("skipping %s %s seed %d: %s", framework, name, seed, exc)
        return None
    load_before = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc)
    logger.info("running %s %s (%s) seed %d", framework, name, setting.describe(), seed)
    try:
        report = run(config, progress=TerminalProgress(sys.stdout))
    except SimulationTerminated:
        raise  # stop the sweep, not just this run
    except (SimulationError, ValueError) as exc:  # ValueError: the server has no such strategy (yet)
        logger.error("%s %s seed %d failed: %s", framework, name, seed, exc)
        return None
    final = report.final
    result = {"framework": framework, "setting": name, "seed": seed, "strategy": setting.strategy,
              # as the server applied them: the setting's and the defaults of the rest
              "strategy_params": report.config["strategy_params"], "proximal_mu": setting.proximal_mu, "run": RUN,
              "epochs_per_round": config.epochs_per_round,
              "federated": final.global_accuracy, "federated_by_round": [r.global_accuracy for r in report.rounds],
              "centralized": final.centralized_accuracy, "local_only": final.local_accuracy,
              "calibrated": report.calibration["accuracy"] if report.calibration else None,
              "calibration": report.calibration,
              "elapsed_s": round(report.elapsed_s, 1), "started_at": started.isoformat(timespec="seconds"),
              "load_before": load_before, "load_after": os.getloadavg(), "cpus": os.cpu_count(),
              "commit": _commit()}
    path = result_path(framework, name, seed, results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    logger.info("%s %s seed %d: federated %.1f%% in %.0f s -> %s", framework, name, seed,
                100 * final.global_accuracy, report.elapsed_s, path.name)
    return path


def sweep(settings: list[str], frameworks: list[str], seeds: list[int], results: Path = RESULTS) -> None:
    for framework, name, seed in plan(settings, frameworks, seeds):
        if result_path(framework, name, seed, results).exists():
            continue
        run_one(framework, name, seed, results)


# -- summary ------------------------------------------------------------------------------------


def load_results(results: Path = RESULTS) -> list[dict[str, Any]]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(results.glob("*__*__seed*.json"))]


def _cell(values: list[float], expected: int) -> str:
    """Mean and range in percent, with the count when some seeds are missing."""
    if not values:
        return "not run"
    text = f"{100 * statistics.fmean(values):.1f}"
    if len(values) > 1:
        text += f" ({100 * min(values):.1f}-{100 * max(values):.1f})"
    if len(values) < expected:
        text += f" [{len(values)} of {expected} seeds]"
    return text


def _gaps(by: dict[tuple[str, str], list[dict[str, Any]]], baselines: dict[str, list[dict[str, Any]]],
          name: str, key: str = "federated") -> dict[str, tuple[float, float]]:
    """Points below centralized per framework, paired by seed: (mean, worst seed); empty unless both frameworks
    have a pair."""
    gaps = {}
    for fw in FRAMEWORKS:
        central = {r["seed"]: r["centralized"] for r in baselines[fw]}
        pairs = [central[r["seed"]] - r[key] for r in by.get((fw, name), [])
                 if r["seed"] in central and r.get(key) is not None]
        if not pairs:
            return {}
        gaps[fw] = (100 * statistics.fmean(pairs), 100 * max(pairs))
    return gaps


def _rows(by: dict[tuple[str, str], list[dict[str, Any]]]) -> list[tuple[str, str, str]]:
    """(label, setting, result key) of the table's rows: each setting run, then it with calibration."""
    names = [*TABLE, *(name for name in SETTINGS if name not in TABLE)]
    rows = []
    for name in names:
        runs = [r for fw in FRAMEWORKS for r in by.get((fw, name), [])]
        if not runs and name not in TABLE:
            continue
        rows.append((SETTINGS[name].describe(), name, "federated"))
        if any(r.get("calibrated") is not None for r in runs) or name in TABLE:
            rows.append((SETTINGS[name].describe() + " + calibration", name, "calibrated"))
    return rows


def summary(results: list[dict[str, Any]], seeds: int = len(SEEDS)) -> str:
    """The Markdown table: mean over seeds and (min-max) range, in percent, per framework."""
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for result in results:
        by.setdefault((result["framework"], result["setting"]), []).append(result)
    baselines = {fw: [r for r in by.get((fw, BASELINE_SETTING), []) if r["centralized"] is not None]
                 for fw in FRAMEWORKS}
    header = "| setting | " + " | ".join(f"{fw.capitalize()} accuracy %" for fw in FRAMEWORKS) + " |"
    lines = [header, "|---|" + "---|" * len(FRAMEWORKS)]
    for label, key in (("centralized (all data, one model)", "centralized"), ("local-only (mean over leaves)",
                                                                             "local_only")):
        lines.append(f"| {label} | " + " | ".join(_cell([r[key] for r in baselines[fw]], seeds)
                                                   for fw in FRAMEWORKS) + " |")
    for label, name, key in _rows(by):
        cells = [_cell([r[key] for r in by.get((fw, name), []) if r.get(key) is not None], seeds) for fw in FRAMEWORKS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    tried = [(name, setting) for name, setting in TUNING.items() if any(by.get((fw, name)) for fw in FRAMEWORKS)]
    if tried:
        lines += ["", "Tried at seed 0 only (to pick the parameters above):", "",
                  "| setting | " + " | ".join(f"{fw.capitalize()} accuracy %" for fw in FRAMEWORKS) + " |",
                  "|---|" + "---|" * len(FRAMEWORKS)]
        for name, setting in tried:
            lines.append(f"| {setting.describe()} | " + " | ".join(
                _cell([r["federated"] for r in by.get((fw, name), [])], 1) for fw in FRAMEWORKS) + " |")
    every = [r for rs in by.values() for r in rs]
    if every:
        loads = [r["load_before"][0] for r in every]
        walls = {fw: [r["elapsed_s"] for r in every if r["framework"] == fw] for fw in FRAMEWORKS}
        lines.append("")
        lines.append(f"Mean (min-max) over seeds; {len(every)} runs on {every[0]['cpus']} CPU cores, 1-minute "
                     f"load average at the start of a run {statistics.fmean(loads):.1f} (range "
                     f"{min(loads):.1f}-{max(loads):.1f}); wall time per run "
                     + ", ".join(f"{fw} {statistics.median(w):.0f} s (median)" for fw, w in walls.items() if w)
                     + ".")
    gaps = {label: gap for label, name, key in _rows(by) if (gap := _gaps(by, baselines, name, key))}
    if gaps:
        best = min(gaps, key=lambda label: max(mean for mean, _ in gaps[label].values()))
        lines.append(f"Closest to centralized on both frameworks: {best}, "
                     + ", ".join(f"{fw} {mean:.1f} points below (worst seed {worst:.1f})"
                                 for fw, (mean, worst) in gaps[best].items())
                     + " (centralized minus federated, seed by seed, mean over the seeds run).")
    costs = [r["calibration"] for r in every if r.get("calibration")]
    # a run with baselines queues the refits behind the leaves' local-only training, which it waits for anyway
    shares = [r["calibration"].get("added_seconds", 0.0) / r["elapsed_s"] for r in every
              if r.get("calibration") and r["centralized"] is None]
    if costs:
        lines.append(f"Calibration: {max(c['upload_bytes'] for c in costs) / 1e3:.0f} kB of values sent by a leaf; "
                     f"every leaf's refit layer identical in {sum(c['identical'] for c in costs)} of {len(costs)} "
                     f"runs; calibration round (last aggregate to the last refit) median "
                     f"{statistics.median(c['seconds'] for c in costs):.1f} s, of which added to the run (the "
                     "round and refits after the leaves' last scores, and the slowest leaf's statistics) median "
                     f"{statistics.median(c.get('added_seconds', c['seconds']) for c in costs):.1f} s ("
                     + (f"{100 * statistics.median(shares):.1f}% of the run's wall time, median over the runs "
                        f"without baselines, max {100 * max(shares):.1f}%" if shares else "no run without baselines")
                     + "); the refits' "
                     f"own compute {statistics.median(c['task_seconds'] for c in costs):.1f} s summed over the "
                     "leaves.")
    missing: dict[int, list[str]] = {}
    for fw, name, seed in plan(list(TABLE), list(FRAMEWORKS), list(SEEDS)):
        if not any(r["seed"] == seed for r in by.get((fw, name), [])):
            missing.setdefault(seed, []).append(f"{fw} {name}")
    if missing:
        lines.append("Not run: " + "; ".join(f"seed {seed}: {', '.join(runs)}" for seed, runs in missing.items()) + ".")
    return "\n".join(line if line.startswith("|") else textwrap.fill(line, 110) for line in lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.strategies", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", choices=[*SETTINGS, *TUNING], default=list(TABLE))
    parser.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--summary", action="store_true",
                        help="print the table of the results so far (and write summary.md beside them)")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="where the result files are (default: results/strategies beside this file)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    logging.getLogger("branchkey_integrations").setLevel(logging.WARNING)
    if args.summary:
        table = summary(load_results(args.results))
        (args.results / "summary.md").write_text(table + "\n", encoding="utf-8")
        print(table)
        return 0
    sweep(args.settings, args.frameworks, args.seeds, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
