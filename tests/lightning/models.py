"""Tiny models, data and a recording callback shared by the Lightning tests and the leaf script."""

from __future__ import annotations

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset


class TinyModel(LightningModule):
    """Linear layers (optionally one frozen, optionally BatchNorm), SGD with momentum (optimizer state to reset)."""

    def __init__(self, hidden: int = 3, batchnorm: bool = False, frozen: bool = False, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        self.stem = nn.Linear(4, hidden)
        self.norm = nn.BatchNorm1d(hidden) if batchnorm else nn.Identity()
        self.head = nn.Linear(hidden, 2)
        if frozen:
            self.stem.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.stem(x))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x.to(self.stem.weight.dtype))
        return nn.functional.mse_loss(out.float(), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr, momentum=0.9)


def dataset(samples: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(samples, 4, generator=generator), torch.randn(samples, 2, generator=generator))


def loader(samples: int, seed: int) -> DataLoader:
    return DataLoader(dataset(samples, seed), batch_size=8, shuffle=False)


class Stream(IterableDataset):
    """Data without a length: the callback cannot weight the leaf by it."""

    def __iter__(self):
        return iter(dataset(8, 0))


def trainer(callbacks, max_epochs: int = 1, **kwargs) -> Trainer:
    options = dict(accelerator="cpu", devices=1, enable_progress_bar=False, logger=False, enable_checkpointing=False,
                   enable_model_summary=False, num_sanity_val_steps=0)
    return Trainer(max_epochs=max_epochs, callbacks=callbacks, **{**options, **kwargs})


def snapshot(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """Every parameter and buffer as an exact float32/int copy (bf16 values are exact in float32)."""
    state = {}
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        tensor = tensor.detach()
        state[name] = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).cpu().numpy().copy()
    return state


def last_batch(trainer, batch_idx: int) -> bool:
    """Where the callback federates: the end of the epoch's last training batch."""
    return batch_idx + 1 == trainer.num_training_batches


class Recorder(Callback):
    """Placed around the BranchKeyCallback: records the model as uploaded (before) and as loaded (after)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.records: list[dict[str, np.ndarray]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if last_batch(trainer, batch_idx):
            self.records.append(snapshot(pl_module))


class DiskRecorder(Callback):
    """Like Recorder, but writes ``<label>_rank<r>_<n>.npz`` at once: it works inside spawned DDP processes."""

    def __init__(self, out_dir, label: str) -> None:
        self.out_dir, self.label, self.count = out_dir, label, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not last_batch(trainer, batch_idx):
            return
        self.count += 1
        self.out_dir.mkdir(parents=True, exist_ok=True)
        connected = [getattr(c, "federation").connected for c in trainer.callbacks if hasattr(c, "federation")]
        np.savez(self.out_dir / f"{self.label}_rank{trainer.global_rank}_{self.count}.npz",
                 __connected__=np.array(connected), **snapshot(pl_module))

