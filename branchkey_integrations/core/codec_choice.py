"""Which codec an upload travels in: the best one that both the branch accepts and the user allows.

A branch advertises the codecs it accepts in its config (``service.codecs``, set with ``branchkey-local branch
--codecs``); a server that advertises none (the hosted platform today) gets plain NPZ (stored or deflate),
unchanged. The user allows codecs with two client options (:class:`~.client_options.ClientOptions`,
so ``Client``, ``Federation`` and both callbacks take them through ``client_options``):

- ``compression``: ``"auto"`` (the default), ``"none"``, ``"deflate"``, or a registered codec such as
  ``"shuffle-zstd"``. ``"auto"`` decides by link: loopback and private-network hosts get stored members
  (there CPU, not bytes, is the cost); elsewhere ``shuffle-zstd`` where the branch accepts it and zstandard is
  installed, else deflate where isal is installed, else stored.
- ``quantize``: None (the default: lossless), ``"fp16"``, ``"bf16"`` or ``"int8"`` (blockwise). Lossy, so
  opt-in only; used where the branch accepts it, else the upload falls back to ``compression``'s choice (logged).

:class:`ErrorFeedback` keeps what quantization dropped and adds it to the next upload, so the error does not
accumulate over rounds (``error_feedback=True``, the default, with a lossy codec); its state is part of the
federation's checkpoint.

Example:
    >>> choose_codec("auto", "int8", "10.0.0.5", accepted=["int8"])
    'int8'
    >>> choose_codec("auto", "int8", "10.0.0.5", accepted=None)  # a branch that advertises nothing
    'none'
    >>> choose_codec("deflate", None, "app.example.com", accepted=None)
    'deflate'
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Sequence

import numpy as np

from .float_codecs import SHUFFLE_ZSTD, FloatCodec
from .client_options import QUANTIZE, check_compression, check_quantize
from .tensor_codecs import codec_named, codec_names
from .transfer import AUTO, upload_compression, is_local_host

logger = logging.getLogger(__name__)

#: the codecs every reader knows, which travel as plain NPZ
PLAIN = ("none", "stored", "deflate")


def advertised_codecs(branch_config: Any) -> list[str] | None:
    """The codecs a branch config (``GET /api/v1/config/branch/{id}``'s data) advertises; None for none."""
    service = branch_config.get("service") if isinstance(branch_config, dict) else None
    codecs = service.get("codecs") if isinstance(service, dict) else None
    if not isinstance(codecs, list) or not codecs:
        return None
    return [str(name) for name in codecs if isinstance(name, str)]


def choose_codec(compression: str, quantize: str | None, hostname: str, accepted: Sequence[str] | None) -> str:
    """The codec of an upload to ``hostname`` whose branch accepts ``accepted`` (None: it advertises nothing)."""
    usable = set(accepted or ()) & set(codec_names())
    if quantize is not None:
        if quantize in usable:
            return quantize
        logger.info("The branch does not accept %r uploads (it accepts %s); sending float32", quantize,
                    sorted(usable) or "plain NPZ only")
    if compression not in PLAIN and compression != AUTO:
        if compression in usable:
            return compression
        logger.info("The branch does not accept %r uploads (it accepts %s); choosing by link instead", compression,
                    sorted(usable) or "plain NPZ only")
        compression = AUTO
    if compression == AUTO and SHUFFLE_ZSTD is not None and SHUFFLE_ZSTD.name in usable and not is_local_host(hostname):
        return SHUFFLE_ZSTD.name
    return upload_compression(compression, hostname)


def needs_branch_codecs(compression: str, quantize: str | None, hostname: str) -> bool:
    """Whether the choice depends on what the branch accepts (else no config is read: plain NPZ as always)."""
    if quantize is not None or compression not in (*PLAIN, AUTO):
        return True
    return compression == AUTO and SHUFFLE_ZSTD is not None and not is_local_host(hostname)


class ErrorFeedback:
    """The quantization residual of a leaf's uploads, added to the next one (error feedback).

    :meth:`compensate` returns the layers plus the residual (held in the residual's own buffers: no second
    copy of the model); once those are encoded, :meth:`settle` keeps what the codec dropped of them.

    Example:
        >>> from .float_codecs import INT8
        >>> feedback = ErrorFeedback()
        >>> sent = feedback.compensate([np.full(4, 0.3, np.float32)])
        >>> feedback.settle(sent, INT8)
        >>> bool(np.abs(feedback.residual[0]).max() < 1e-3)
        True
    """

    def __init__(self) -> None:
        self.residual: list[np.ndarray] = []

    def buffers(self, layers: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The residual's buffers for ``layers``, nothing added yet (zeros in a first round, or for a new model):
        for an encoder that adds each float32 layer into its buffer just before encoding it."""
        if [np.shape(layer) for layer in layers] != [r.shape for r in self.residual]:
            self.residual = [np.zeros(np.shape(layer), np.float32) for layer in layers]
        return self.residual

    def compensate(self, layers: Sequence[np.ndarray]) -> list[np.ndarray]:
        """``layers`` plus the residual (float32 layers only; others as they are)."""
        self.buffers(layers)
        out: list[np.ndarray] = []
        for layer, held in zip(layers, self.residual):
            if np.asarray(layer).dtype != np.float32:
                out.append(layer)
                continue
            np.add(held, layer, out=held)
            out.append(held)
        return out

    def settle(self, sent: Sequence[np.ndarray], codec: FloatCodec) -> None:
        """After ``sent`` (what :meth:`compensate` returned) was encoded: keep ``sent - decoded(sent)``."""
        for layer, held in zip(sent, self.residual):
            if layer is held:
                held -= codec.dequantized(held)

    def undo(self, layers: Sequence[np.ndarray]) -> None:
        """Take ``layers`` back out of the residual (their encoding failed: :meth:`settle` was not reached)."""
        for layer, held in zip(layers, self.residual):
            if np.asarray(layer).dtype == np.float32:
                held -= layer

    def reset(self) -> None:
        self.residual = []

    def state_dict(self) -> dict[str, Any]:
        return {"error_feedback": [r.copy() for r in self.residual]} if self.residual else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        held: Iterable[Any] = state.get("error_feedback") or []
        self.residual = [np.array(r, np.float32) for r in held]


def lossy_codec(name: str) -> FloatCodec | None:
    """The lossy codec named ``name``; None for a lossless one."""
    codec = codec_named(name)
    return codec if isinstance(codec, FloatCodec) and codec.lossy else None


__all__ = ["choose_codec", "check_compression", "check_quantize", "advertised_codecs", "needs_branch_codecs",
           "ErrorFeedback", "lossy_codec", "QUANTIZE", "PLAIN"]
