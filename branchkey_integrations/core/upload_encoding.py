"""A client's upload encoding: the codec of each upload (:mod:`.codec_choice`) and its error feedback.

:class:`UploadEncoding` is what :class:`~.client.Client` asks before each upload (which codec, and the
layers to send: with error feedback, the layers plus what the last quantization dropped) and tells after
it was encoded. The branch's accepted codecs are read from its config for each upload that could use one
(a small GET), so a branch reconfigured between rounds is followed; a config that cannot be read counts as
advertising nothing (plain NPZ, as always).

Example:
    >>> from .client_options import ClientOptions
    >>> encoding = UploadEncoding(ClientOptions(quantize="int8"), "10.0.0.5", lambda: {"service": {"codecs": ["int8"]}})
    >>> encoding.encode([np.full(3, 0.3, np.float32)], None, lambda layers, codec: codec)
    'int8'
    >>> encoding.feedback.residual[0].shape
    (3,)
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

from .client_options import ClientOptions
from .codec_choice import ErrorFeedback, advertised_codecs, check_compression, choose_codec, lossy_codec
from .codec_choice import PLAIN, needs_branch_codecs
from .delta import DeltaBase, accepts_deltas
from .errors import BranchKeyError

logger = logging.getLogger(__name__)
T = TypeVar("T")


class UploadEncoding:
    """The codec choice and error feedback of one client (``options``: its settings; ``hostname``: the API host's)."""

    def __init__(self, options: ClientOptions, hostname: str, branch_config: Callable[[], dict[str, Any]]) -> None:
        self.options, self.hostname = options, hostname
        self._branch_config = branch_config
        self.feedback = ErrorFeedback()
        self.last_codec: str | None = None  # the codec of the last upload
        self.delta = DeltaBase(options.delta)  # the base of delta uploads: the aggregate downloaded last
        self.delta_base: str | None = None  # the base the last encoded upload is a difference from (None: full)
        self._takes_deltas: bool | None = None  # what the branch config said when last read (None: never read)

    def accepted(self) -> list[str] | None:
        """The codecs the branch advertises now; None when it advertises none or its config cannot be read."""
        try:
            config = self._branch_config()
        except BranchKeyError as exc:
            logger.debug("Could not read the branch config for its codecs (%s); sending plain NPZ", exc)
            self._takes_deltas = False
            return None
        self._takes_deltas = accepts_deltas(config)
        return advertised_codecs(config)

    def choose(self, compression: str | None = None) -> str:
        """The codec of the next upload (``compression``: this upload's override of the client's option)."""
        wanted = self.options.compression if compression is None else check_compression("compression", compression)
        quantize = self.options.quantize
        accepted = self.accepted() if needs_branch_codecs(wanted, quantize, self.hostname) else None
        return choose_codec(wanted, quantize, self.hostname, accepted)

    def encode(self, layers: Sequence[np.ndarray], compression: str | None,
               prepare: Callable[[Sequence[np.ndarray], str], T], *, chosen: str | None = None) -> T:
        """``prepare(layers_to_send, codec)``: the layers encoded with the chosen codec (``chosen``: the codec
        :meth:`choose` already gave for this upload, so the branch config is not read twice). With a lossy codec and
        error feedback, the layers sent are ``layers`` plus the residual, and once they are encoded the residual
        becomes what the codec dropped of them (an upload then lost keeps it, as error feedback does with a lost
        message); an encoding that fails leaves the residual as it was. Where the branch takes delta uploads and a
        base is held (:mod:`.delta`), the layers are first made the difference from it (:attr:`delta_base`)."""
        codec = self.choose(compression) if chosen is None else chosen
        if codec != self.last_codec:
            logger.info("Uploads travel as %r", codec)
        self.last_codec = codec
        lossy = lossy_codec(codec)
        layers = self.difference(layers, codec, lossy is not None)
        if lossy is None or not self.options.error_feedback:
            return prepare(layers, codec)
        sent = self.feedback.compensate(layers)
        try:
            encoded = prepare(sent, codec)
        except BaseException:
            self.feedback.undo(layers)
            raise
        self.feedback.settle(sent, lossy)
        return encoded

    @property
    def takes_deltas(self) -> bool:
        """Whether the branch's config said it takes delta uploads when it was last read (read now if never)."""
        if self._takes_deltas is None:
            self.accepted()
        return bool(self._takes_deltas)

    def difference(self, layers: Sequence[np.ndarray], codec: str, lossy: bool) -> Sequence[np.ndarray]:
        """``layers``, or their difference from the held base where the option and the branch allow it."""
        was_delta, self.delta_base = self.delta_base is not None, None
        if not self.delta.wanted(codec, codec in PLAIN):
            return layers
        if not self.takes_deltas:
            return layers
        layers, self.delta_base = self.delta.difference(layers, lossy=lossy)
        if self.delta_base is not None and not was_delta:
            logger.info("Uploads travel as differences from the aggregate downloaded last (%s)", self.delta_base)
        return layers

    def download_codec(self) -> str | None:
        """The codec to ask aggregates in: the ``download_codec`` option where the branch advertises it (the server
        encodes the round's aggregate once, for every leaf that asks); None: the aggregate as stored."""
        wanted = self.options.download_codec
        if wanted is None:
            return None
        accepted = self.accepted() or []
        if wanted not in accepted:
            logger.info("The branch does not serve %r aggregates (it advertises %s); downloading as stored", wanted,
                        accepted or "none")
            return None
        return wanted

    def state_dict(self) -> dict[str, Any]:
        return self.feedback.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.feedback.load_state_dict(state)


__all__ = ["UploadEncoding"]
