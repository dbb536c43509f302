"""The admin API of branchkey-local (``/admin/v1``, ``Authorization: Bearer {admin_token}``).

Trees, branches and leaves are created here (a branch's settings: ``min_leaves``, ``round_deadline_s``,
its strategy, ``max_model_bytes``, the last two changeable later); runs are started, paused and stopped here (the
CLI's ``run`` goes through it when a server is live, so leaves are notified); rounds, uploads,
aggregates and metrics can be read (metrics a page at a time: they can outgrow one answer).
An operator unlocks a round with
``DELETE .../branches/{branch_id}/rounds/open/uploads/{leaf id or name}`` (drop one upload) or
``POST .../branches/{branch_id}/rounds/open/reset`` (drop them all; the round keeps its number),
each with an optional ``{"note": ...}`` that the leaves see in the round's progress.
``DELETE /admin/v1/trees/{tree_id}/broker`` removes what the server made for a tree in RabbitMQ
(leaf users and queues, the tree's vhost), so a throwaway tree (a demo run's, say) leaves nothing
behind on a shared broker.

Handlers only translate between HTTP and the store or the round state machine; store errors
(:class:`RecordNotFoundError`, :class:`InvalidValueError`) become 404 and 400 in the one table
of :mod:`~branchkey_integrations.server.httpio`.
"""

from __future__ import annotations

import functools
from typing import Any, Awaitable, Callable

from aiohttp import web

from ..core.errors import BrokerError
from ..core.protocol import ADMIN_PREFIX, KIND_FEDERATED_ANALYTICS, STOP
from .analytics import check_field_ops
from .codec_policy import check_codecs
from .httpio import HttpProblem, is_decimal, ok, read_json_object
from .lifecycle import record_action
from .state import MAX_METRICS_PAGE, METRICS_PAGE, Server, server_of
from .store import Store
from .strategies import DEFAULT_STRATEGY

AdminHandler = Callable[[web.Request, Server], Awaitable[web.Response]]


def admin(handler: AdminHandler) -> Callable[[web.Request], Awaitable[web.Response]]:
    """Wrap an admin handler: check the admin token, then hand it the server."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.Response:
        server = server_of(request)
        server.auth.authenticate_admin(request)
        return await handler(request, server)

    return wrapped


@admin
async def create_tree(request: web.Request, server: Server) -> web.Response:
    body = await read_json_object(request)
    tree = await server.blocking(server.store.create_tree, body.get("name", "local"), body.get("owner_id"))
    return ok(tree, status=201)


@admin
async def list_trees(request: web.Request, server: Server) -> web.Response:
    return ok({"trees": await server.blocking(server.store.list_trees)})


@admin
async def remove_tree_broker(request: web.Request, server: Server) -> web.Response:
    """Delete the tree's broker state; the tree stays in the store (a restart provisions it again)."""
    tree = await server.blocking(server.store.require_tree, request.match_info["tree_id"])
    leaves = await server.blocking(server.store.list_leaves, tree_id=tree["id"])
    try:
        removed = await server.notifier.forget_tree(tree["id"], leaves)
    except BrokerError as exc:
        raise HttpProblem(502, f"RabbitMQ refused to remove tree {tree['id']}: {exc}") from exc
    await record_action(request, server, "tree.remove_broker", tree["id"])
    return ok({"tree_id": tree["id"], "amqp": removed, "leaves": len(leaves) if removed else 0})


@admin
async def create_branch(request: web.Request, server: Server) -> web.Response:
    body = await read_json_object(request)
    branch = await server.blocking(
        server.store.create_branch, request.match_info["tree_id"], body.get("name", "main"),
        min_leaves=_whole(body.get("min_leaves")), round_deadline_s=body.get("round_deadline_s"),
        strategy=body.get("strategy", DEFAULT_STRATEGY), strategy_params=_params(body),
        max_model_bytes=_whole(body.get("max_model_bytes")),
    )
    await record_action(request, server, "branch.create", branch.id, name=branch.name, strategy=branch.algorithm)
    return ok(branch.to_dict(), status=201)


