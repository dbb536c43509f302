"""Tiny Keras models, data and recording callbacks shared by the Keras tests and the leaf script.

Backend-agnostic: the leaf script sets ``KERAS_BACKEND`` before this module imports keras.
"""

from __future__ import annotations

import keras
import numpy as np

NAME = "tiny"  # a fixed model name: variable paths ("tiny/stem/kernel") then agree across processes


def tiny_model(hidden: int = 3, batchnorm: bool = False, dropout: bool = False, frozen: bool = False,
               dtype: str | None = None, seed: int = 0) -> keras.Model:
    """Dense layers (optionally BatchNorm, Dropout, a frozen stem), SGD with momentum (optimizer slots to reset)."""
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((4,)), keras.layers.Dense(hidden, name="stem", dtype=dtype)]
    if batchnorm:
        layers.append(keras.layers.BatchNormalization(name="norm"))
    if dropout:
        layers.append(keras.layers.Dropout(0.5, name="drop"))
    layers.append(keras.layers.Dense(2, name="head", dtype=dtype))
    model = keras.Sequential(layers, name=NAME)
    if frozen:
        model.get_layer("stem").trainable = False
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse", jit_compile=False)
    return model


def data(samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(samples, 4)).astype("float32"), rng.normal(size=(samples, 2)).astype("float32")


def snapshot(model: keras.Model) -> dict[str, np.ndarray]:
    """Every weight (trainable or not) as an exact float32 copy (bf16 values are exact in float32)."""
    state = {}
    for variable in model.weights:
        array = np.array(keras.ops.convert_to_numpy(variable), copy=True)
        state[variable.path] = array.astype(np.float32) if array.dtype.name == "bfloat16" else array
    return state


def replica_values(model: keras.Model) -> dict[str, np.ndarray]:
    """Under tf.distribute: every replica's copy, as ``<path>@<replica>``; empty when not distributed."""
    copies = {}
    for variable in model.weights:
        values = getattr(variable.value, "values", ())  # tf DistributedVariable: one per replica
        for index, value in enumerate(values if isinstance(values, (tuple, list)) else ()):
            copies[f"{variable.path}@{index}"] = np.array(value.numpy(), copy=True)
    return copies


class Recorder(keras.callbacks.Callback):
    """Placed around the BranchKey callback: records the model as uploaded (before) and as loaded (after)."""

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label
        self.records: list[dict[str, np.ndarray]] = []

    def on_epoch_end(self, epoch, logs=None) -> None:
        self.records.append({**snapshot(self.model), **replica_values(self.model)})

