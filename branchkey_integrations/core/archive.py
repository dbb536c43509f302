"""The BranchKey model archive's rules: what an archive is once decoded, and the limits and value checks.

An upload holds ``weighting`` (float64, shape (1,)) and ``layer_0``, ``layer_1``, ...; an
aggregate holds the layers only. Layer order is numeric (``layer_10`` after ``layer_9``). The
member names are protocol vocabulary (:mod:`.protocol`); which members a payload kind holds and
how an upload is validated is :mod:`.payload_kinds`; the bytes are :mod:`.archive_write` and
:mod:`.archive_read`.

Example:
    >>> str(LayerSpec.of(np.zeros((2, 3), np.float32))), layer_key(10)
    ('float32[2, 3]', 'layer_10')
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from .errors import ArchiveTooLargeError, ArchiveError, WeightingError
from .protocol import KIND_FEDERATED_LEARNING

#: The accepted weightings (float32's normal range): every pair of them keeps a round's weighted sum finite.
MIN_WEIGHTING = 2.0 ** -126
MAX_WEIGHTING = 2.0 ** 126

#: Default limits, generous for real models and small next to this machine's memory.
DEFAULT_MAX_MEMBERS = 100_000
DEFAULT_MAX_TOTAL_BYTES = 16 * 1024**3
#: Compression-bomb guard (``decode(max_compression_ratio=...)``): float weights deflate to ~0.9 of their
#: size and a deflate stream inflates at most ~1032:1, so an archive that inflates beyond this many bytes
#: *and* beyond ``max_compression_ratio`` times its compressed size is refused before anything is inflated.
#: Below the floor a high ratio (a small all-zero bias) costs nothing worth refusing.
COMPRESSION_RATIO_FLOOR_BYTES = 64 * 1024**2
#: The ratio both sides apply by default: the server to an upload, the client to an aggregate.
DEFAULT_MAX_COMPRESSION_RATIO = 100.0


@dataclass(frozen=True)
class LayerSpec:
    """Shape and dtype of one layer: what every leaf of a branch must agree on."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @classmethod
    def of(cls, array: np.ndarray) -> "LayerSpec":
        return cls(tuple(int(n) for n in array.shape), np.dtype(array.dtype))

    def __str__(self) -> str:
        return f"{self.dtype.name}{list(self.shape)}"


@dataclass
class Archive:
    """A decoded archive. ``weighting`` is None for an aggregate; ``fields`` holds an analytics archive's named
    fields (``layers`` is then empty); ``controls`` SCAFFOLD's ``control_<n>`` members, in order (empty
    outside SCAFFOLD branches)."""

    layers: list[np.ndarray]
    weighting: float | None = None
    kind: str = KIND_FEDERATED_LEARNING
    #: True when :func:`~.archive_read.scan` made it: ``layers`` are zero-byte stand-ins of the right shape
    #: and dtype, whose values were checked finite while they streamed past
    scanned: bool = False
    fields: dict[str, np.ndarray] = field(default_factory=dict)
    controls: list[np.ndarray] = field(default_factory=list)

    @property
    def specs(self) -> list[LayerSpec]:
        return [LayerSpec.of(a) for a in self.layers]

    @property
    def control_specs(self) -> list[LayerSpec]:
        return [LayerSpec.of(a) for a in self.controls]

    @property
    def field_specs(self) -> dict[str, LayerSpec]:
        """Each field's shape and dtype, by name (empty for a model archive)."""
        return {name: LayerSpec.of(a) for name, a in self.fields.items()}

    @property
    def nbytes(self) -> int:
        return (sum(a.nbytes for a in self.layers) + sum(a.nbytes for a in self.fields.values())
                + sum(a.nbytes for a in self.controls))


def layer_key(index: int) -> str:
    return f"layer_{index}"


def control_key(index: int) -> str:
    return f"control_{index}"