def _whole(value: Any) -> Any:
    """A JSON number with no fraction as an int: JSON Schema's "integer" (and JavaScript) count 3.0 as 3."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _params(body: dict[str, Any]) -> dict[str, Any] | None:
    """The body's ``strategy_params``: an object or absent (null)."""
    params = body.get("strategy_params")
    if params is not None and not isinstance(params, dict):
        raise HttpProblem(400, f"Expected strategy_params to be a JSON object such as {{\"eta\": 0.01}} or absent. "
                               f"Received: {params!r:.80}")
    return params


@admin
async def set_strategy(request: web.Request, server: Server) -> web.Response:
    """Change the branch's strategy between rounds (409 while its open round holds uploads)."""
    body = await read_json_object(request)
    branch_id = request.match_info["branch_id"]
    async with server.rounds.lock(branch_id):  # no upload is committed while the change is checked and made
        branch, stale = await server.blocking(server.store.set_strategy, branch_id, body.get("strategy"), _params(body))
    await server.blocking(server.store.remove_files, stale)
    await record_action(request, server, "branch.strategy", branch_id, strategy=branch.algorithm,
                        strategy_params=branch.params)
    return ok(branch.to_dict())


@admin
async def set_max_model_bytes(request: web.Request, server: Server) -> web.Response:
    """Set how many bytes an upload to the branch may inflate to (``{"max_model_bytes": N}``), or learn it (null)."""
    body = await read_json_object(request)
    if "max_model_bytes" not in body:
        raise HttpProblem(400, "Expected {\"max_model_bytes\": N} (bytes an upload may inflate to) or "
                               "{\"max_model_bytes\": null} (learned from the branch's first aggregate).")
    branch = await server.blocking(server.store.set_max_model_bytes, request.match_info["branch_id"],
                                   _whole(body["max_model_bytes"]))
    await record_action(request, server, "branch.max_model_bytes", branch.id, max_model_bytes=branch.max_model_bytes)
    return ok(branch.to_dict())


@admin
async def list_branches(request: web.Request, server: Server) -> web.Response:
    branches = await server.blocking(server.store.list_branches)
    return ok({"branches": [b.to_dict() for b in branches]})


@admin
async def get_branch(request: web.Request, server: Server) -> web.Response:
    branch = await server.blocking(server.store.require_branch, request.match_info["branch_id"])
    leaves = await server.blocking(server.store.list_leaves, branch.id)
    field_ops = await server.blocking(server.store.field_ops, branch.id)
    codecs = await server.blocking(server.store.branch_codecs, branch.id)
    return ok({**branch.to_dict(), "leaves": [leaf.public() for leaf in leaves], "field_ops": field_ops, "codecs": codecs,
               "connected_websockets": server.notifier.connected(branch.id)})


@admin
async def set_codecs(request: web.Request, server: Server) -> web.Response:
    """Set the codecs the branch advertises and accepts uploads in: ``{"codecs": ["int8", ...]}`` (empty: none)."""
    body = await read_json_object(request)
    codecs = check_codecs(body.get("codecs"))
    branch = await server.blocking(server.store.require_branch, request.match_info["branch_id"])
    result = await server.blocking(server.store.set_branch_codecs, branch.id, codecs)
    await record_action(request, server, "branch.codecs", branch.id, codecs=result)
    return ok({"branch_id": branch.id, "codecs": result})


@admin
async def set_field_ops(request: web.Request, server: Server) -> web.Response:
    """Set how analytics rounds combine fields: ``{"field_ops": {"name": "sum"|"min"|"max"|"must_match"|null}}``
    (null removes a field's operation); the next analytics upload is checked by them."""
    body = await read_json_object(request)
    ops = body.get("field_ops")
    if not isinstance(ops, dict) or not ops:
        raise HttpProblem(400, "Expected {\"field_ops\": {\"NAME\": \"sum\"|\"min\"|\"max\"|\"must_match\"|null, ...}}. "
                               f"Received: field_ops={ops!r:.80}")
    branch = await server.blocking(server.store.require_branch, request.match_info["branch_id"])
    check_field_ops({name: op for name, op in ops.items() if op is not None})
    async with server.analytics.lock(branch.id):  # no analytics upload is checked while they change
        result = await server.blocking(server.store.set_field_ops, branch.id, ops)
    await record_action(request, server, "branch.field_ops", branch.id, changed=ops)
    return ok({"branch_id": branch.id, "field_ops": result})


