"""Payload kinds: what an upload holds, and how it is written and checked, one object per kind.

The kind travels in the archive (:data:`~.protocol.KIND_KEY`; absent means
``federated_learning``) and in the upload metadata (``"kind"``). Both sides go through the same
:class:`PayloadKind`: the client's encoder asks it which members to write
(:meth:`PayloadKind.members`), the decoder which member names it may hold
(:meth:`PayloadKind.allows_member`), and the server's upload check whether an upload may count
(:meth:`PayloadKind.validate`). ``federated_learning`` is the model archive (layers and a weighting);
``federated_analytics`` holds named fields, which the server combines field by field (its rules:
:mod:`branchkey_integrations.server.analytics`).

Example:
    >>> payload_kind("federated_learning").allows_member("layer_3"), FEDERATED_LEARNING.allows_member("bias")
    (True, False)
    >>> payload_kind("federated_analytics").allows_member("age_sum"), FEDERATED_ANALYTICS.allows_member("layer_0")
    (True, False)
"""

from __future__ import annotations

import re
from typing import ClassVar, Mapping, Sequence

import numpy as np

from .archive import Archive, LayerSpec, check_finite, check_weighting, control_key, layer_key, spec_mismatch
from .errors import ArchiveError, WeightingError
from .protocol import (CONTROL_PATTERN, CONTROLLED_ALGORITHMS, KIND_FEDERATED_ANALYTICS, KIND_FEDERATED_LEARNING,
                       KIND_KEY, LAYER_PATTERN, WEIGHTING_KEY)

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

    def allows_text(self, key: str) -> bool:
        """Whether member ``key`` may hold text (the kind key always may)."""
        return key == KIND_KEY

    def member_rule(self) -> str:
        """What an archive of this kind holds, for a refusal's message."""
        raise NotImplementedError

    def members(self, layers: Sequence[np.ndarray], weighting: float | None,
                controls: Sequence[np.ndarray] = ()) -> list[tuple[str, np.ndarray]]:
        """The members the encoder writes for ``layers``, ``weighting`` (checked by the encoder) and SCAFFOLD's
        ``controls``, in order."""
        raise NotImplementedError

    def validate(self, archive: Archive, expected: Sequence[LayerSpec] | None = None) -> None:
        """Everything an upload of this kind must satisfy before it may count in a round.

        Raises:
            ArchiveError: naming the member and the reason.
        """
        raise NotImplementedError


class FederatedLearning(PayloadKind):
    """A model: ``weighting`` and ``layer_0``, ``layer_1``, ...; aggregated by the branch's strategy.

    In a SCAFFOLD branch (:data:`~.protocol.CONTROLLED_ALGORITHMS`) an upload may also hold ``control_0``,
    ``control_1``, ... (one per layer, same shape and dtype: the leaf's control update), and the aggregate does
    (the server's control variate). The decoder reads them wherever they are; whether a branch takes them is
    the server's check (:func:`control_problem`), as only it knows the branch.
    """

    name = KIND_FEDERATED_LEARNING

    def allows_member(self, key: str) -> bool:
        return (key == WEIGHTING_KEY or key == KIND_KEY or LAYER_PATTERN.fullmatch(key) is not None
                or CONTROL_PATTERN.fullmatch(key) is not None)

    def member_rule(self) -> str:
        return (f"a BranchKey archive holds only '{WEIGHTING_KEY}', 'layer_0', 'layer_1', ... (numbered from 0), "
                "and in a SCAFFOLD branch 'control_0', 'control_1', ...; "
                f"an archive of named fields must declare {KIND_KEY!r} = {KIND_FEDERATED_ANALYTICS!r} "
                "(save_fields and save_analytics write it).")

    def members(self, layers: Sequence[np.ndarray], weighting: float | None,
                controls: Sequence[np.ndarray] = ()) -> list[tuple[str, np.ndarray]]:
        # no kind member: the archive stays what the official clients write, which means this kind
        members: list[tuple[str, np.ndarray]] = []
        if weighting is not None:
            members.append((WEIGHTING_KEY, np.array([weighting], dtype=np.float64)))  # checked by prepare's caller
        members += [(layer_key(index), np.asarray(array)) for index, array in enumerate(layers)]
        return members + [(control_key(index), np.asarray(array)) for index, array in enumerate(controls)]

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
        if archive.controls:
            problem = spec_mismatch(archive.specs, archive.control_specs,
                                    [control_key(i) for i in range(len(archive.controls))])
            if problem:
                raise ArchiveError(f"Its control members do not match its layers ({problem}); a SCAFFOLD upload "
                                   "holds one control_<n> per layer_<n>, of the same shape and dtype.")
        if not archive.scanned:  # scan() checked the values as they streamed past
            check_finite(archive.layers)
            check_finite(archive.controls, [control_key(i) for i in range(len(archive.controls))])


