"""``branchkey-local run`` (start, pause or stop a branch's run), ``round`` (drop an upload from the open
round, or reset it) and ``status`` (branches, rounds, progress, metrics and disk use, as text or JSON)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..core.errors import InvalidValueError, RecordNotFoundError
from ..core.protocol import ADMIN_PREFIX
from ..server.analytics_report import analytics_result, field_ops_lines, result_lines
from ..server.history import latest_metrics, metric_summary
from ..server.progress import RoundProgress, round_progress
from ..server.store import Branch, Store
from .failures import CliError
from .live import admin_call, change_branch, live_server, open_existing_store, resolve_branch
from .units import megabytes


def cmd_run(args: argparse.Namespace) -> int:
    def in_store(store: Store, branch: Branch) -> tuple[dict[str, Any], str]:
        changed = store.set_run_status(branch.id, args.status)
        return ({"run_status": changed.run_status, "run_number": changed.run_number},
                "in the store (no live server; leaves learn it when they next ask)")

    def through_live(live: tuple[str, str], branch: Branch) -> tuple[dict[str, Any], str]:
        return (admin_call(live, "POST", f"{ADMIN_PREFIX}/branches/{branch.id}/run", {"run_status": args.status}),
                f"through {live[0]} (leaves notified)")

    try:
        branch, result, how = change_branch(args, in_store, through_live)
    except InvalidValueError as exc:
        raise CliError(str(exc)) from exc
    print(f"branch {branch.id}: run_status {result['run_status']}, run_number {result['run_number']}, set {how}")
    return 0



def cmd_round(args: argparse.Namespace) -> int:
    """``round drop-upload LEAF`` / ``round reset``: through the live server (so its running sum and the
    leaves' view follow), else directly in the store."""
    data_dir = Path(args.data_dir)
    leaf = getattr(args, "leaf", None)
    store = open_existing_store(data_dir)
    try:
        branch = resolve_branch(store, args.branch_id)
        live = live_server(data_dir)
        if live is None:
            run_number, round_index, dropped, paths = store.drop_uploads(branch.id, leaf, args.note or "")
            store.remove_files(paths)
            result: dict[str, Any] = {"run_number": run_number, "round_index": round_index, "dropped": dropped}
            how = "in the store (no live server)"
        else:
            rounds = f"{ADMIN_PREFIX}/branches/{branch.id}/rounds/open"
            body = {"note": args.note or ""}
            result = (admin_call(live, "POST", f"{rounds}/reset", body) if leaf is None else
                      admin_call(live, "DELETE", f"{rounds}/uploads/{leaf}", body))
            how = f"through {live[0]}"
    except (InvalidValueError, RecordNotFoundError) as exc:
        raise CliError(str(exc)) from exc
    finally:
        store.close()
    print(f"branch {branch.id} run {result['run_number']} round {result['round_index'] + 1}: dropped the upload(s) of "
          f"{', '.join(result['dropped']) or 'nobody'} {how}; they see why in the round's progress and may upload again")
    return 0



def cmd_status(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir)
    store = open_existing_store(data_dir)
    try:
        live = live_server(data_dir)
        if args.json:
            print(json.dumps(status_document(store, live), indent=2, default=str))
            return 0
        print(f"server  {live[0] if live else 'not running'}{tls_note(live)}")
        disk = store.disk_usage()
        print(f"disk    {megabytes(sum(disk.values()))} in {data_dir}: uploads {megabytes(disk['uploads'])}, "
              f"aggregates {megabytes(disk['aggregates'])}, database {megabytes(disk['database'])}, "
              f"optimizer state {megabytes(disk['optimizer_state'])}, other {megabytes(disk['other'])}")
        for branch in store.list_branches():
            leaves = store.list_leaves(branch.id)
            print(f"branch  {branch.id} ({branch.name}): run_status {branch.run_status}, run {branch.run_number}, "
                  f"{len(leaves)} leaves, round needs {store.required_uploads(branch)}")
            for line in round_progress(store, branch.id).lines():
                print(f"  {line}")
            for item in store.list_rounds(branch.id)[-5:]:
                print(f"  run {item['run_number']} round {item['round_index'] + 1}: {item['status']}, "
                      f"{item['upload_count']} upload(s), aggregate {item['aggregate_id'] or '-'}")
            result = analytics_result(store, branch.id)  # the round view's lines named its round: the table here
            for line in result_lines(result, head=False) if result else field_ops_lines(store.field_ops(branch.id)):
                print(f"  {line}")
    finally:
        store.close()
    return 0


def status_document(store: Store, live: tuple[str, str] | None) -> dict[str, Any]:
    """What ``status --json`` prints: the server's URL (or null) and every branch with all its rounds, and its
    analytics: the field operations, the round view's analytics progress and the latest result."""
    branches = [{
        "id": branch.id, "name": branch.name, "run_status": branch.run_status, "run_number": branch.run_number,
        "leaves": len(store.list_leaves(branch.id)), "required_uploads": store.required_uploads(branch),
        "metrics": _aggregated_metrics(store, branch.id),
        "progress": _progress(round_progress(store, branch.id)),
        "strategy": branch.algorithm, "strategy_params": branch.params,
        "rounds": [{"round": item["round_index"] + 1} | {
            key: item.get(key) for key in ("run_number", "round_index", "status", "upload_count", "aggregate_id",
                                           "strategy", "strategy_note")} for item in store.list_rounds(branch.id)],
        "analytics": _analytics(store, branch),
    } for branch in store.list_branches()]
    return {"server": live[0] if live else None, "tls": bool(live and live[0].startswith("https://")),
            "disk": store.disk_usage(), "branches": branches, "audit": store.latest_audit(AUDIT_SHOWN)}


#: the latest audit-trail entries ``status --json`` shows (the admin API's /admin/v1/audit has them all)
AUDIT_SHOWN = 50


def tls_note(live: tuple[str, str] | None) -> str:
    """What leaves need to reach the live server: https and the CA of its certificate, or plain http."""
    if live is None:
        return ""
    if live[0].startswith("https://"):
        return "  (TLS: leaves need an https:// host and, for a private CA, its bundle: Client(ssl=...))"
    return "  (plain HTTP: across a network, serve with --tls-cert/--tls-key or behind a TLS proxy)"


def _progress(progress: RoundProgress) -> dict[str, Any]:
    """The round view as the leaves get it, plus what people read: ``round`` (from 1 within the run, as the
    callbacks, ``simulate`` and the dashboard count; ``round_index`` is the protocol's, from 0), the rounds
    ``aggregated`` in the run, and ``state``, the status line (a finished run reads as such, not as stuck)."""
    return progress.to_dict() | {"round": progress.round, "aggregated": progress.aggregated, "state": progress.state()}


def _analytics(store: Store, branch: Branch) -> dict[str, Any]:
    return {"field_ops": store.field_ops(branch.id), "progress": round_progress(store, branch.id).analytics,
            "result": analytics_result(store, branch.id)}


def _aggregated_metrics(store: Store, branch_id: str) -> dict[str, Any]:
    """The latest run's metrics as the dashboard plots them: per mode/metric and round, the sample-weighted mean."""
    summary = metric_summary(store, branch_id)
    latest = {key: {"round": value["round_index"] + 1} | value for key, value in latest_metrics(summary).items()}
    return {"run_number": summary["run_number"], "latest": latest,  # "rounds" are round indexes, "round_numbers" from 1
            "series": [{k: s[k] for k in ("mode", "metric", "rounds", "mean")} | {"round_numbers": [
                index + 1 for index in s["rounds"]]} for s in summary["series"]]}
