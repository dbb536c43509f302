"""``branchkey-local leaf add|list|revoke|rotate`` (a leaf's lifecycle) and ``admin-token rotate``.

Like ``run`` and ``round``, each acts through the live server when one serves the data directory (so a
revoked leaf's WebSocket is closed and its RabbitMQ user deleted at once), else directly in the store.
Credential files are written with mode 0600; no token is ever printed. Every action is recorded in the
audit trail (by the server, with the caller's address; in the store with ``cli`` as its origin).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..core.errors import InvalidValueError, RecordNotFoundError
from ..core.protocol import ADMIN_PREFIX
from ..server.durable import write_private_file
from ..server.store import ADMIN_TOKEN_FILE, Store
from .failures import CliError
from .live import admin_call, live_server, open_existing_store, resolve_branch

#: the audit trail's origin for an action a command made in the store itself (no live server)
CLI_ORIGIN = "cli"


def _credentials_path(directory: str, name: str, force: bool) -> Path:
    path = Path(directory) / f"{name}.json"
    if path.exists() and not force:
        raise CliError(f"{path} already exists; pass --force to overwrite it, or another --credentials-dir")
    return path


def _write_credentials(path: Path, credentials: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private_file(path, json.dumps(credentials, indent=2) + "\n")


def cmd_leaf(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir)
    store = open_existing_store(data_dir)
    try:
        branch = resolve_branch(store, args.branch_id)
        if args.leaf_command == "list":
            return _list(store, branch.id, args.json)
        live = live_server(data_dir)
        how = f"through {live[0]}" if live else "in the store (no live server)"
        if args.leaf_command == "add":
            return _add(store, live, branch.id, args, how)
        if args.leaf_command == "revoke":
            return _revoke(store, live, branch.id, args, how)
        return _rotate(store, live, branch.id, args, how)
    except (InvalidValueError, RecordNotFoundError) as exc:
        raise CliError(str(exc)) from exc
    finally:
        store.close()


def _list(store: Store, branch_id: str, as_json: bool) -> int:
    leaves = store.leaf_states(branch_id)
    if as_json:
        print(json.dumps(leaves, indent=2))
        return 0
    for leaf in leaves:
        state = f"revoked {leaf['revoked_at']}" if leaf["revoked_at"] else "active"
        print(f"{leaf['name']:<12} {leaf['id']}  created {leaf['created_at']}  {state}")
    return 0


def _add(store: Store, live: tuple[str, str] | None, branch_id: str, args: argparse.Namespace, how: str) -> int:
    if live:
        leaves = admin_call(live, "POST", f"{ADMIN_PREFIX}/branches/{branch_id}/leaves", {"count": args.count})["leaves"]
    else:
        leaves = [leaf.credentials() for leaf in store.create_leaves(branch_id, args.count)]
        store.record_audit("leaf.add", branch_id, CLI_ORIGIN, {"count": len(leaves),
                                                               "leaves": [leaf["name"] for leaf in leaves[:50]]})
    for leaf in leaves:
        path = _credentials_path(args.credentials_dir, leaf["name"], args.force)
        _write_credentials(path, leaf)
        print(f"leaf {leaf['name']} ({leaf['id']}) added {how}: {path}")
    print("it counts in rounds from the next round on (at once while the open round holds no upload)")
    return 0


def _revoke(store: Store, live: tuple[str, str] | None, branch_id: str, args: argparse.Namespace, how: str) -> int:
    if live:
        result = admin_call(live, "POST", f"{ADMIN_PREFIX}/branches/{branch_id}/leaves/{args.leaf}/revoke",
                            {"drop_upload": args.drop_upload, "note": args.note or ""})
        leaf, dropped = result["leaf"], result["dropped"]
        extra = f"; {result['websockets_closed']} WebSocket(s) closed, RabbitMQ user: {result['amqp']}"
    else:
        revoked = store.revoke_leaf(branch_id, args.leaf)
        leaf, dropped = revoked.public(), []
        if args.drop_upload:
            try:
                _, _, dropped, paths = store.drop_uploads(branch_id, revoked.id, args.note or "leaf revoked")
                store.remove_files(paths)
            except RecordNotFoundError:  # no upload in the open round
                dropped = []
        store.record_audit("leaf.revoke", revoked.id, CLI_ORIGIN, {"branch_id": branch_id, "leaf": revoked.name,
                                                                   "drop_upload": args.drop_upload, "dropped": dropped})
        extra = "; a RabbitMQ user of it is removed when a server with --amqp-url starts"
    kept = "dropped" if dropped else ("none in the open round" if args.drop_upload else "kept")
    print(f"leaf {leaf['name']} ({leaf['id']}) revoked {how}: its token is refused from now on; open-round upload "
          f"{kept}{extra}")
    return 0


def _rotate(store: Store, live: tuple[str, str] | None, branch_id: str, args: argparse.Namespace, how: str) -> int:
    if live:
        credentials = admin_call(live, "POST", f"{ADMIN_PREFIX}/branches/{branch_id}/leaves/{args.leaf}/rotate")["leaf"]
    else:
        rotated = store.rotate_leaf(branch_id, args.leaf)
        credentials = rotated.credentials()
        store.record_audit("leaf.rotate", rotated.id, CLI_ORIGIN, {"branch_id": branch_id, "leaf": rotated.name})
    path = Path(args.credentials_dir) / f"{credentials['name']}.json"
    _write_credentials(path, credentials)
    print(f"leaf {credentials['name']} ({credentials['id']}) rotated {how}: new credentials in {path}; the old "
          f"token is refused from now on")
    return 0


def cmd_admin_token(args: argparse.Namespace) -> int:
    """``admin-token rotate``: a new admin token in ``<data_dir>/admin_token``; the old one is refused."""
    data_dir = Path(args.data_dir)
    live = live_server(data_dir)
    if live:
        answer: dict[str, Any] = admin_call(live, "POST", f"{ADMIN_PREFIX}/admin-token/rotate")
        how = f"through {live[0]} (dashboard sessions ended)"
        del answer["token"]  # the server wrote the file; never printed
    else:
        store = open_existing_store(data_dir)
        try:
            store.rotate_admin_token()
            store.record_audit("admin_token.rotate", "admin", CLI_ORIGIN)
        finally:
            store.close()
        how = "in the store (no live server)"
    print(f"admin token rotated {how}: the new one is in {data_dir / ADMIN_TOKEN_FILE} (mode 0600); the old one "
          f"is refused from now on")
    return 0