@admin
async def create_leaves(request: web.Request, server: Server) -> web.Response:
    body = await read_json_object(request)
    prefix = body.get("name_prefix", "leaf")
    if not isinstance(prefix, str) or not prefix.strip():
        raise HttpProblem(400, f"Expected name_prefix to be a non-blank text such as 'site' (leaves site_1, site_2, "
                               f"...) or absent ('leaf'). Received: {prefix!r:.80}")
    leaves = await server.blocking(server.store.create_leaves, request.match_info["branch_id"],
                                   _whole(body.get("count", 1)), name_prefix=prefix)
    await server.notifier.provision(leaves)
    await record_action(request, server, "leaf.add", request.match_info["branch_id"], count=len(leaves),
                        leaves=[leaf.name for leaf in leaves[:50]])  # one action, however many leaves
    return ok({"leaves": [leaf.credentials() for leaf in leaves]}, status=201)


@admin
async def list_leaves(request: web.Request, server: Server) -> web.Response:
    branch = await server.blocking(server.store.require_branch, request.match_info["branch_id"])
    return ok({"leaves": [leaf.public() for leaf in await server.blocking(server.store.list_leaves, branch.id)]})


@admin
async def set_run(request: web.Request, server: Server) -> web.Response:
    body = await read_json_object(request)
    branch = await server.rounds.set_run_status(request.match_info["branch_id"], body.get("run_status"))
    await record_action(request, server, "run.set", branch.id, run_status=branch.run_status,
                        run_number=branch.run_number)
    if branch.run_status == STOP:  # a stopped run abandons its open rounds, of both kinds
        await server.analytics.abandon(branch.id)
    return ok({"branch_id": branch.id, "run_status": branch.run_status, "run_number": branch.run_number})


@admin
async def drop_upload(request: web.Request, server: Server) -> web.Response:
    """Drop one leaf's upload (by leaf id or name) from the branch's open round; the leaf may upload again."""
    body = await read_json_object(request)
    result = await server.rounds.drop_uploads(request.match_info["branch_id"], request.match_info["leaf"],
                                              note=_note(body))
    await record_action(request, server, "round.drop_upload", request.match_info["branch_id"],
                        leaf=request.match_info["leaf"], dropped=result["dropped"], note=_note(body))
    return ok(result)


@admin
async def reset_round(request: web.Request, server: Server) -> web.Response:
    """Drop every upload of the branch's open round (same round number); every leaf may upload again."""
    body = await read_json_object(request)
    result = await server.rounds.drop_uploads(request.match_info["branch_id"], None, note=_note(body))
    await record_action(request, server, "round.reset", request.match_info["branch_id"], dropped=result["dropped"],
                        note=_note(body))
    return ok(result)


@admin
async def drop_analytics_upload(request: web.Request, server: Server) -> web.Response:
    """Drop one leaf's upload (by leaf id or name) from the branch's open analytics round."""
    branch = await server.blocking(server.store.require_branch, request.match_info["branch_id"])
    ref = request.match_info["leaf"]
    leaf = next((leaf for leaf in await server.blocking(server.store.list_leaves, branch.id) if ref in (leaf.id, leaf.name)),
                None)
    if leaf is None:
        raise HttpProblem(404, f"No leaf {ref[:80]!r} in branch {branch.id}.")
    dropped = await server.analytics.drop_uploads(branch.id, leaf.id)
    if not dropped:
        raise HttpProblem(404, f"Leaf {leaf.name} has no upload in branch {branch.id}'s open analytics round.")
    await record_action(request, server, "analytics.drop_upload", branch.id, leaf=leaf.name)
    return ok({"dropped": [leaf.name], "kind": KIND_FEDERATED_ANALYTICS})


@admin
async def reset_analytics_round(request: web.Request, server: Server) -> web.Response:
    """Abandon the branch's open analytics round (its uploads dropped); the next analytics upload opens another."""
    branch = await server.blocking(server.store.require_branch, request.match_info["branch_id"])
    dropped = await server.analytics.drop_uploads(branch.id, None)
    await record_action(request, server, "analytics.reset", branch.id, dropped_uploads=dropped)
    return ok({"dropped_uploads": dropped, "kind": KIND_FEDERATED_ANALYTICS})


