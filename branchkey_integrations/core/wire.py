"""The BranchKey model archive, as one import: a façade over the modules that own its parts.

A NumPy ``.npz`` (a zip of ``.npy`` members): an upload holds ``weighting`` (float64, shape (1,))
and ``layer_0``, ``layer_1``, ...; an aggregate holds the layers only. Where each part lives:

- :mod:`.archive`: the decoded :class:`Archive`, :class:`LayerSpec`, the limits and the value checks;
- :mod:`.payload_kinds`: what each payload kind holds and how an upload of it is validated;
- :mod:`.archive_write` and :mod:`.archive_read`: the archive written (without copies) and read safely;
- :mod:`.tensor_codecs`: how a member's bytes are compressed (stored, deflate, or a registered codec);
- :mod:`.zipformat` and :mod:`.npy`: the zip container and the ``.npy`` member format.

Example:
    >>> archive = decode(encode([np.ones(2, np.float32)], 3.0))
    >>> archive.weighting, archive.kind, archive.specs[0].dtype.name
    (3.0, 'federated_learning', 'float32')
"""

from __future__ import annotations

import numpy as np  # noqa: F401 - the example above uses it

from .archive import (COMPRESSION_RATIO_FLOOR_BYTES, DEFAULT_MAX_COMPRESSION_RATIO, DEFAULT_MAX_MEMBERS,
                      DEFAULT_MAX_TOTAL_BYTES, MAX_WEIGHTING, MIN_WEIGHTING, Archive, LayerSpec, all_finite,
                      check_compression_ratio, check_finite, check_weighting, control_key, layer_key, spec_mismatch)
from .archive_read import Source, decode, layer_pieces, read_control, read_layer, scan
from .archive_write import ArchiveWriter, EncodedArchive, encode, prepare, prepare_fields, stored_members
from .tensor_codecs import (DEFAULT_DEFLATE_LEVEL, FAST_DEFLATE, ZIP_DEFLATED, ZIP_STORED, Codec, codec_named, codec_names,
                     register_codec, unregister_codec)
from . import float_codecs  # noqa: F401 - registers fp16, bf16, int8 and shuffle-zstd in every process that reads archives
from .payload_kinds import control_problem, validate_upload
from .protocol import KIND_FEDERATED_ANALYTICS, KIND_FEDERATED_LEARNING, KIND_KEY, LAYER_PATTERN, WEIGHTING_KEY
from .zipformat import CORRUPT_ZIP_ERRORS


#: The built-in ``compression=`` names and their zip methods (:func:`~.tensor_codecs.codec_names` adds registered codecs).
COMPRESSIONS = {"deflate": ZIP_DEFLATED, "none": ZIP_STORED}

__all__ = [
    "Archive", "LayerSpec", "COMPRESSIONS", "WEIGHTING_KEY", "KIND_KEY", "KIND_FEDERATED_LEARNING",
    "KIND_FEDERATED_ANALYTICS", "LAYER_PATTERN", "encode", "prepare", "prepare_fields", "EncodedArchive", "ArchiveWriter", "decode",
    "scan", "check_weighting", "MIN_WEIGHTING", "MAX_WEIGHTING", "check_compression_ratio",
    "COMPRESSION_RATIO_FLOOR_BYTES", "DEFAULT_MAX_COMPRESSION_RATIO", "DEFAULT_MAX_MEMBERS", "DEFAULT_MAX_TOTAL_BYTES",
    "check_finite", "all_finite", "spec_mismatch", "validate_upload", "control_problem",
    "layer_key", "control_key", "read_layer", "read_control", "layer_pieces",
    "stored_members", "Codec", "register_codec", "unregister_codec", "codec_named", "codec_names", "FAST_DEFLATE",
    "DEFAULT_DEFLATE_LEVEL", "ZIP_STORED", "ZIP_DEFLATED", "CORRUPT_ZIP_ERRORS", "Source",
]
