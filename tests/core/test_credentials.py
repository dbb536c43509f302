"""Credentials: every source, every missing field named, the token never shown."""

import json
import logging

import pytest

from branchkey_integrations.core.credentials import Credentials
from branchkey_integrations.core.errors import CredentialsError

FIELDS = {"id": "leaf-1", "name": "site-a", "session_token": "tok-SECRET-123", "owner_id": "owner",
          "tree_id": "tree-1", "branch_id": "branch-1"}


def test_from_dict_file_and_env_agree(tmp_path):
    path = tmp_path / "leaf.json"
    path.write_text(json.dumps(FIELDS))
    env = {f"BRANCHKEY_{k.upper()}": v for k, v in FIELDS.items()}
    a, b, c = Credentials.from_dict(FIELDS), Credentials.from_file(path), Credentials.from_env(env)
    assert a == b == c
    assert Credentials.from_env({"BRANCHKEY_CREDENTIALS": str(path)}) == a
    assert Credentials.load(str(path)) == Credentials.load(FIELDS) == Credentials.load(a) == a
    assert a.to_dict() == FIELDS


def test_missing_fields_are_named():
    partial = {k: v for k, v in FIELDS.items() if k not in ("tree_id", "session_token")}
    with pytest.raises(CredentialsError, match="session_token, tree_id"):
        Credentials.from_dict(partial)
    with pytest.raises(CredentialsError, match="BRANCHKEY_BRANCH_ID"):
        Credentials.from_env({f"BRANCHKEY_{k.upper()}": v for k, v in FIELDS.items() if k != "branch_id"})


def test_bad_values_and_files_get_clear_errors(tmp_path):
    with pytest.raises(CredentialsError, match="'name' must be a non-empty string"):
        Credentials.from_dict({**FIELDS, "name": ""})
    with pytest.raises(CredentialsError, match="must not contain ':'"):
        Credentials.from_dict({**FIELDS, "id": "a:b"})
    with pytest.raises(CredentialsError, match="not found"):
        Credentials.from_file(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(CredentialsError, match="not valid JSON"):
        Credentials.from_file(tmp_path / "bad.json")
    with pytest.raises(CredentialsError, match="Received: int"):
        Credentials.load(42)


def test_token_never_in_repr_str_or_errors(caplog):
    creds = Credentials.from_dict(FIELDS)
    assert "tok-SECRET-123" not in repr(creds) and "tok-SECRET-123" not in str(creds)
    with pytest.raises(CredentialsError) as excinfo:
        Credentials.from_dict({**FIELDS, "session_token": 12345})
    assert "12345" not in str(excinfo.value)
    caplog.set_level(logging.DEBUG)
    logging.getLogger("test").info("creds: %s", creds)
    assert "tok-SECRET-123" not in caplog.text
