"""Payload kinds: what an upload holds, and how it is written and checked, one object per kind.

The kind travels in the archive (:data:`~.protocol.KIND_KEY`; absent means
``federated_learning``) and in the upload metadata (``"kind"``). Both sides go through the same
:class:`PayloadKind`: the client's encoder asks it which members to write
(:meth:`PayloadKind.members`), the decoder which member names it may hold
(:meth:`PayloadKind.allows_member`), and the server's upload check whether an upload may count
(:meth:`PayloadKind.validate`). ``federated_learning`` is the model archive; ``federated_analytics``
is declared and refused as not supported yet.

Example:
    >>> payload_kind("federated_learning").allows_member("layer_3"), FEDERATED_LEARNING.allows_member("bias")
    (True, False)
    >>> payload_kind("federated_analytics").supported
    False
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import numpy as np

from .archive import Archive, LayerSpec, check_finite, check_weighting, layer_key, spec_mismatch
from .errors import ArchiveError, WeightingError
from .protocol import KIND_FEDERATED_ANALYTICS, KIND_FEDERATED_LEARNING, KIND_KEY, LAYER_PATTERN, WEIGHTING_KEY

#: bytes that 'weighting' or the payload kind (one value each) may declare, at most
SMALL_KEY_BYTES = 64 << 10


class PayloadKind:
    """One payload kind: its name, the members it holds, and the check an upload of it must pass."""

    name: ClassVar[str] = ""
    #: False for a kind this version declares but does not handle: archives of it are refused
    supported: ClassVar[bool] = True

    def allows_member(self, key: str) -> bool:
        """Whether an archive of this kind may hold a member named ``key`` (``.npy`` removed)."""
        raise NotImplementedError

    def member_rule(self) -> str:
        """What an archive of this kind holds, for a refusal's message."""
        raise NotImplementedError

    def members(self, layers: Sequence[np.ndarray], weighting: float | None) -> list[tuple[str, np.ndarray]]:
        """The members the encoder writes for ``layers`` and ``weighting``, in order."""
        raise NotImplementedError

    def validate(self, archive: Archive, expected: Sequence[LayerSpec] | None = None) -> None:
        """Everything an upload of this kind must satisfy before it may count in a round.

        Raises:
            ArchiveError: naming the member and the reason.
        """
        raise NotImplementedError


class FederatedLearning(PayloadKind):
    """A model: ``weighting`` and ``layer_0``, ``layer_1``, ...; aggregated by the branch's strategy."""

    name = KIND_FEDERATED_LEARNING

    def allows_member(self, key: str) -> bool:
        return key == WEIGHTING_KEY or key == KIND_KEY or LAYER_PATTERN.fullmatch(key) is not None

    def member_rule(self) -> str:
        return f"a BranchKey archive holds only '{WEIGHTING_KEY}', 'layer_0', 'layer_1', ... (numbered from 0)."

    def members(self, layers: Sequence[np.ndarray], weighting: float | None) -> list[tuple[str, np.ndarray]]:
        # no kind member: the archive stays what the official clients write, which means this kind
        members: list[tuple[str, np.ndarray]] = []
        if weighting is not None:
            members.append((WEIGHTING_KEY, np.array([check_weighting(weighting)], dtype=np.float64)))
        return members + [(layer_key(index), np.asarray(array)) for index, array in enumerate(layers)]

    def validate(self, archive: Archive, expected: Sequence[LayerSpec] | None = None) -> None:
        if archive.weighting is None:
            raise ArchiveError("Upload has no 'weighting' member; expected a float64 array of shape (1,).")
        try:
            check_weighting(archive.weighting)
        except WeightingError as exc:  # inside an archive, a bad weighting is a bad archive
            raise ArchiveError(f"Member 'weighting': {exc}") from None
        if expected is not None:
            problem = spec_mismatch(expected, archive.specs)
            if problem:
                raise ArchiveError(f"Upload does not match this round's layers: {problem}.")
        if not archive.scanned:  # scan() checked the values as they streamed past
            check_finite(archive.layers)


class FederatedAnalytics(PayloadKind):
    """Named statistics combined field by field (PROTOCOL.md); declared here, not handled yet."""

    name = KIND_FEDERATED_ANALYTICS
    supported = False

    def allows_member(self, key: str) -> bool:
        return False

    def member_rule(self) -> str:
        return self._refusal()

    def members(self, layers: Sequence[np.ndarray], weighting: float | None) -> list[tuple[str, np.ndarray]]:
        raise ArchiveError(self._refusal())

    def validate(self, archive: Archive, expected: Sequence[LayerSpec] | None = None) -> None:
        raise ArchiveError(self._refusal())

    def _refusal(self) -> str:
        return (f"Payload kind {self.name!r} is not supported yet by this version; send a "
                f"{KIND_FEDERATED_LEARNING!r} archive (layers and a weighting).")


FEDERATED_LEARNING, FEDERATED_ANALYTICS = FederatedLearning(), FederatedAnalytics()
PAYLOAD_KIND_OBJECTS: dict[str, PayloadKind] = {kind.name: kind for kind in (FEDERATED_LEARNING, FEDERATED_ANALYTICS)}


def payload_kind(name: str) -> PayloadKind:
    """The kind named ``name``.

    Raises:
        ArchiveError: a kind the protocol does not know.
    """
    kind = PAYLOAD_KIND_OBJECTS.get(name)
    if kind is None:
        raise ArchiveError(f"Payload kind {name[:80]!r} is not supported; expected {KIND_FEDERATED_LEARNING!r}.")
    return kind


def supported_kind(name: str) -> PayloadKind:
    """The kind named ``name`` when this version handles it; else :class:`ArchiveError` saying why."""
    kind = payload_kind(name)
    if not kind.supported:
        raise ArchiveError(kind.member_rule())  # an unsupported kind's rule is its refusal
    return kind


def validate_upload(archive: Archive, expected: Sequence[LayerSpec] | None = None) -> None:
    """Everything an upload must satisfy before it may count in a round: its kind's :meth:`PayloadKind.validate`."""
    payload_kind(archive.kind).validate(archive, expected)


__all__ = ["PayloadKind", "FederatedLearning", "FederatedAnalytics", "FEDERATED_LEARNING", "FEDERATED_ANALYTICS",
           "PAYLOAD_KIND_OBJECTS", "payload_kind", "supported_kind", "validate_upload", "SMALL_KEY_BYTES"]
