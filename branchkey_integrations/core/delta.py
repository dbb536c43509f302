"""Delta uploads: an upload sent as its difference from the branch's latest aggregate, which the server adds back.

After a few training steps a leaf's weights are close to the global model it started from. Sent as a difference
from that model they compress (lossless) or quantize (lossy) better:

- with a lossless codec (``shuffle-zstd``) each float32 layer travels as the XOR of its bit patterns with the
  base's (:func:`xor_bits`, a ``uint32`` member): sign, exponent and high mantissa bits mostly agree, so the high
  byte planes are mostly zero; the server XORs back, bit for bit;
- with a lossy codec (``fp16``, ``bf16``, ``int8``) each float32 layer travels as ``weights - base`` (float32):
  a smaller range per block, so a finer step; error feedback then keeps the residual of the difference.

Layers that are not float32 (an integer counter) travel whole. The upload's part ``data`` names the base:
``{"leaf_name": ..., "metadata": ..., "delta_base": "<aggregation id>"}``. Only a branch whose config says
``service.delta_uploads: true`` (``branchkey-local`` with codecs advertised) gets delta uploads: the hosted
platform and the official clients never see one. A server that no longer holds the base as the branch's latest
aggregate refuses the upload (409) and the client sends the full weights instead (:mod:`.client`).

Example:
    >>> base = np.array([0.5, -1.25, 3.0], np.float32)
    >>> weights = np.array([0.5001, -1.2502, 3.0], np.float32)
    >>> bits = xor_bits(weights, base)
    >>> bits.dtype.name, bool(np.array_equal(reconstruct(bits, base), weights))
    ('uint32', True)
    >>> held = DeltaBase("auto")
    >>> held.remember("agg-1", [base], download_codec=None, branch_takes=lambda: True)
    >>> layers, base_id = held.difference([weights], lossy=False)
    >>> base_id, layers[0].dtype.name
    ('agg-1', 'uint32')
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np

from .tensor_codecs import codec_named

logger = logging.getLogger(__name__)

#: the key of the upload's part ``data`` that names the base aggregate of a delta upload
DELTA_BASE_KEY = "delta_base"
#: the key of the branch config's ``service`` that says the server takes delta uploads
DELTA_CONFIG_KEY = "delta_uploads"
#: the ``delta=`` choices: "auto" (with a codec other than stored and deflate), True (with any), False (never)
DELTA_CHOICES = ("auto", True, False)
_F32, _U32 = np.dtype("<f4"), np.dtype("<u4")


def check_delta(name: str, value: Any) -> str | bool:
    """``value`` as a ``delta=`` choice (see :data:`DELTA_CHOICES`)."""
    if not (value == "auto" or value is True or value is False):
        raise ValueError(f"Expected {name} in {DELTA_CHOICES}. Received: {name}={value!r}")
    return value


def accepts_deltas(branch_config: Any) -> bool:
    """Whether a branch config (``GET /api/v1/config/branch/{id}``'s data) says the server takes delta uploads."""
    service = branch_config.get("service") if isinstance(branch_config, dict) else None
    return isinstance(service, dict) and service.get(DELTA_CONFIG_KEY) is True


def xor_bits(values: np.ndarray, base: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The XOR of the float32 bit patterns of ``values`` and ``base`` (same shape), as uint32 in C order (into
    ``out``'s memory when given: a C-ordered float32 or uint32 array of that shape)."""
    return np.bitwise_xor(np.ascontiguousarray(values, _F32).view(_U32), np.ascontiguousarray(base, _F32).view(_U32),
                          out=None if out is None else out.view(_U32))


def reconstruct(delta: np.ndarray, base: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The float32 values a delta member stands for: ``delta`` XOR ``base`` for uint32 bits, else ``base + delta``."""
    base = np.asarray(base, _F32)
    if delta.dtype == _U32:
        bits = np.bitwise_xor(delta, base.view(_U32), out=None if out is None else out.view(_U32))
        return bits.view(_F32)
    return np.add(base, delta, out=out, dtype=_F32)


def is_delta_layer(base: np.ndarray | np.dtype) -> bool:
    """Whether a layer of this base (or base dtype) travels as a difference: float32 ones do, others whole."""
    return np.dtype(getattr(base, "dtype", base)) == _F32


class DeltaBase:
    """The branch aggregate this client downloaded last, kept (a copy of its float32 layers) as the base of the
    next upload, and whether that upload may use it.

    ``mode``: the ``delta=`` client option. The base is kept only from an exact download (the aggregate as the
    server stores it, or through a lossless codec): a difference from a dequantized copy would not add back to
    the leaf's weights; and with ``"auto"`` only where the branch said it takes deltas, so a leaf of the hosted
    platform never pays for the copy.
    """

    def __init__(self, mode: str | bool = "auto") -> None:
        self.mode = check_delta("delta", mode)
        self.base_id: str | None = None
        self._layers: list[np.ndarray] = []

    def remember(self, aggregation_id: str, layers: Sequence[np.ndarray], *, download_codec: str | None,
                 branch_takes: Callable[[], bool]) -> None:
        """Keep ``layers`` (copied: the download buffer is reused) as the base named ``aggregation_id``, where they
        are exact: downloaded as stored (``download_codec`` None) or through a lossless codec. ``branch_takes``:
        whether the branch says it takes deltas (asked only with ``"auto"``)."""
        lossy = download_codec is not None and getattr(codec_named(download_codec), "lossy", False)
        if self.mode is False or lossy or (self.mode == "auto" and not branch_takes()):
            self.forget()
            return
        self.base_id = aggregation_id
        self._layers = [np.array(layer, copy=True, order="C") if is_delta_layer(layer) else np.asarray(layer)
                        for layer in layers]

    def forget(self) -> None:
        """Drop the base: the next upload is full (the server refused it as stale, or the model changed)."""
        self.base_id, self._layers = None, []

    def wanted(self, codec: str, plain: bool) -> bool:
        """Whether an upload in ``codec`` (``plain``: stored or deflate) should travel as a delta, before asking
        the branch: a base is held and the option allows it with that codec."""
        return self.base_id is not None and (self.mode is True or (self.mode == "auto" and not plain))

    def difference(self, layers: Sequence[np.ndarray], *, lossy: bool) -> tuple[list[np.ndarray], str | None]:
        """``layers`` as the difference from the base (XOR bits, or ``- base`` when ``lossy``) and the base's id;
        ``layers`` as they are and None when they do not match the base's layout (the base is then dropped).

        The differences are written over the base's own memory, so encoding a delta costs no more memory than
        encoding the weights: the base is used up (an aggregate is the base of one upload; the next upload's is
        the next aggregate)."""
        if self.base_id is None:
            return list(layers), None
        if [(np.shape(a), np.asarray(a).dtype) for a in layers] != [(b.shape, b.dtype) for b in self._layers]:
            logger.info("The model's layers differ from those of aggregate %s; sending the full weights", self.base_id)
            self.forget()
            return list(layers), None
        out: list[np.ndarray] = []
        for layer, base in zip(layers, self._layers):
            if not is_delta_layer(base):
                out.append(layer)
            elif lossy:
                out.append(np.subtract(layer, base, out=base, dtype=_F32))
            else:
                out.append(xor_bits(layer, base, out=base).view(_U32))
        base_id = self.base_id
        self.base_id, self._layers = None, []  # used up: its memory holds the differences now
        return out, base_id


__all__ = ["DeltaBase", "DELTA_BASE_KEY", "DELTA_CONFIG_KEY", "DELTA_CHOICES", "accepts_deltas", "check_delta",
           "is_delta_layer", "reconstruct", "xor_bits"]