def check_compression_ratio(infos: Sequence[zipfile.ZipInfo], max_ratio: float) -> None:
    """Refuse a compression bomb (see :data:`COMPRESSION_RATIO_FLOOR_BYTES`), naming its worst member.

    Compares what the zip directory declares, so nothing is inflated to find out; a member that
    inflates to more than it declares fails its own size check when read.
    """
    inflated = sum(info.file_size for info in infos)
    compressed = sum(info.compress_size for info in infos)
    if inflated <= COMPRESSION_RATIO_FLOOR_BYTES or inflated <= max_ratio * compressed:
        return
    worst = max(infos, key=lambda info: info.file_size / max(info.compress_size, 1))
    raise ArchiveTooLargeError(
        f"Archive inflates to {inflated} bytes from {compressed} compressed ({inflated / max(compressed, 1):.0f}:1); "
        f"member {worst.filename!r} alone inflates {worst.file_size} bytes from {worst.compress_size} "
        f"({worst.file_size / max(worst.compress_size, 1):.0f}:1). The limit is {max_ratio:g}:1 (float weights "
        f"deflate to about 0.9 of their size); this looks like a compression bomb. Send real weights, or store "
        f"the members uncompressed, or raise the server's --max-compression-ratio.", limit="ratio"
    )


def check_weighting(weighting: float) -> float:
    """A weighting must be a number from :data:`MIN_WEIGHTING` to :data:`MAX_WEIGHTING`; returns it as float.

    Why a range and not any finite number > 0: a round's weighted sum divides every weighting by a power
    of two near the first one's (``RunningSum``), which must stay a float64 for any pair of accepted
    weightings; 5e-324 beside 100 is a ratio float64 cannot hold. The range (float32's normal numbers)
    holds any sample count or loss-based weight a leaf sends.
    """
    try:
        value = float(weighting)
    except (TypeError, ValueError):
        raise WeightingError(f"weighting must be a number > 0. Received: weighting={weighting!r}") from None
    if not MIN_WEIGHTING <= value <= MAX_WEIGHTING:  # NaN too
        raise WeightingError(
            f"weighting must be a finite number > 0 from {MIN_WEIGHTING:.4g} to {MAX_WEIGHTING:.4g} (usually the local "
            f"sample count). Received: weighting={weighting!r}"
        )
    return value


def check_finite(layers: Iterable[np.ndarray], names: Sequence[str] | None = None) -> None:
    """Raise naming the first layer that holds NaN or infinity."""
    for index, array in enumerate(layers):
        if not all_finite(array):
            name = names[index] if names is not None else layer_key(index)
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            raise ArchiveError(f"{name} holds {bad} non-finite value(s) (NaN or infinity).")


def all_finite(array: np.ndarray) -> bool:
    """Whether a float or complex array holds no NaN or infinity (other dtypes always do).

    A NaN or infinity makes the sum non-finite, so a finite sum (one fast pass, no temporary)
    proves the layer finite; only a non-finite sum (or an overflow) needs the exact check."""
    if array.dtype.kind not in "fc":
        return True
    if array.size <= 1024:  # a few values: checked at once, without errstate's cost (a model may have 10,000 such)
        return bool(np.isfinite(array).all())
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(array.sum()):
            return True
    return bool(np.isfinite(array).all())


def spec_mismatch(
    expected: Sequence[LayerSpec], received: Sequence[LayerSpec], names: Sequence[str] | None = None
) -> str | None:
    """Describe the first difference between two layer layouts, or None when they agree."""
    if len(expected) != len(received):
        return f"expected {len(expected)} layers, received {len(received)}"
    for index, (want, got) in enumerate(zip(expected, received)):
        if want != got:
            name = names[index] if names is not None else layer_key(index)
            return f"{name}: expected {want}, received {got}"
    return None


__all__ = [
    "Archive", "LayerSpec", "layer_key", "control_key",
    "check_compression_ratio", "check_weighting", "check_finite", "all_finite",
    "spec_mismatch", "MIN_WEIGHTING", "MAX_WEIGHTING", "DEFAULT_MAX_MEMBERS", "DEFAULT_MAX_TOTAL_BYTES",
    "COMPRESSION_RATIO_FLOOR_BYTES", "DEFAULT_MAX_COMPRESSION_RATIO",
]
