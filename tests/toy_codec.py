"""A codec written outside the package, as a contributor would: one class and a registration."""

from __future__ import annotations

import bz2

from branchkey_integrations.core.tensor_codecs import Codec


class Bz2Codec(Codec):
    """bzip2 over a member's ``.npy`` bytes (whole member in, whole member out)."""

    name = "bz2-toy"

    def encode(self, data: bytes) -> bytes:
        return bz2.compress(data, 1)

    def decode(self, data: bytes) -> bytes:
        return bz2.decompress(data)


class LiarCodec(Bz2Codec):
    """Decodes one byte more than it was given: a member that inflates past what its zip entry declares."""

    name = "liar-toy"

    def decode(self, data: bytes) -> bytes:
        return super().decode(data) + b"\0"