def _note(body: dict[str, Any]) -> str:
    """The operator's note to the leaves: a text (its first 500 characters) or absent."""
    note = body.get("note")
    if note is not None and not isinstance(note, str):
        raise HttpProblem(400, f"Expected note to be a text for the leaves, or absent. Received: {note!r:.80}")
    return (note or "")[:500]


def _listing(name: str, fetch: Callable[[Store, str], Any]) -> Callable[[web.Request], Awaitable[web.Response]]:
    @admin
    async def handler(request: web.Request, server: Server) -> web.Response:
        branch = await server.blocking(server.store.require_branch, request.match_info["branch_id"])
        return ok({name: await server.blocking(fetch, server.store, branch.id)})

    handler.__name__ = f"list_{name}"
    return handler


@admin
async def list_metrics(request: web.Request, server: Server) -> web.Response:
    """One page of the branch's metrics reports, oldest first: ``?limit=N`` of them (default
    :data:`METRICS_PAGE`, at most :data:`MAX_METRICS_PAGE`) stored after ``?after=`` (the previous
    page's ``next``; the first page without it). ``next`` is null on the last page."""
    branch = await server.blocking(server.store.require_branch, request.match_info["branch_id"])
    limit = _query_count(request, "limit", METRICS_PAGE, 1, MAX_METRICS_PAGE)
    after = _query_count(request, "after", 0, 0, None)
    metrics, cursor = await server.blocking(server.store.list_metrics, branch.id, after=after, limit=limit)
    return ok({"metrics": metrics, "next": cursor})


def _query_count(request: web.Request, name: str, default: int, low: int, high: int | None) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    if not is_decimal(text) or int(text) < low or (high is not None and int(text) > high):
        bounds = f"from {low} to {high}" if high is not None else f"from {low}"
        raise HttpProblem(400, f"Expected ?{name}= to be an integer {bounds}. Received: {name}={text[:40]!r}")
    return int(text)


def add_admin_routes(app: web.Application) -> None:
    trees, branches = ADMIN_PREFIX + "/trees", ADMIN_PREFIX + "/branches"
    app.router.add_post(trees, create_tree)
    app.router.add_get(trees, list_trees)
    app.router.add_delete(trees + "/{tree_id}/broker", remove_tree_broker)
    app.router.add_post(trees + "/{tree_id}/branches", create_branch)
    app.router.add_get(branches, list_branches)
    app.router.add_get(branches + "/{branch_id}", get_branch)
    app.router.add_post(branches + "/{branch_id}/leaves", create_leaves)
    app.router.add_get(branches + "/{branch_id}/leaves", list_leaves)
    app.router.add_post(branches + "/{branch_id}/run", set_run)
    app.router.add_put(branches + "/{branch_id}/strategy", set_strategy)
    app.router.add_put(branches + "/{branch_id}/max-model-bytes", set_max_model_bytes)
    app.router.add_put(branches + "/{branch_id}/field-ops", set_field_ops)
    app.router.add_put(branches + "/{branch_id}/codecs", set_codecs)
    app.router.add_delete(branches + "/{branch_id}/analytics/open/uploads/{leaf}", drop_analytics_upload)
    app.router.add_post(branches + "/{branch_id}/analytics/open/reset", reset_analytics_round)
    app.router.add_get(branches + "/{branch_id}/analytics", _listing("analytics", Store.analytics_history))
    app.router.add_get(branches + "/{branch_id}/rounds", _listing("rounds", Store.list_rounds))
    app.router.add_delete(branches + "/{branch_id}/rounds/open/uploads/{leaf}", drop_upload)
    app.router.add_post(branches + "/{branch_id}/rounds/open/reset", reset_round)
    app.router.add_get(branches + "/{branch_id}/uploads", _listing("uploads", Store.list_uploads))
    app.router.add_get(branches + "/{branch_id}/aggregates", _listing("aggregates", lambda s, b: s.list_files(b, "aggregate")))
    app.router.add_get(branches + "/{branch_id}/metrics", list_metrics)


__all__ = ["add_admin_routes"]
