"""``branchkey-local init`` (a tree, a branch, N leaves and their credential files), ``branch strategy`` /
``branch max-model-mb`` (a branch's settings, between rounds), ``branch --field-op`` (how its analytics rounds
combine each field) and ``branch --codecs`` (what its uploads may be encoded with)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..core.errors import InvalidValueError
from ..core.protocol import ADMIN_PREFIX
from ..server.durable import write_private_file
from ..server.store import Branch, Store
from ..server.analytics import check_field_ops
from ..server.codec_policy import check_codecs
from ..server.strategies import check_strategy, strategy_for
from .failures import CliError
from .live import admin_call, change_branch, live_server
from .units import bytes_of, model_limit


def strategy_of(args: argparse.Namespace) -> tuple[str, dict[str, float]]:
    """The checked ``(strategy, parameters)`` of ``--strategy``/``--strategy-param``, or a one-line CliError."""
    params = dict(args.strategy_param)
    try:
        check_strategy(args.strategy, params)
    except InvalidValueError as exc:
        raise CliError(str(exc)) from exc
    return args.strategy, params



def cmd_init(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir)
    out = Path(args.credentials_dir)
    targets = [out / f"leaf_{i}.json" for i in range(1, args.leaves + 1)]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not args.force:
        raise CliError(f"credential file(s) already exist: {', '.join(existing[:3])}; use --force or another --credentials-dir.")
    strategy_of(args)  # a bad parameter fails before anything is created
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    live = live_server(data_dir)
    branch, leaves = _init_via_server(live, args) if live else _init_in_store(data_dir, args)
    for path, credentials in zip(targets, leaves):
        write_private_file(path, json.dumps(credentials, indent=2) + "\n")
    print(f"branch  {branch['id']} ({branch['name']}, tree {branch['tree_id']}), run_status {branch['run_status']}")
    print(f"strategy {branch['algorithm']} {json.dumps(branch['strategy_params'])}")
    print(f"rounds  complete with {branch['min_leaves'] or 'all'} of {args.leaves} leaves"
          + (f", deadline {branch['round_deadline_s']} s" if branch["round_deadline_s"] else ""))
    print(f"models  uploads up to {model_limit(branch['max_model_bytes'])}")
    for path in targets:
        print(f"leaf    {path}")
    host_url = args.host_url or (live[0] if live else None)
    if host_url:
        print(f"host    leaves connect to {host_url}" + (" (https: give them the server certificate's CA bundle, "
                                                         "ssl=...)" if host_url.startswith("https://") else ""))
    if not live:
        print(f"serve   branchkey-local serve --data-dir {data_dir}")
    strategy = strategy_for(branch["algorithm"], branch["strategy_params"])
    too_few = strategy.fallback_reason(branch["min_leaves"] or args.leaves)
    if too_few:  # every round would fall back: say it now, not only in each round's record
        print(f"branchkey-local init: warning: rounds of {branch['min_leaves'] or args.leaves} uploads will fall back "
              f"to fedavg ({too_few})", file=sys.stderr)
    return 0


def _init_in_store(data_dir: Path, args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, str]]]:
    store = Store(data_dir)
    try:
        tree = store.create_tree("local")
        strategy, params = strategy_of(args)
        branch = store.create_branch(tree["id"], args.branch_name, min_leaves=args.min_leaves,
                                     round_deadline_s=args.round_deadline, strategy=strategy, strategy_params=params,
                                     max_model_bytes=bytes_of(args.max_model_mb))
        leaves = store.create_leaves(branch.id, args.leaves)
    finally:
        store.close()
    return branch.to_dict(), [leaf.credentials() for leaf in leaves]


def _init_via_server(live: tuple[str, str], args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Create through the admin API so a server with a broker provisions the new leaves."""
    tree = admin_call(live, "POST", f"{ADMIN_PREFIX}/trees", {"name": "local"})
    strategy, params = strategy_of(args)
    branch = admin_call(live, "POST", f"{ADMIN_PREFIX}/trees/{tree['id']}/branches", {
        "name": args.branch_name, "min_leaves": args.min_leaves, "round_deadline_s": args.round_deadline,
        "strategy": strategy, "strategy_params": params, "max_model_bytes": bytes_of(args.max_model_mb)})
    leaves = admin_call(live, "POST", f"{ADMIN_PREFIX}/branches/{branch['id']}/leaves", {"count": args.leaves})
    return branch, leaves["leaves"]



