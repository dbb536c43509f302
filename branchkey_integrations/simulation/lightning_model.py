"""The simulation's Lightning side: a small MLP as a LightningModule, trained with ``Trainer`` and,
for a federated leaf, one round at a time (:func:`train_turn`: from the aggregate, for ``epochs_per_round`` epochs);
:func:`train` trains the local-only and centralized baselines in one ``fit``."""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..core.scaffold import ScaffoldLeaf
from .data import NUM_CLASSES, NUM_FEATURES, Split
from .frameworks import RoundHook, TrainPlan

logger = logging.getLogger(__name__)


class DigitsMLP(LightningModule):
    """64 -> hidden -> 10 with ReLU; Adam with the learning rate annealed to zero over ``epochs``
    (a decaying rate is what lets FedAvg's leaves stop drifting apart on skewed data). A turn of a federated
    leaf trains epochs ``first_epoch`` onwards of that schedule; ``proximal_mu`` > 0 adds FedProx's
    ``mu/2 * ||w - w_g||^2`` with ``w_g`` the weights the turn started from."""

    def __init__(self, hidden: int = 256, learning_rate: float = 1e-2, epochs: int = 10, first_epoch: int = 0,
                 proximal_mu: float = 0.0) -> None:
        super().__init__()
        self.learning_rate, self.epochs, self.first_epoch = learning_rate, epochs, first_epoch
        self.proximal_mu = proximal_mu
        self.net = nn.Sequential(nn.Linear(NUM_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES))
        self.anchor: list[torch.Tensor] = []
        self.optimizer_state: dict[str, Any] | None = None  # Adam's, from this leaf's previous turn

    def pin_anchor(self) -> None:
        """FedProx's ``w_g``: the weights as they stand now (after the aggregate was loaded)."""
        self.anchor = [p.detach().clone() for p in self.parameters()] if self.proximal_mu else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        if self.anchor:
            loss = loss + self.proximal_mu / 2 * sum(((p - g) ** 2).sum() for p, g in zip(self.parameters(), self.anchor))
        return loss

    def configure_optimizers(self) -> dict[str, object]:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.learning_rate)
        if self.optimizer_state is not None:  # before the schedule, which keeps the saved initial_lr
            optimizer.load_state_dict(self.optimizer_state)
        first, total = self.first_epoch, self.epochs  # cosine annealing to 0 over the whole budget, per epoch
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda epoch: 0.5 * (1 + math.cos(math.pi * (first + epoch) / total)))
        return {"optimizer": optimizer, "lr_scheduler": schedule}


def accuracy(model: nn.Module, split: Split) -> float:
    with torch.no_grad():
        predicted = model(torch.from_numpy(split.x)).argmax(dim=1).numpy()
    return float((predicted == split.y).mean())


def load_layers(model: nn.Module, layers: Sequence[np.ndarray]) -> None:
    """Copy an aggregate (the parameters in ``model.parameters()`` order) into ``model``."""
    parameters = list(model.parameters())
    if len(parameters) != len(layers):
        raise ValueError(f"Expected {len(parameters)} layers for the model. Received: {len(layers)}")
    with torch.no_grad():
        for parameter, layer in zip(parameters, layers):
            parameter.copy_(torch.from_numpy(np.asarray(layer, dtype=np.float32)).reshape(parameter.shape))


def score(layers: Sequence[np.ndarray], test: Split, plan: TrainPlan) -> float:
    """The accuracy of an aggregate on ``test``."""
    torch.set_num_threads(1)
    model = DigitsMLP(plan.hidden, plan.learning_rate)
    load_layers(model, layers)
    model.eval()
    return accuracy(model, test)


def features(layers: Sequence[np.ndarray], split: Split, plan: TrainPlan) -> np.ndarray:
    """The inputs of the final ``Linear`` for ``split`` under the model ``layers``: what calibration summarises."""
    torch.set_num_threads(1)
    model = DigitsMLP(plan.hidden, plan.learning_rate)
    load_layers(model, layers)
    with torch.no_grad():
        return model.net[:-1](torch.from_numpy(split.x)).numpy()


