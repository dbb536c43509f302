"""What a simulation found: accuracy per round for the federated model, local-only training and the
centralized baseline, as a dataclass, a text table, ``report.json`` and a PNG plot."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

logger = logging.getLogger(__name__)

REPORT_FILE = "report.json"
PLOT_FILE = "accuracy.png"


@dataclass(frozen=True)
class RoundRow:
    """One round. Accuracies are fractions on the common test set; local-only is the mean over leaves.
    The baselines are ``None`` when the run skipped them (``baselines=False``)."""

    round: int
    global_accuracy: float
    local_accuracy: float | None
    centralized_accuracy: float | None
    wait_s: float  # first upload of the round to its aggregate: how long the fastest leaf waited
    leaves: list[str] = field(default_factory=list)  # the leaves that trained and uploaded this round


@dataclass(frozen=True)
class LeafSummary:
    name: str
    samples: int
    label_counts: list[int]
    local_accuracy: float | None  # local-only, after the whole budget (None without baselines)
    rounds: int = 0  # the rounds it trained (fewer than all when leaves were sampled)
    nodes: list[str] = field(default_factory=list)  # where its turns ran (a Ray node id; the host name otherwise)


@dataclass
class Report:
    """The result of :func:`branchkey_integrations.simulate.run`.

    Example:
        >>> report = Report(config={"rounds": 1}, rounds=[RoundRow(1, 0.9, 0.6, 0.95, 0.1)], leaves=[])
        >>> report.final.global_accuracy
        0.9
    """

    config: dict[str, Any]
    rounds: list[RoundRow]
    leaves: list[LeafSummary]
    elapsed_s: float = 0.0
    files: dict[str, str] = field(default_factory=dict)
    #: with ``calibrate_head``: ``accuracy`` (the calibrated model, common test set), ``identical`` (every leaf's
    #: refit layer has the evaluator's digest), ``refit`` and ``untouched`` classes, ``upload_bytes`` (values a
    #: leaf sent), ``seconds`` (last aggregate to the last refit), ``class_accuracy_before`` and ``class_accuracy``
    #: (per class on the common test set, the last aggregate and the calibrated model); else None
    calibration: dict[str, Any] | None = None

    @property
    def final(self) -> RoundRow:
        return self.rounds[-1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Report":
        return cls(config=raw["config"], rounds=[RoundRow(**r) for r in raw["rounds"]],
                   leaves=[LeafSummary(**leaf) for leaf in raw["leaves"]], elapsed_s=raw.get("elapsed_s", 0.0),
                   files=raw.get("files", {}), calibration=raw.get("calibration"))

    def table(self) -> str:
        """The per-round comparison as fixed-width text (percent)."""
        lines = [f"{'round':>5}  {'federated':>9}  {'local-only':>10}  {'centralized':>11}  {'wait s':>6}"]
        for row in self.rounds:
            lines.append(f"{row.round:>5}  {row.global_accuracy:>9.1%}  {percent(row.local_accuracy):>10}  "
                         f"{percent(row.centralized_accuracy):>11}  {row.wait_s:>6.2f}")
        if self.calibration is not None:
            lines.append(f"calibrated final layer: {percent(self.calibration['accuracy'])} (every leaf's layer "
                         f"{'identical' if self.calibration['identical'] else 'NOT identical'}; classes left as they "
                         f"were: {self.calibration['untouched'] or 'none'})")
        return "\n".join(lines)

    def save(self, output: str | Path) -> dict[str, str]:
        """Write ``report.json`` and ``accuracy.png`` into ``output``; returns their paths."""
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        self.files = {"report": str(out / REPORT_FILE), "plot": str(out / PLOT_FILE)}
        plot_rounds(self, out / PLOT_FILE)
        (out / REPORT_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        logger.info("Wrote %s and %s", self.files["report"], self.files["plot"])
        return self.files


def strategy_label(config: Mapping[str, Any]) -> str:
    """How a run aggregated, from its settings: ``fedadam (eta=0.01, tau=0.001) + FedProx mu=0.01``.

    Example:
        >>> strategy_label({"strategy": "fedavg", "proximal_mu": 0.0})
        'fedavg'
    """
    params = config.get("strategy_params") or {}
    label = str(config.get("strategy", "fedavg"))
    if params:
        label += " (" + ", ".join(f"{key}={value:g}" for key, value in params.items()) + ")"
    if config.get("proximal_mu"):
        label += f" + FedProx mu={config['proximal_mu']:g}"
    if config.get("quantize"):
        label += f" + {config['quantize']} uploads" + (" (error feedback)" if config.get("error_feedback", True) else "")
    return label


def _short_label(config: Mapping[str, Any]) -> str:
    """The legend's name for the federated line (the title holds the parameters)."""
    return str(config.get("strategy", "fedavg")) + (" + FedProx" if config.get("proximal_mu") else "")


def percent(fraction: float | None) -> str:
    """``0.947`` as ``94.7%``; a baseline the run skipped as ``-``."""
    return "-" if fraction is None else f"{fraction:.1%}"


def plot_rounds(report: Report, path: str | Path | None = None, ax: Any = None) -> Any:
    """Accuracy per round, one line per way of training; saved to ``path`` when given.

    Without ``ax`` it draws on a bare ``Figure`` (Agg canvas, no pyplot): no display needed, and the
    caller's pyplot backend and state are left alone. Pass ``ax`` to draw into a notebook's figure.
    """
    from matplotlib.ticker import MaxNLocator

    if ax is None:
        from matplotlib.figure import Figure

        ax = Figure(figsize=(6, 4)).subplots()
    rounds = [row.round for row in report.rounds]
    config = report.config
    for key, label, style in (("centralized_accuracy", "centralized (all data)", "k--"),
                              ("global_accuracy", f"federated ({_short_label(config)})", "o-"),
                              ("local_accuracy", "local-only (mean over leaves)", "s:")):
        if getattr(report.final, key) is not None:  # a baseline the run skipped has no line
            ax.plot(rounds, [100 * getattr(row, key) for row in report.rounds], style, label=label)
    ax.set(xlabel="round", ylabel="test accuracy (%)")
    ax.set_title(f"{config.get('framework', '')}: {config.get('leaves')} leaves, {config.get('partition')}"
                 + (f" (alpha={config.get('alpha')})" if config.get("partition") == "dirichlet" else "")
                 + f"\n{strategy_label(config)}", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    # below the axes, not on them: inside, "best" still covered a curve when all three spread over the height
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize="small", frameon=False)
    if path is not None:
        ax.figure.tight_layout()
        ax.figure.savefig(path, dpi=100)
    return ax

