"""Leaf credentials: the six fields that identify a BranchKey leaf.

Loaded from a dict, a JSON file (the format the platform and ``branchkey-local init``
write), or environment variables. The session token is a secret: it never appears in
``repr``, ``str`` or logs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Union

from .errors import CredentialsError

FIELDS = ("id", "name", "session_token", "owner_id", "tree_id", "branch_id")
ENV_PREFIX = "BRANCHKEY_"
ENV_FILE_VARIABLE = "BRANCHKEY_CREDENTIALS"


@dataclass(frozen=True)
class Credentials:
    """The credentials of one leaf.

    Example:
        >>> creds = Credentials.from_dict({
        ...     "id": "leaf-1", "name": "hospital-a", "session_token": "s3cret",
        ...     "owner_id": "me", "tree_id": "tree-1", "branch_id": "branch-1"})
        >>> creds.name
        'hospital-a'
        >>> "s3cret" in repr(creds)
        False
    """

    id: str
    name: str
    session_token: str = field(repr=False)
    owner_id: str
    tree_id: str
    branch_id: str

    def __post_init__(self) -> None:
        for name in FIELDS:
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                shown = "<hidden>" if name == "session_token" else repr(value)
                raise CredentialsError(
                    f"Credential field {name!r} must be a non-empty string. Received: {name}={shown}"
                )
        if ":" in self.id:
            raise CredentialsError(
                f"Credential field 'id' must not contain ':' (it is sent as 'Bearer id:token'). "
                f"Received: id={self.id!r}"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Credentials":
        """Build credentials from a mapping with the six fields; extra keys are ignored."""
        if not isinstance(data, Mapping):
            raise CredentialsError(f"Expected a mapping of credential fields. Received: {type(data).__name__}")
        missing = [name for name in FIELDS if name not in data]
        if missing:
            raise CredentialsError(
                f"Credentials are missing field(s) {', '.join(missing)}; expected all of {', '.join(FIELDS)}."
            )
        return cls(**{name: data[name] for name in FIELDS})

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike]) -> "Credentials":
        """Read credentials from a JSON file, as written by the platform or ``branchkey-local init``."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise CredentialsError(f"Credentials file not found: {path}") from exc
        except json.JSONDecodeError as exc:
            raise CredentialsError(f"Credentials file {path} is not valid JSON: {exc}") from exc
        try:
            return cls.from_dict(data)
        except CredentialsError as exc:
            raise CredentialsError(f"{path}: {exc}") from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Credentials":
        """Read credentials from ``BRANCHKEY_CREDENTIALS`` (a JSON file path) or ``BRANCHKEY_<FIELD>`` variables."""
        environ = os.environ if environ is None else environ
        if environ.get(ENV_FILE_VARIABLE):
            return cls.from_file(environ[ENV_FILE_VARIABLE])
        missing = [ENV_PREFIX + name.upper() for name in FIELDS if not environ.get(ENV_PREFIX + name.upper())]
        if missing:
            raise CredentialsError(
                f"Environment variable(s) {', '.join(missing)} are not set; set all six "
                f"BRANCHKEY_<FIELD> variables or {ENV_FILE_VARIABLE}=<path to a credentials JSON file>."
            )
        return cls(**{name: environ[ENV_PREFIX + name.upper()] for name in FIELDS})

    @classmethod
    def load(cls, source: "CredentialsLike | None" = None) -> "Credentials":
        """Accept whatever a user is likely to pass: Credentials, a dict, a JSON path, or None (environment)."""
        if isinstance(source, Credentials):
            return source
        if source is None:
            return cls.from_env()
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        if isinstance(source, (str, os.PathLike)):
            return cls.from_file(source)
        raise CredentialsError(
            "Expected Credentials, a dict, a path to a JSON file, or None (read the environment). "
            f"Received: {type(source).__name__}"
        )

    def to_dict(self) -> dict[str, str]:
        """The six fields as a dict (includes the token: write it only where secrets belong)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


CredentialsLike = Union[Credentials, Mapping[str, Any], str, os.PathLike]

__all__ = ["Credentials", "CredentialsLike", "FIELDS"]
