"""The simulation's Keras side: the same small MLP as :mod:`.lightning_model` as a Keras 3 model, trained
with ``model.fit`` and, when federated, the real :class:`~branchkey_integrations.keras.BranchKeyKerasCallback`."""

from __future__ import annotations

import logging
import math
import os

# before TensorFlow starts: leaves share a few cores (one thread pool each), and TF's C++ banner is noise
for _name, _value in (("TF_NUM_INTRAOP_THREADS", "1"), ("TF_NUM_INTEROP_THREADS", "1"), ("TF_CPP_MIN_LOG_LEVEL", "2")):
    os.environ.setdefault(_name, _value)

import keras  # noqa: E402

from ..keras import BranchKeyKerasCallback  # noqa: E402
from .data import NUM_CLASSES, NUM_FEATURES, Split  # noqa: E402
from .frameworks import FederationTarget, RoundHook, TrainPlan  # noqa: E402

logger = logging.getLogger(__name__)


def digits_mlp(plan: TrainPlan) -> keras.Model:
    """64 -> hidden -> 10 with ReLU, Adam; the learning rate is annealed per epoch (see :func:`cosine`)."""
    keras.utils.set_random_seed(plan.seed)  # the same initial model on every leaf
    model = keras.Sequential([keras.Input((NUM_FEATURES,)), keras.layers.Dense(plan.hidden, activation="relu"),
                              keras.layers.Dense(NUM_CLASSES)])
    model.compile(optimizer=keras.optimizers.Adam(plan.learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def cosine(plan: TrainPlan) -> keras.callbacks.LearningRateScheduler:
    """Cosine annealing to zero over the whole budget, per epoch: Lightning's ``CosineAnnealingLR``."""
    total = plan.rounds * plan.epochs_per_round
    return keras.callbacks.LearningRateScheduler(
        lambda epoch, lr: plan.learning_rate * 0.5 * (1 + math.cos(math.pi * epoch / total)))


def accuracy(model: keras.Model, split: Split) -> float:
    logits = keras.ops.convert_to_numpy(model(split.x, training=False))
    return float((logits.argmax(axis=1) == split.y).mean())


class _EvaluateEachRound(keras.callbacks.Callback):
    """Placed after BranchKeyKerasCallback, so a federated round is scored on the aggregate it just loaded."""

    def __init__(self, test: Split, epochs_per_round: int, on_round: RoundHook) -> None:
        super().__init__()
        self.test, self.epochs_per_round, self.on_round = test, epochs_per_round, on_round

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        if (epoch + 1) % self.epochs_per_round == 0:
            self.on_round((epoch + 1) // self.epochs_per_round, accuracy(self.model, self.test))


def train(data: Split, test: Split, plan: TrainPlan, on_round: RoundHook,
          federation: FederationTarget | None = None) -> None:
    """Train for ``plan.rounds * plan.epochs_per_round`` epochs; federate every ``epochs_per_round``."""
    model = digits_mlp(plan)
    keras.utils.set_random_seed(plan.data_seed)  # each leaf's own batch order
    callbacks: list[keras.callbacks.Callback] = [cosine(plan)]
    if federation is not None:
        callbacks.append(BranchKeyKerasCallback(federation.credentials, federation.host, num_samples=len(data),
                                                every_n_epochs=plan.epochs_per_round, transport=federation.transport,
                                                timeout=federation.round_timeout_s, log_every_s=10.0,
                                                proximal_mu=federation.proximal_mu,
                                                # each aggregate scored on this leaf's data, sent as test metrics
                                                validation_data=(data.x, data.y)))
    callbacks.append(_EvaluateEachRound(test, plan.epochs_per_round, on_round))
    model.fit(data.x, data.y, batch_size=plan.batch_size, epochs=plan.rounds * plan.epochs_per_round,
              shuffle=True, verbose=0, callbacks=callbacks)