class FederatedAnalytics(PayloadKind):
    """Named statistics combined field by field (PROTOCOL.md): what the official 3.x client's ``save_fields`` and
    ``save_analytics`` write. Each member but ``weighting`` (written as 0.0, read by nothing) and the kind key is
    one field, at least 1-D, of dtype kind ``b i u f c U S``; ``layer_<n>`` names are the learning kind's."""

    name = KIND_FEDERATED_ANALYTICS

    def allows_member(self, key: str) -> bool:
        return key in RESERVED_FIELD_NAMES or field_name_problem(key) is None

    def allows_text(self, key: str) -> bool:
        return True

    def member_rule(self) -> str:
        return (f"a {self.name!r} archive holds named fields (not 'layer_<n>', '{WEIGHTING_KEY}' or "
                f"'{KIND_KEY}', which are reserved), each a name of 1-{MAX_FIELD_NAME} characters without control "
                "characters, '/' or '\\'.")

    def members(self, layers: Sequence[np.ndarray], weighting: float | None,
                controls: Sequence[np.ndarray] = ()) -> list[tuple[str, np.ndarray]]:
        raise ArchiveError(f"A {self.name!r} archive holds named fields, not layers: write it with "
                           "prepare_fields (Client.save_fields / save_analytics).")

    def field_members(self, fields: Mapping[str, object]) -> list[tuple[str, np.ndarray]]:
        """The members the encoder writes for ``fields``: each field as a 1-D-at-least array, then ``weighting``
        (0.0) and the kind key, as the official 3.x client writes them.

        Raises:
            ArchiveError: no fields, a reserved or positional name, or a value that is not a plain array.
        """
        if not fields:
            raise ArchiveError("No fields to send: pass at least one name -> value.")
        members: list[tuple[str, np.ndarray]] = []
        for name, value in fields.items():
            problem = field_name_problem(name) if isinstance(name, str) else "it is not a string"
            if problem is not None:
                raise ArchiveError(f"Field name {str(name)[:80]!r}: {problem}.")
            members.append((name, field_array(name, value)))
        return members + [(WEIGHTING_KEY, np.array([0.0])), (KIND_KEY, np.array(self.name))]

    def validate(self, archive: Archive, expected: Sequence[LayerSpec] | None = None) -> None:
        if not archive.fields:
            raise ArchiveError(f"A {self.name!r} archive holds no fields; expected at least one named field.")
        for name, array in archive.fields.items():
            if array.ndim == 0:
                raise ArchiveError(f"Field {name!r} is a bare scalar; every field is at least 1-D (a single value is "
                                   "a one-element array, as save_fields writes it).")
            if array.dtype.kind not in FIELD_DTYPE_KINDS:
                raise ArchiveError(f"Field {name!r} has dtype {array.dtype}; fields are bool, int, uint, float, "
                                   "complex or fixed-width text.")


#: the dtype kinds a field may have (3.x: numbers, booleans, fixed-width text)
FIELD_DTYPE_KINDS = "biufcUS"
#: a field name's longest length (the official client sets none; a zip name holds 65,535 bytes)
MAX_FIELD_NAME = 256
#: what a field name may not hold: control characters (a zip name would carry them), path separators
FIELD_NAME_REFUSED = re.compile(r"[\x00-\x1f\x7f-\x9f/\\]")
#: member names no field may take
RESERVED_FIELD_NAMES = frozenset({WEIGHTING_KEY, KIND_KEY})


