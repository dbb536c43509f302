"""The Keras side of classifier calibration (:mod:`~branchkey_integrations.core.head_calibration`): which
``Dense`` layer is the final linear layer (:func:`dense_head`), the features entering it (:func:`dense_inputs`),
and its kernel and bias as calibration's ``weight`` [classes, width] and ``bias`` and back (:func:`head_arrays`,
:func:`load_head`). Apart from ``keras.py`` to keep that module to the callback.

Example:
    >>> import keras, numpy as np
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="relu"),
    ...                           keras.layers.Dense(2, name="logits")])
    >>> head = dense_head(model)
    >>> head.name, dense_inputs(model, head, np.ones((5, 4), np.float32)).shape
    ('logits', (5, 3))
    >>> weight, bias = head_arrays(head)
    >>> weight.shape, bias.shape
    ((2, 3), (2,))
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

#: the activations a refit final layer may have: its outputs are then the logits or their softmax, whose argmax
#: the refit sets (any other activation would bend the refit's logits)
HEAD_ACTIVATIONS = ("linear", "softmax")


def _layers(model: Any) -> list[Any]:
    """Every layer of ``model``, nested models' included, in order."""
    out: list[Any] = []
    for layer in model.layers:
        out.extend(_layers(layer) if isinstance(layer, keras.Model) else [layer])
    return out


#: what to pass when the final layer is not one calibration can refit (the model's Dense layers are added to it
#: when the model is known)
_PASS_HEAD = "Pass head=<the Dense layer that makes the logits> (the layer, or its name)"


def check_head(head: Any) -> None:
    """At construction: a layer passed as ``head=`` must be a ``Dense`` with a linear or softmax activation (a name
    is looked up, and the default found, when ``fit`` begins, the first moment the callback sees the model).

    >>> check_head(keras.layers.Dense(2, activation="relu", name="out"))
    Traceback (most recent call last):
    ...
    ValueError: calibrate_head: the Dense layer 'out' has activation 'relu'; ... or calibrate_head=False.

    Raises:
        ValueError: ``head`` is neither None, a name nor such a ``Dense``; the message names it and what to pass.
    """
    if head is None or isinstance(head, str):
        return
    if not isinstance(head, keras.layers.Layer):
        raise ValueError("Expected head to be the Dense layer that makes the logits, its name, or None (the last "
                         f"layer with trainable weights). Received: head={head!r}")
    _refittable(head, f"head=<{type(head).__name__} {head.name!r}>", f"{_PASS_HEAD}, or calibrate_head=False.")


def _refittable(layer: Any, label: str, hint: str) -> keras.layers.Dense:
    """``layer`` when it is a ``Dense`` whose outputs are logits (or their softmax), else ``ValueError``."""
    if not isinstance(layer, keras.layers.Dense):
        raise ValueError(f"calibrate_head: {label} is a {type(layer).__name__}, not a keras.layers.Dense: calibration "
                         f"refits the final linear layer. {hint}")
    activation = keras.activations.serialize(layer.activation)
    activation = activation if isinstance(activation, str) else str(activation.get("config", {}).get("name", activation))
    if activation not in HEAD_ACTIVATIONS:
        raise ValueError(f"calibrate_head: the Dense layer {layer.name!r} has activation {activation!r}; calibration "
                         f"refits a layer whose outputs are logits (activation in {HEAD_ACTIVATIONS}). {hint}")
    return layer


def dense_head(model: keras.Model, head: "str | keras.layers.Layer | None" = None) -> keras.layers.Dense:
    """``head`` (a layer of ``model``, or its name), or else the last layer with trainable weights; it must be a
    ``Dense`` with a linear or softmax activation.

    Raises:
        ValueError: no such layer, or not such a ``Dense``: the message names it and what to pass.
    """
    layers = _layers(model)
    dense = [layer.name for layer in layers if isinstance(layer, keras.layers.Dense)]
    hint = f"{_PASS_HEAD} (this model's Dense layers: {dense}), or calibrate_head=False."
    if head is None:
        trainable = [layer for layer in layers if layer.trainable_weights]
        if not trainable:
            raise ValueError(f"calibrate_head: model {model.name!r} has no trainable layer to refit. {hint}")
        layer = trainable[-1]
        label = f"the last trainable layer of model {model.name!r}, {layer.name!r},"
    elif isinstance(head, str):
        found = [layer for layer in layers if layer.name == head]
        if not found:
            raise ValueError(f"calibrate_head: head={head!r} names no layer of model {model.name!r}. {hint}")
        layer, label = found[0], f"head={head!r}"
    else:
        if not any(layer is head for layer in layers):
            raise ValueError(f"calibrate_head: head=<{type(head).__name__} {head.name!r}> is not a layer of model "
                             f"{model.name!r} (the model fit trains). {hint}")
        layer, label = head, f"head=<{type(head).__name__} {head.name!r}>"
    return _refittable(layer, label, hint)


def dense_inputs(model: keras.Model, head: keras.layers.Dense, x: Any, batch_size: int = 256) -> np.ndarray:
    """The inputs of ``head`` for the samples ``x`` ([N, width], float64), in inference mode."""
    features = keras.Model(model.inputs, head.input)
    return np.asarray(features.predict(x, batch_size=batch_size, verbose=0), dtype=np.float64)


def head_arrays(head: keras.layers.Dense) -> tuple[np.ndarray, np.ndarray]:
    """The layer as calibration's ``weight`` [classes, width] (the kernel's transpose) and ``bias``."""
    kernel = np.asarray(keras.ops.convert_to_numpy(head.kernel))
    bias = np.asarray(keras.ops.convert_to_numpy(head.bias)) if head.use_bias else np.zeros(kernel.shape[1])
    return kernel.T, bias


def load_head(head: keras.layers.Dense, weight: np.ndarray, bias: np.ndarray) -> None:
    """Assign a refit ``weight`` [classes, width] and ``bias`` to the layer, each in its variable's dtype."""
    head.kernel.assign(np.ascontiguousarray(weight.T).astype(head.kernel.dtype))
    if head.use_bias:
        head.bias.assign(bias.astype(head.bias.dtype))


__all__ = ["HEAD_ACTIVATIONS", "check_head", "dense_head", "dense_inputs", "head_arrays", "load_head"]
