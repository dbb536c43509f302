"""Local snapshots of received aggregates: one ``round_<n>.safetensors`` file per round.

This module owns the snapshot file (its name, its metadata, that it holds named tensors) and the one optional
dependency it needs. safetensors is an extra, not a core dependency, so :func:`require_safetensors` lets a
callback refuse ``snapshot_dir`` when it is constructed instead of failing after the first hour of training.
The wire format stays NPZ; snapshots are what resume and audit read (named, memory-mapped, no pickle).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)


def require_safetensors(snapshot_dir: Path, extra: str | None = None) -> None:
    """Raise ImportError, naming what to install, when safetensors cannot be imported."""
    try:
        importlib.import_module("safetensors.numpy")
    except ImportError as exc:
        install = f"pip install 'branchkey-integrations[{extra}]'" if extra else "pip install safetensors"
        raise ImportError(
            f"snapshot_dir={str(snapshot_dir)!r} writes safetensors files, but safetensors is not installed. "
            f"Install it ({install}) or pass snapshot_dir=None."
        ) from exc


def save_snapshot(directory: Path, round_number: int, aggregation_id: str, layers: Sequence[np.ndarray],
                  names: Sequence[str]) -> Path:
    """Write the aggregate ``layers`` of round ``round_number`` as ``round_<n>.safetensors``: named tensors,
    loadable without pickle."""
    from safetensors.numpy import save_file  # optional: checked by require_safetensors at construction

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"round_{round_number:05d}.safetensors"
    save_file(dict(zip(names, layers)), str(path),
              metadata={"aggregation_id": str(aggregation_id), "round": str(round_number)})
    logger.debug("Saved the aggregate of round %d to %s", round_number, path)
    return path


__all__ = ["require_safetensors", "save_snapshot"]
