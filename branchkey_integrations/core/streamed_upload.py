"""A model upload's body, encoded before it is sent or while it is sent.

Where the branch negotiated a codec that streams (:func:`~.streamed_archive.streams`: ``int8``, ``bf16``), the
archive is a :class:`~.streamed_archive.StreamedArchive`: its length is known from the shapes, its members are
encoded in a thread while the first ones cross the link, and its digest is not sent (it would be known only
once every byte is: each member's CRC is still checked by the server, as for the official 2.7.1 client, which
sends no digest either). Anything else, and every upload to a server that advertises no codec (the hosted
platform), is laid out whole and hashed first, as always (:func:`~.archive_write.prepare`).

Example:
    >>> from .client_options import ClientOptions
    >>> from .upload_encoding import UploadEncoding
    >>> encoding = UploadEncoding(ClientOptions(quantize="int8"), "10.0.0.5", lambda: {"service": {"codecs": ["int8"]}})
    >>> archive, sha256 = encode_upload(encoding, 1.0, [np.full(300, 0.3, np.float32)])
    >>> type(archive).__name__, sha256, encoding.last_codec
    ('StreamedArchive', None, 'int8')
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence, Union

import numpy as np

from . import wire
from .streamed_archive import StreamedArchive, streams
from .upload_encoding import UploadEncoding

logger = logging.getLogger(__name__)
UploadArchive = Union[wire.EncodedArchive, StreamedArchive]


def encode_upload(encoding: UploadEncoding, weighting: float, parameters: Sequence[np.ndarray], *,
                  compression: str | None = None, compresslevel: int | None = None, values_checked: bool = False,
                  controls: Sequence[np.ndarray] = ()) -> tuple[UploadArchive, bytes | None]:
    """The upload of ``parameters`` and its SHA-256 (None for a streamed one, whose digest is not sent).

    ``values_checked``: the caller checked the weighting and that every value is finite
    (:meth:`~.client.Client.upload_arrays`); else both are checked here, before a byte is sent.
    """
    codec = encoding.choose(compression)
    if not streams(codec):
        return _whole(encoding, weighting, parameters, codec, compresslevel, values_checked, controls)
    if not values_checked:
        weighting = wire.check_weighting(weighting)
    if codec != encoding.last_codec:
        logger.info("Uploads travel as %r, encoded while they are sent", codec)
    encoding.last_codec = codec
    layers = encoding.difference(parameters, codec, lossy=True)  # from the held base, where deltas are taken
    sent, settle, added = list(layers), [], []
    if encoding.options.error_feedback:  # the encoder adds each layer into its residual buffer, then sends that
        buffers = encoding.feedback.buffers(layers)
        floats = [i for i, layer in enumerate(layers) if np.asarray(layer).dtype == np.float32]
        sent = list(layers)
        for i in floats:
            sent[i] = buffers[i]
        settle, added = [buffers[i] for i in floats], [layers[i] for i in floats]
    archive = StreamedArchive.of_layers(sent, weighting, codec, settle, controls, compensate=added)
    if not values_checked:
        try:  # beside the encoding thread, before a byte is sent
            wire.check_finite(parameters)
        except BaseException:
            archive.wait()  # an upload not sent keeps its residual, as one lost on the way does
            raise
    return archive, None


def _whole(encoding: UploadEncoding, weighting: float, parameters: Sequence[np.ndarray], codec: str,
           compresslevel: int | None, values_checked: bool,
           controls: Sequence[np.ndarray]) -> tuple[UploadArchive, bytes]:
    # wire.prepare checks the weighting as it encodes that member unless the caller already did
    archive = encoding.encode(parameters, codec, lambda layers, chosen: wire.prepare(
        layers, weighting, compresslevel=compresslevel, checked=values_checked, controls=controls,
        compression=chosen), chosen=codec)
    if values_checked:
        return archive, archive.sha256()
    # The digest header must precede the body, so hashing is on the critical path; the finite check
    # runs beside it (both release the GIL), which hides it on a machine with two cores.
    with ThreadPoolExecutor(max_workers=1) as pool:
        hashing = pool.submit(archive.sha256)
        wire.check_finite(parameters)
        return archive, hashing.result()


__all__ = ["UploadArchive", "encode_upload"]
