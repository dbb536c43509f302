"""The simulation's Keras side: the same small MLP as :mod:`.lightning_model` as a Keras 3 model, trained
with ``model.fit``: a federated leaf one round at a time (:func:`train_turn`), the baselines in one ``fit``
(:func:`train`)."""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Sequence

# before TensorFlow starts: leaves share a few cores (one thread pool each), and TF's C++ banner is noise
for _name, _value in (("TF_NUM_INTRAOP_THREADS", "1"), ("TF_NUM_INTEROP_THREADS", "1"), ("TF_CPP_MIN_LOG_LEVEL", "2")):
    os.environ.setdefault(_name, _value)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from ..core.scaffold import ScaffoldLeaf  # noqa: E402
from .data import NUM_CLASSES, NUM_FEATURES, Split  # noqa: E402
from .frameworks import RoundHook, TrainPlan  # noqa: E402

logger = logging.getLogger(__name__)


class _ProximalSequential(keras.Sequential):
    """A Sequential whose loss adds FedProx's ``mu/2 * ||w - w_g||^2`` once :meth:`pin_anchor` set ``w_g``."""

    proximal_mu = 0.0
    anchor: list[Any] = []

    def pin_anchor(self, mu: float) -> None:
        self.proximal_mu = mu
        self.anchor = [keras.ops.convert_to_tensor(keras.ops.convert_to_numpy(w)) for w in self.trainable_weights] \
            if mu else []

    def compute_loss(self, *args: Any, **kwargs: Any) -> Any:
        loss = super().compute_loss(*args, **kwargs)
        if self.anchor:
            loss = loss + self.proximal_mu / 2 * sum(keras.ops.sum(keras.ops.square(w - g))
                                                     for w, g in zip(self.trainable_weights, self.anchor))
        return loss


def digits_mlp(plan: TrainPlan) -> keras.Model:
    """64 -> hidden -> 10 with ReLU, Adam; the learning rate is annealed per epoch (see :func:`cosine`)."""
    keras.utils.set_random_seed(plan.seed)  # the same initial model on every leaf
    model = _ProximalSequential([keras.Input((NUM_FEATURES,)),
                                 keras.layers.Dense(plan.hidden, activation="relu"), keras.layers.Dense(NUM_CLASSES)],
                                name="digits_mlp")  # a class name with "_" is no valid scope name
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
    """Scores the model after every round's worth of epochs (the baselines' curve)."""

    def __init__(self, test: Split, epochs_per_round: int, on_round: RoundHook) -> None:
        super().__init__()
        self.test, self.epochs_per_round, self.on_round = test, epochs_per_round, on_round

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        if (epoch + 1) % self.epochs_per_round == 0:
            self.on_round((epoch + 1) // self.epochs_per_round, accuracy(self.model, self.test))


def score(layers: Sequence[np.ndarray], test: Split, plan: TrainPlan) -> float:
    """The accuracy of an aggregate on ``test``."""
    model = digits_mlp(plan)
    model.set_weights([np.asarray(layer) for layer in layers])
    return accuracy(model, test)


def features(layers: Sequence[np.ndarray], split: Split, plan: TrainPlan) -> np.ndarray:
    """The inputs of the final ``Dense`` for ``split`` under the model ``layers``: what calibration summarises."""
    model = digits_mlp(plan)
    model.set_weights([np.asarray(layer) for layer in layers])
    x = keras.ops.convert_to_tensor(split.x)
    for layer in model.layers[:-1]:
        x = layer(x)
    return np.asarray(keras.ops.convert_to_numpy(x))


def head(layers: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The final layer's weight [classes, width] (the ``Dense`` kernel, transposed) and bias."""
    return np.asarray(layers[-2]).T, np.asarray(layers[-1])


def with_head(layers: Sequence[np.ndarray], weight: np.ndarray, bias: np.ndarray) -> list[np.ndarray]:
    """``layers`` with the final layer replaced (``weight`` [classes, width] becomes the kernel's transpose)."""
    return [*layers[:-2], np.ascontiguousarray(weight.T).astype(layers[-2].dtype), bias.astype(layers[-1].dtype)]


def train_turn(data: Split, plan: TrainPlan, number: int, start: Sequence[np.ndarray] | None,
               proximal_mu: float = 0.0, state: Any = None, accelerator: str = "cpu",
               scaffold: ScaffoldLeaf | None = None) -> tuple[list[np.ndarray], Any]:
    """Round ``number`` of a federated leaf: from ``start`` (None: the seeded initial model), train
    ``epochs_per_round`` epochs (the budget's cosine schedule from this round's first epoch; Adam goes on from
    ``state``, this leaf's previous turn's); return the trained weights and Adam's state. ``accelerator`` is
    Keras' own choice (a GPU it sees), so the argument is only the interface's. ``scaffold``: SCAFFOLD's leaf
    state, whose correction every step gets (decoupled, as the callbacks' default)."""
    model = digits_mlp(plan)
    if start is not None:
        model.set_weights([np.asarray(layer) for layer in start])
    if state is not None:
        model.optimizer.build(model.trainable_variables)
        for variable, value in zip(model.optimizer.variables, state):
            variable.assign(value)
    model.pin_anchor(proximal_mu)
    keras.utils.set_random_seed(plan.data_seed)  # this leaf's and round's own batch order
    first = (number - 1) * plan.epochs_per_round
    model.fit(data.x, data.y, batch_size=plan.batch_size, initial_epoch=first, epochs=first + plan.epochs_per_round,
              shuffle=True, verbose=0,
              callbacks=[cosine(plan)] + ([_ScaffoldSteps(scaffold)] if scaffold is not None else []))
    return [np.asarray(w) for w in model.get_weights()], \
        [keras.ops.convert_to_numpy(v) for v in model.optimizer.variables]


class _ScaffoldSteps(keras.callbacks.Callback):
    """SCAFFOLD in a turn: each step's rate counted as the batch begins, and ``w -= lr * (c - c_i)`` applied
    before the next batch and at the end (batch-end hooks may run beside training on some backends)."""

    def __init__(self, leaf: ScaffoldLeaf) -> None:
        super().__init__()
        self.leaf, self.pending_lr = leaf, 0.0

    def on_train_begin(self, logs: dict[str, float] | None = None) -> None:
        if self.leaf.x is None:  # the first round: the seeded initial model
            self.leaf.start(self.model.get_weights())

    def _correct(self) -> None:
        correction = self.leaf.correction() if self.pending_lr else None
        if correction is not None:
            for variable, delta in zip(self.model.trainable_variables, correction):
                if delta is not None:
                    stepped = keras.ops.convert_to_numpy(variable) - self.pending_lr * delta
                    variable.assign(stepped.astype(variable.dtype))
        self.pending_lr = 0.0

    def on_train_batch_begin(self, batch: int, logs: dict[str, float] | None = None) -> None:
        self._correct()
        self.pending_lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.leaf.step([self.pending_lr] * len(self.model.trainable_variables))

    def on_train_end(self, logs: dict[str, float] | None = None) -> None:
        self._correct()


def train(data: Split, test: Split, plan: TrainPlan, on_round: RoundHook) -> None:
    """Train alone for ``plan.rounds * plan.epochs_per_round`` epochs, scoring after every round's worth."""
    model = digits_mlp(plan)
    keras.utils.set_random_seed(plan.data_seed)  # each leaf's own batch order
    model.fit(data.x, data.y, batch_size=plan.batch_size, epochs=plan.rounds * plan.epochs_per_round,
              shuffle=True, verbose=0, callbacks=[cosine(plan), _EvaluateEachRound(test, plan.epochs_per_round, on_round)])