def cmd_branch_strategy(args: argparse.Namespace) -> int:
    """``branch strategy NAME``: through the live server (under its branch lock), else in the store."""
    name, params = strategy_of(args)

    def in_store(store: Store, branch: Branch) -> tuple[dict[str, Any], str]:
        updated, stale = store.set_strategy(branch.id, name, params)
        store.remove_files(stale)
        return updated.to_dict(), "in the store (no live server)"

    def through_live(live: tuple[str, str], branch: Branch) -> tuple[dict[str, Any], str]:
        return (admin_call(live, "PUT", f"{ADMIN_PREFIX}/branches/{branch.id}/strategy",
                           {"strategy": name, "strategy_params": params}), f"through {live[0]}")

    branch, result, how = change_branch(args, in_store, through_live)
    print(f"branch {branch.id}: strategy {result['algorithm']} {json.dumps(result['strategy_params'])}, set {how}; "
          f"the next round aggregates with it")
    return 0


def cmd_branch_max_model(args: argparse.Namespace) -> int:
    """``branch max-model-mb MB|learn``: through the live server, else in the store."""
    value = bytes_of(args.megabytes)

    def in_store(store: Store, branch: Branch) -> tuple[dict[str, Any], str]:
        return store.set_max_model_bytes(branch.id, value).to_dict(), "in the store (no live server)"

    def through_live(live: tuple[str, str], branch: Branch) -> tuple[dict[str, Any], str]:
        return (admin_call(live, "PUT", f"{ADMIN_PREFIX}/branches/{branch.id}/max-model-bytes",
                           {"max_model_bytes": value}), f"through {live[0]}")

    branch, result, how = change_branch(args, in_store, through_live)
    print(f"branch {branch.id}: uploads up to {model_limit(result['max_model_bytes'])}, set {how}")
    return 0


def cmd_branch_codecs(args: argparse.Namespace) -> int:
    """``branch --codecs NAME,...``: through the live server, else in the store."""
    try:
        codecs = check_codecs(args.codecs)
    except InvalidValueError as exc:
        raise CliError(str(exc)) from exc

    def in_store(store: Store, branch: Branch) -> tuple[dict[str, Any], str]:
        return {"codecs": store.set_branch_codecs(branch.id, codecs)}, "in the store (no live server)"

    def through_live(live: tuple[str, str], branch: Branch) -> tuple[dict[str, Any], str]:
        return (admin_call(live, "PUT", f"{ADMIN_PREFIX}/branches/{branch.id}/codecs", {"codecs": codecs}),
                f"through {live[0]}")

    branch, result, how = change_branch(args, in_store, through_live)
    print(f"branch {branch.id}: accepts codecs {', '.join(result['codecs']) or 'none (plain NPZ only)'}, set {how}")
    return 0


def cmd_branch_field_ops(args: argparse.Namespace) -> int:
    """``branch --field-op NAME=OP ...`` (and ``--codecs``): through the live server (under its analytics lock),
    else in the store."""
    if args.codecs is not None and not args.data_dir:
        raise CliError("branch --codecs: give --data-dir DIR (or set BRANCHKEY_DATA_DIR).")
    if args.codecs is not None:
        cmd_branch_codecs(args)
        if not args.field_op:
            return 0
    if not args.field_op:
        raise CliError("branch: give an ACTION (strategy, max-model-mb), --field-op NAME=OP or --codecs NAME,... "
                       "(see branch --help).")
    if not args.data_dir:
        raise CliError("branch --field-op: give --data-dir DIR (or set BRANCHKEY_DATA_DIR).")
    ops: dict[str, str | None] = dict(args.field_op)
    try:
        check_field_ops({name: op for name, op in ops.items() if op is not None})
    except InvalidValueError as exc:
        raise CliError(str(exc)) from exc

    def in_store(store: Store, branch: Branch) -> tuple[dict[str, Any], str]:
        return {"field_ops": store.set_field_ops(branch.id, ops)}, "in the store (no live server)"

    def through_live(live: tuple[str, str], branch: Branch) -> tuple[dict[str, Any], str]:
        return (admin_call(live, "PUT", f"{ADMIN_PREFIX}/branches/{branch.id}/field-ops", {"field_ops": ops}),
                f"through {live[0]}")

    branch, result, how = change_branch(args, in_store, through_live)
    shown = ", ".join(f"{name}={op}" for name, op in result["field_ops"].items()) or "none"
    print(f"branch {branch.id}: field operations {shown}, set {how}; the next analytics upload is checked by them")
    return 0
