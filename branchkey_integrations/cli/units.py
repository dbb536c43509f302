"""Sizes as ``branchkey-local`` reads and prints them: megabytes of 10^6 bytes."""

from __future__ import annotations


def bytes_of(megabytes: float | None) -> int | None:
    """MB (10^6 bytes, as the CLI prints sizes) as a byte count, or None."""
    return None if megabytes is None else max(int(megabytes * 1e6), 1)


def megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def model_limit(max_model_bytes: int | None) -> str:
    if max_model_bytes is None:
        return "twice the branch's first aggregate + 16 MiB (learned), inflated; larger ones are refused"
    return f"{megabytes(max_model_bytes)} inflated; larger ones are refused"
