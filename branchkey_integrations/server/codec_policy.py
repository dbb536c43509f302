"""Which codecs a branch accepts: the names an operator may advertise, and the upload check against them.

An upload is checked from its zip directory alone, before anything is inflated: a member encoded with a codec
the branch does not advertise is refused (400) with that codec's name and the accepted ones. Stored and
deflate members (plain NPZ, what numpy and the official clients write) are always accepted.

Example:
    >>> check_codecs(["int8", "fp16"])
    ['int8', 'fp16']
    >>> check_codecs(["gzip"])
    Traceback (most recent call last):
    ...
    branchkey_integrations.core.errors.InvalidValueError: Expected codecs among ['bf16', 'fp16', 'int8'...
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Sequence

from ..core import wire
from ..core.errors import ArchiveError, InvalidValueError
from ..core.tensor_codecs import MARKED_METHOD, codec_names, codec_of

#: the codecs a branch may advertise: every registered one but stored and deflate (always accepted)
PLAIN = ("none", "stored", "deflate")


def advertisable() -> list[str]:
    """The codec names this server can decode and so advertise."""
    return [name for name in codec_names() if name not in PLAIN]


def check_codecs(codecs: Any) -> list[str]:
    """``codecs`` as a list of distinct codec names this server can decode.

    Raises:
        InvalidValueError: not a list of names, a name this server does not know, or one named twice.
    """
    known = advertisable()
    if not isinstance(codecs, (list, tuple)) or not all(isinstance(name, str) for name in codecs):
        raise InvalidValueError(f"Expected codecs to be a list of names among {known} (empty: plain NPZ only). "
                                f"Received: codecs={codecs!r:.80}")
    unknown = [name for name in codecs if name not in known]
    if unknown:
        raise InvalidValueError(f"Expected codecs among {known}. Received: "
                                f"{unknown[0]!r:.70} (install the [zstd] extra for shuffle-zstd).")
    repeated = sorted({name for name in codecs if list(codecs).count(name) > 1})
    if repeated:  # the OpenAPI document says uniqueItems: a repeated name is a mistake to name, not to fold
        raise InvalidValueError(f"Expected each codec once. Received: {repeated[0]!r} more than once in codecs={list(codecs)!r:.80}")
    return list(codecs)


def check_upload_codecs(path: Path, accepted: Sequence[str]) -> None:
    """Refuse the upload at ``path`` when a member is encoded with a codec outside ``accepted``.

    Raises:
        InvalidValueError: naming the member's codec and the accepted ones.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (*wire.CORRUPT_ZIP_ERRORS, OSError):
        return  # not a readable archive: the scan that follows says so
    for info in infos:
        if info.compress_type != MARKED_METHOD:
            continue
        try:
            name = codec_of(info.compress_type, info.extra, info.filename).name
        except ArchiveError as exc:
            raise InvalidValueError(f"Upload rejected: {exc}") from exc
        if name not in accepted:
            raise InvalidValueError(
                f"Upload rejected: {info.filename} is encoded with codec {name!r}, which this branch does not "
                f"accept; it accepts {sorted(accepted) or 'no codecs'} besides plain NPZ (stored, deflate). "
                "The branch's operator advertises codecs with: branchkey-local branch --codecs NAME,...")


__all__ = ["advertisable", "check_codecs", "check_upload_codecs", "PLAIN"]
