"""``python -m benchmarks.head_calibration``: where the gap to centralized comes from on strongly skewed data.

On ``branchkey-local simulate --partition dirichlet --alpha 0.1 --leaves 10 --rounds 10`` every server
strategy stays a few points below centralized training (``benchmarks/strategies.py``). This benchmark asks
which part of the federated model is worse: it refits only the classifier (the last ``Linear`` layer) of the
final global model on the pooled training data, the hidden layer left as the federation learned it. If the
refit reaches centralized accuracy, the federation learned features as good as centralized training's, and
the gap is the classifier's calibration under label skew: a leaf that holds two classes drives the logits of
the eight it never sees down every local step, and averaging leaves with different missing classes does not
undo it. No server strategy or proximal term sees data, so none can refit a classifier.

The federation is an in-process replica of the Lightning simulation, so a run takes seconds, not minutes:
the simulation's own test split, Dirichlet partition and ``DigitsMLP`` (same initial model on every leaf),
Adam with the learning rate cosine-annealed per epoch, batches of 32, 5 local epochs per round, each leaf
keeping its optimizer between rounds (as its ``Trainer`` does), the aggregate weighted by sample count and
the server step taken by the server's own optimizer (its strategy object's ``step``). ``--check`` prints the
replica's FedAvg next to the real simulation's results in ``results/strategies/`` (the same seeds), to show the replica is faithful.

``python -m benchmarks.head_calibration [--seeds 0 1 2] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from branchkey_integrations.server.strategies import check_strategy, strategy_for
from branchkey_integrations.simulation.data import Split, load_digits_split, partition
from branchkey_integrations.simulation.lightning_model import DigitsMLP, accuracy

from .common import load_average, save_report
from .strategies import RESULTS as STRATEGY_RESULTS

ROUNDS, EPOCHS_PER_ROUND, LEAVES, ALPHA, BATCH = 10, 5, 10, 0.1, 32
#: (label, server strategy, its parameters): FedAvg and the two FedAvgM rows of the table of docs/results/strategies.md
SETTINGS = (("fedavg", "fedavg", {}), ("fedavgm (momentum=0.5)", "fedavgm", {"momentum": 0.5}),
            ("fedavgm (eta=1.25, momentum=0.5)", "fedavgm", {"eta": 1.25, "momentum": 0.5}))


class _Learner:
    """One model with its own Adam and batch order, trained epoch by epoch on the annealed learning rate."""

    def __init__(self, seed: int, data: Split, batch_seed: int) -> None:
        torch.manual_seed(seed)  # the same initial model everywhere, as the simulation seeds it
        self.model = DigitsMLP(epochs=ROUNDS * EPOCHS_PER_ROUND)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.model.learning_rate)
        self.x, self.y = torch.from_numpy(data.x), torch.from_numpy(data.y)
        self.batches = torch.Generator().manual_seed(batch_seed)

    def train_epoch(self, epoch: int) -> None:
        total = ROUNDS * EPOCHS_PER_ROUND
        for group in self.optimizer.param_groups:  # CosineAnnealingLR stepped per epoch
            group["lr"] = self.model.learning_rate * 0.5 * (1 + math.cos(math.pi * epoch / total))
        order = torch.randperm(len(self.y), generator=self.batches)
        for start in range(0, len(order), BATCH):
            batch = order[start:start + BATCH]
            loss = nn.functional.cross_entropy(self.model(self.x[batch]), self.y[batch])
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()

    def weights(self) -> list[np.ndarray]:
        return [p.detach().numpy().astype(np.float64) for p in self.model.parameters()]

    def load(self, weights: list[np.ndarray]) -> None:
        with torch.no_grad():
            for parameter, value in zip(self.model.parameters(), weights):
                parameter.copy_(torch.from_numpy(value.astype(np.float32)))


def federate(seed: int, train: Split, strategy: str, params: dict[str, float]) -> nn.Module:
    """The final global model of one federated run (every leaf, every round)."""
    parts = partition(train, LEAVES, "dirichlet", alpha=ALPHA, seed=seed)
    leaves = [_Learner(seed, part, index) for index, part in enumerate(parts)]
    shares = np.array([len(part) for part in parts], np.float64) / len(train)
    server_params = check_strategy(strategy, params)
    global_weights = leaves[0].weights()
    momenta: list[np.ndarray | None] = [None] * len(global_weights)
    for round_index in range(ROUNDS):
        for leaf in leaves:
            for epoch in range(round_index * EPOCHS_PER_ROUND, (round_index + 1) * EPOCHS_PER_ROUND):
                leaf.train_epoch(epoch)
        uploads = [leaf.weights() for leaf in leaves]
        mean = [sum(share * upload[i] for share, upload in zip(shares, uploads)) for i in range(len(global_weights))]
        if strategy == "fedavg":
            global_weights = mean
        else:
            optimizer = strategy_for(strategy, server_params)
            steps = [optimizer.step(x, m_new, m, None) for x, m_new, m in zip(global_weights, mean, momenta)]
            global_weights, momenta = [s[0] for s in steps], [s[1] for s in steps]
        for leaf in leaves:
            leaf.load(global_weights)
    return leaves[0].model


def centralized(seed: int, train: Split) -> nn.Module:
    learner = _Learner(seed, train, 0)
    for epoch in range(ROUNDS * EPOCHS_PER_ROUND):
        learner.train_epoch(epoch)
    return learner.model


def refit_classifier(model: DigitsMLP, train: Split, steps: int = 300) -> DigitsMLP:
    """Fit the last layer alone on all training data (full batch, Adam): a convex problem on fixed features."""
    classifier = model.net[-1]
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-2)
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    with torch.no_grad():
        features = model.net[:-1](x)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(classifier(features), y).backward()
        optimizer.step()
    return model


def measure(seeds: list[int]) -> dict[str, Any]:
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        train, test = load_digits_split(seed=seed)
        central = accuracy(centralized(seed, train), test)
        for label, strategy, params in SETTINGS:
            model = federate(seed, train, strategy, params)
            federated = accuracy(model, test)
            refit = accuracy(refit_classifier(model, train), test)
            rows.append({"setting": label, "seed": seed, "federated": federated, "classifier_refit": refit,
                         "centralized": central})
            print(f"seed {seed} {label}: federated {100 * federated:.1f}%, classifier refit {100 * refit:.1f}%, "
                  f"centralized {100 * central:.1f}%", flush=True)
    return {"rows": rows, "seeds": seeds, "load_average": load_average()}


def summary(report: dict[str, Any]) -> str:
    lines = ["| setting | federated % | classifier refit % | centralized % |", "|---|---|---|---|"]
    for label, _, _ in SETTINGS:
        rows = [r for r in report["rows"] if r["setting"] == label]
        lines.append(f"| {label} | " + " | ".join(
            f"{100 * statistics.fmean(r[key] for r in rows):.1f}" for key in ("federated", "classifier_refit",
                                                                             "centralized")) + " |")
    return "\n".join(lines)


def check_against_simulation(report: dict[str, Any], results: Path = STRATEGY_RESULTS) -> str:
    """The replica's FedAvg next to the real Lightning simulation's, seed by seed."""
    lines = []
    for row in (r for r in report["rows"] if r["setting"] == "fedavg"):
        path = results / f"lightning__fedavg__seed{row['seed']}.json"
        real = json.loads(path.read_text(encoding="utf-8"))["federated"] if path.exists() else None
        lines.append(f"seed {row['seed']}: replica {100 * row['federated']:.1f}%, simulation "
                     + (f"{100 * real:.1f}%" if real is not None else "not run"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.head_calibration", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--check", action="store_true", help="compare the replica's FedAvg with the simulation's")
    parser.add_argument("--json", type=Path, help="where to write the report (default: results/head-calibration-<date>.json)")
    args = parser.parse_args(argv)
    report = measure(args.seeds)
    print(summary(report))
    if args.check:
        print(check_against_simulation(report))
    print("saved", save_report(report, args.json, prefix="head-calibration-"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