def head(layers: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The final layer's weight [classes, width] and bias (``nn.Linear``'s layout)."""
    return np.asarray(layers[-2]), np.asarray(layers[-1])


def with_head(layers: Sequence[np.ndarray], weight: np.ndarray, bias: np.ndarray) -> list[np.ndarray]:
    """``layers`` with the final layer replaced (cast to the layers' dtype)."""
    return [*layers[:-2], weight.astype(layers[-2].dtype), bias.astype(layers[-1].dtype)]


def train_turn(data: Split, plan: TrainPlan, number: int, start: Sequence[np.ndarray] | None,
               proximal_mu: float = 0.0, state: Any = None, accelerator: str = "cpu",
               scaffold: ScaffoldLeaf | None = None) -> tuple[list[np.ndarray], Any]:
    """Round ``number`` of a federated leaf: from ``start`` (None: the seeded initial model), train
    ``epochs_per_round`` epochs (the budget's cosine schedule from this round's first epoch; Adam goes on from
    ``state``, this leaf's previous turn's, as it does under the callback); return the trained parameters
    and Adam's state. ``accelerator="gpu"``: the GPU Ray gave the task. ``scaffold``: SCAFFOLD's leaf state,
    whose correction every step gets (decoupled, as the callbacks' default) and which counts the steps' rates."""
    torch.set_num_threads(1)
    torch.manual_seed(plan.seed)
    model = DigitsMLP(plan.hidden, plan.learning_rate, plan.rounds * plan.epochs_per_round,
                      first_epoch=(number - 1) * plan.epochs_per_round, proximal_mu=proximal_mu)
    if start is not None:
        load_layers(model, start)
    model.pin_anchor()
    model.optimizer_state = state
    batches = torch.Generator().manual_seed(plan.data_seed)
    loader = DataLoader(TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y)),
                        batch_size=plan.batch_size, shuffle=True, generator=batches)
    trainer = Trainer(max_epochs=plan.epochs_per_round, accelerator=accelerator, devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, callbacks=[_ScaffoldSteps(scaffold)] if scaffold is not None else None)
    trainer.fit(model, loader)
    return [p.detach().cpu().numpy().copy() for p in model.parameters()], trainer.optimizers[0].state_dict()


class _ScaffoldSteps(Callback):
    """SCAFFOLD in a turn: after each optimizer step ``w -= lr * (c - c_i)``, and the step's rate counted."""

    def __init__(self, leaf: ScaffoldLeaf) -> None:
        self.leaf = leaf

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.leaf.x is None:  # the first round: the seeded initial model
            self.leaf.start([p.detach().cpu().numpy() for p in pl_module.parameters()])

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        parameters = list(pl_module.parameters())
        self.leaf.step([lr] * len(parameters))
        correction = self.leaf.correction()
        if correction is not None:
            with torch.no_grad():
                for parameter, delta in zip(parameters, correction):
                    if delta is not None:
                        parameter -= lr * torch.from_numpy(delta).to(parameter.dtype).reshape(parameter.shape)


class _EvaluateEachRound(Callback):
    """Scores the model after every round's worth of epochs (the baselines' curve)."""

    def __init__(self, test: Split, epochs_per_round: int, on_round: RoundHook) -> None:
        self.test, self.epochs_per_round, self.on_round = test, epochs_per_round, on_round

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.epochs_per_round == 0:
            pl_module.eval()
            self.on_round(epoch // self.epochs_per_round, accuracy(pl_module, self.test))
            pl_module.train()


def train(data: Split, test: Split, plan: TrainPlan, on_round: RoundHook) -> None:
    """Train alone for ``plan.rounds * plan.epochs_per_round`` epochs, scoring after every round's worth."""
    torch.set_num_threads(1)  # leaves share a few cores: one thread each avoids oversubscription
    torch.manual_seed(plan.seed)
    epochs = plan.rounds * plan.epochs_per_round
    model = DigitsMLP(plan.hidden, plan.learning_rate, epochs)
    batches = torch.Generator().manual_seed(plan.data_seed)
    loader = DataLoader(TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y)),
                        batch_size=plan.batch_size, shuffle=True, generator=batches)
    trainer = Trainer(max_epochs=epochs, callbacks=[_EvaluateEachRound(test, plan.epochs_per_round, on_round)],
                      accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, loader)
