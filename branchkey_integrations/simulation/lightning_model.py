"""The simulation's Lightning side: a small MLP as a LightningModule, trained with ``Trainer`` and,
when federated, the real :class:`~branchkey_integrations.lightning.BranchKeyCallback`."""

from __future__ import annotations

import logging

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..lightning import BranchKeyCallback
from .data import NUM_CLASSES, NUM_FEATURES, Split
from .frameworks import FederationTarget, RoundHook, TrainPlan

logger = logging.getLogger(__name__)


class DigitsMLP(LightningModule):
    """64 -> hidden -> 10 with ReLU; Adam with the learning rate annealed to zero over ``epochs``
    (a decaying rate is what lets FedAvg's leaves stop drifting apart on skewed data)."""

    def __init__(self, hidden: int = 256, learning_rate: float = 1e-2, epochs: int = 10) -> None:
        super().__init__()
        self.learning_rate, self.epochs = learning_rate, epochs
        self.net = nn.Sequential(nn.Linear(NUM_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """The aggregate on this leaf's own data: the callback sends these as the round's ``test`` metrics."""
        x, y = batch
        logits = self(x)
        self.log("loss", nn.functional.cross_entropy(logits, y), on_epoch=True, batch_size=len(y))
        self.log("accuracy", (logits.argmax(dim=1) == y).float().mean(), on_epoch=True, batch_size=len(y))

    def configure_optimizers(self) -> dict[str, object]:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.learning_rate)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.epochs)
        return {"optimizer": optimizer, "lr_scheduler": schedule}


def accuracy(model: nn.Module, split: Split) -> float:
    with torch.no_grad():
        predicted = model(torch.from_numpy(split.x)).argmax(dim=1).numpy()
    return float((predicted == split.y).mean())


class _EvaluateEachRound(Callback):
    """Placed after BranchKeyCallback, so a federated round is scored on the aggregate it just loaded."""

    def __init__(self, test: Split, epochs_per_round: int, on_round: RoundHook) -> None:
        self.test, self.epochs_per_round, self.on_round = test, epochs_per_round, on_round

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.epochs_per_round == 0:
            pl_module.eval()
            self.on_round(epoch // self.epochs_per_round, accuracy(pl_module, self.test))
            pl_module.train()


def train(data: Split, test: Split, plan: TrainPlan, on_round: RoundHook,
          federation: FederationTarget | None = None) -> None:
    """Train for ``plan.rounds * plan.epochs_per_round`` epochs; federate every ``epochs_per_round``."""
    torch.set_num_threads(1)  # leaves share a few cores: one thread each avoids oversubscription
    torch.manual_seed(plan.seed)
    epochs = plan.rounds * plan.epochs_per_round
    model = DigitsMLP(plan.hidden, plan.learning_rate, epochs)
    batches = torch.Generator().manual_seed(plan.data_seed)
    loader = DataLoader(TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y)),
                        batch_size=plan.batch_size, shuffle=True, generator=batches)
    callbacks: list[Callback] = []
    if federation is not None:
        callbacks.append(BranchKeyCallback(federation.credentials, host=federation.host,
                                           every_n_epochs=plan.epochs_per_round, transport=federation.transport,
                                           timeout=federation.round_timeout_s, log_every_s=10.0,
                                           proximal_mu=federation.proximal_mu))
    callbacks.append(_EvaluateEachRound(test, plan.epochs_per_round, on_round))
    trainer = Trainer(max_epochs=epochs, callbacks=callbacks, accelerator="cpu",
                      devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0)
    # a federated leaf scores each aggregate on its own data (the dashboard plots it per leaf and weighted)
    validation = DataLoader(TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y)), batch_size=256) \
        if federation is not None else None
    trainer.fit(model, loader, validation)