def field_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a field's name, or None when it can.

    >>> field_name_problem("age_sum") is None, field_name_problem("layer_3")
    (True, "'layer_<n>' names are the model's (federated_learning)")
    """
    if name in RESERVED_FIELD_NAMES:
        return f"{name!r} is reserved by the protocol"
    if LAYER_PATTERN.fullmatch(name):
        return "'layer_<n>' names are the model's (federated_learning)"
    if not 0 < len(name) <= MAX_FIELD_NAME:
        return f"a field name has 1 to {MAX_FIELD_NAME} characters"
    if FIELD_NAME_REFUSED.search(name):
        return "a field name holds no control character, '/' or '\\'"
    return None


def field_array(name: str, value: object) -> np.ndarray:
    """``value`` as a field's array (a scalar becomes one element), refused when it would need pickle.

    >>> field_array("n_cases", 312)
    array([312])
    """
    try:
        array = np.atleast_1d(np.asarray(value))
    except (TypeError, ValueError) as exc:
        raise ArchiveError(f"Field {name!r} cannot be stored in an archive: {exc}") from None
    if array.dtype.kind not in FIELD_DTYPE_KINDS or array.dtype.fields is not None:
        raise ArchiveError(f"Field {name!r} has dtype {array.dtype} ({type(value).__name__}); fields are numbers, "
                           "booleans or text (numpy arrays, scalars or nested lists of them).")
    return array


FEDERATED_LEARNING, FEDERATED_ANALYTICS = FederatedLearning(), FederatedAnalytics()
PAYLOAD_KIND_OBJECTS: dict[str, PayloadKind] = {kind.name: kind for kind in (FEDERATED_LEARNING, FEDERATED_ANALYTICS)}


def payload_kind(name: str) -> PayloadKind:
    """The kind named ``name``.

    Raises:
        ArchiveError: a kind the protocol does not know.
    """
    kind = PAYLOAD_KIND_OBJECTS.get(name)
    if kind is None:
        raise ArchiveError(f"Payload kind {name[:80]!r} is not supported; expected {KIND_FEDERATED_LEARNING!r} or "
                           f"{KIND_FEDERATED_ANALYTICS!r}.")
    return kind


def supported_kind(name: str) -> PayloadKind:
    """The kind named ``name`` when this version handles it; else :class:`ArchiveError` saying why."""
    kind = payload_kind(name)
    if not kind.supported:
        raise ArchiveError(kind.member_rule())  # an unsupported kind's rule is its refusal
    return kind


def control_problem(archive: Archive, algorithm: str, takes_controls: bool | None = None) -> str | None:
    """Why a learning upload's ``control_<n>`` members do not belong in a branch running ``algorithm``, or None.

    Controls are SCAFFOLD's (``takes_controls``; by default: ``algorithm`` is in
    :data:`~.protocol.CONTROLLED_ALGORITHMS`): any other branch refuses them (the upload would silently lose
    them). In a SCAFFOLD branch they may be absent (an official client's upload, which counts with a zero
    control update); present, :meth:`FederatedLearning.validate` checked their layout.

    >>> control_problem(Archive([np.zeros(2)], 1.0, controls=[np.zeros(2)]), "fedavg")[:40]
    "control_<n> members are SCAFFOLD's contr"
    >>> control_problem(Archive([np.zeros(2)], 1.0), "scaffold") is None
    True
    """
    takes = algorithm in CONTROLLED_ALGORITHMS if takes_controls is None else takes_controls
    if archive.controls and not takes:
        return (f"control_<n> members are SCAFFOLD's control updates, and this branch runs {algorithm!r}; send "
                "layers and weighting only (a leaf learns the branch's algorithm from its branch config).")
    return None


def validate_upload(archive: Archive, expected: Sequence[LayerSpec] | None = None) -> None:
    """Everything an upload must satisfy before it may count in a round: its kind's :meth:`PayloadKind.validate`."""
    payload_kind(archive.kind).validate(archive, expected)


__all__ = ["PayloadKind", "FederatedLearning", "FederatedAnalytics", "FEDERATED_LEARNING", "FEDERATED_ANALYTICS",
           "PAYLOAD_KIND_OBJECTS", "payload_kind", "supported_kind", "validate_upload",
           "control_problem", "SMALL_KEY_BYTES",
           "FIELD_DTYPE_KINDS", "FIELD_NAME_REFUSED", "MAX_FIELD_NAME", "RESERVED_FIELD_NAMES", "field_name_problem", "field_array"]
