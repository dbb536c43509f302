"""The rows of branchkey-local's store as immutable values: branches, leaves, rounds, files, uploads.

They are what :class:`~branchkey_integrations.server.store.Store` returns and what the round
logic and the HTTP handlers pass around, so they live apart from the SQL that reads them; a
layer layout travels as JSON text in the database and as :class:`LayerSpec` lists in memory.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from ..core.protocol import KIND_FEDERATED_LEARNING
from ..core.wire import LayerSpec


@dataclass(frozen=True)
class Branch:
    id: str
    tree_id: str
    name: str
    min_leaves: int | None
    round_deadline_s: float | None
    algorithm: str
    run_status: str
    run_number: int
    created_at: str
    updated_at: str
    strategy_params: str = "{}"  # JSON text, as stored: the checked parameters of ``algorithm``
    max_model_bytes: int | None = None  # the operator's limit on an upload's inflated size; None: learned

    @property
    def params(self) -> dict[str, float]:
        return json.loads(self.strategy_params)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "strategy_params": self.params}


@dataclass(frozen=True)
class Leaf:
    id: str
    name: str
    session_token: str
    owner_id: str
    tree_id: str
    branch_id: str

    def credentials(self) -> dict[str, str]:
        """The six credential fields, token included: hand out only to the leaf's owner."""
        return {k: getattr(self, k) for k in ("id", "name", "session_token", "owner_id", "tree_id", "branch_id")}

    def public(self) -> dict[str, str]:
        return {k: getattr(self, k) for k in ("id", "name", "owner_id", "tree_id", "branch_id")}


@dataclass(frozen=True)
class Round:
    branch_id: str
    run_number: int
    round_index: int
    status: str
    aggregate_id: str | None
    first_upload_at: float | None
    opened_at: str
    closed_at: str | None
    strategy: str | None = None  # what aggregated the round (set when it closes)
    strategy_note: str | None = None  # why it was not the branch's strategy (a fallback), or None


@dataclass(frozen=True)
class FileRecord:
    id: str
    kind: str
    branch_id: str
    leaf_id: str | None
    run_number: int
    round_index: int
    path: str
    size: int
    sha256: str
    specs: str
    metadata: str | None
    created_at: str
    removed_at: str | None = None  # set when retention deleted the file (the row stays)
    payload_kind: str = KIND_FEDERATED_LEARNING  # an analytics file's ``specs`` is its field layout

    @property
    def layer_specs(self) -> list[LayerSpec]:
        return specs_from_json(self.specs)


@dataclass(frozen=True)
class UploadInput:
    """One upload counted in a round: what aggregation needs."""

    leaf_id: str
    file_id: str
    path: Path
    weighting: float
    specs: list[LayerSpec]


class ModelSizeLimit(NamedTuple):
    """How many bytes an upload to a branch may inflate to (as its zip directory declares), and why that many."""

    max_bytes: int
    source: str


class StateUpdate(NamedTuple):
    """A server optimizer's new moments (temporary files, None where unused) and what they belong to."""

    strategy: str
    params: Mapping[str, float]
    m_temp: Path | None
    v_temp: Path | None


def specs_to_json(specs: Sequence[LayerSpec]) -> str:
    return json.dumps([{"dtype": s.dtype.str, "shape": list(s.shape)} for s in specs])


def specs_from_json(text: str) -> list[LayerSpec]:
    """The layer layout stored as JSON; parsed once per distinct text, as a round's K uploads (and every
    round of a run) share one layout and each fold lists the round's uploads again."""
    return list(_parsed_specs(text))


@functools.lru_cache(maxsize=256)
def _parsed_specs(text: str) -> tuple[LayerSpec, ...]:
    return tuple(LayerSpec(tuple(item["shape"]), np.dtype(item["dtype"])) for item in json.loads(text))


__all__ = ["Branch", "Leaf", "Round", "FileRecord", "UploadInput", "ModelSizeLimit", "StateUpdate", "specs_to_json",
           "specs_from_json"]
