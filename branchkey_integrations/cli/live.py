"""Acting on a data directory: through the live server that serves it (found by its ``server.json`` and
admin token, called on the admin API), else directly in its store; and which branch a command means.

A server that serves TLS names its certificate file in ``server.json``; the CLI trusts exactly that
certificate (pinned: it is a trust anchor even when a public CA issued it, hostname still checked), so
talking to a local server over https needs no CA option. Against a server that requires client
certificates (``serve --tls-client-ca``), the CLI presents the one named by ``$BRANCHKEY_TLS_CLIENT_CERT`` and
``$BRANCHKEY_TLS_CLIENT_KEY``.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
from pathlib import Path
from typing import Any, Callable

import requests
from requests.adapters import HTTPAdapter

from ..core.protocol import ADMIN_PREFIX
from ..server.store import ADMIN_TOKEN_FILE, DB_NAME, Branch, Store
from .failures import CliError

SERVER_FILE = "server.json"
CLIENT_CERT_ENV, CLIENT_KEY_ENV = "BRANCHKEY_TLS_CLIENT_CERT", "BRANCHKEY_TLS_CLIENT_KEY"
#: per live server's URL, the session that trusts its pinned certificate (https servers only)
_SESSIONS: dict[str, requests.Session] = {}


class _ContextAdapter(HTTPAdapter):
    """An adapter whose connections use one ``SSLContext`` (requests takes no context otherwise)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)


def pinned_session(cert_file: str) -> requests.Session:
    """A session that trusts the server certificate in ``cert_file`` (and presents the client certificate of
    ``$BRANCHKEY_TLS_CLIENT_CERT``/``$BRANCHKEY_TLS_CLIENT_KEY`` when set)."""
    context = ssl.create_default_context(cafile=cert_file)
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the server's own certificate is the anchor
    if os.environ.get(CLIENT_CERT_ENV):
        context.load_cert_chain(os.environ[CLIENT_CERT_ENV], os.environ.get(CLIENT_KEY_ENV) or None)
    session = requests.Session()
    session.mount("https://", _ContextAdapter(context))
    return session


def live_server(data_dir: Path) -> tuple[str, str] | None:
    """(url, admin token) of the server that serves ``data_dir``, if one answers."""
    try:
        info = json.loads((data_dir / SERVER_FILE).read_text(encoding="utf-8"))
        token = (data_dir / ADMIN_TOKEN_FILE).read_text(encoding="utf-8").strip()
        if sys.platform != "win32":  # on Windows signal 0 is CTRL_C_EVENT: the HTTP answer below must do
            os.kill(int(info["pid"]), 0)
        if info.get("tls_cert"):
            _SESSIONS[info["url"]] = pinned_session(info["tls_cert"])
        http = _SESSIONS.get(info["url"], requests)
        answer = http.get(info["url"] + ADMIN_PREFIX + "/branches", headers=_admin_headers(token), timeout=3)
    except requests.exceptions.SSLError as exc:
        raise CliError(f"the server at {info['url']} refused this CLI's TLS connection ({exc}); it trusts the "
                       f"certificate named in {SERVER_FILE}, and with client certificates required, presents "
                       f"${CLIENT_CERT_ENV}/${CLIENT_KEY_ENV}") from exc
    except (OSError, ValueError, KeyError, TypeError, requests.RequestException):
        return None
    return (info["url"], token) if answer.status_code == 200 else None


def _admin_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "accept": "application/json"}


def admin_call(live: tuple[str, str], method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    url, token = live
    try:
        http = _SESSIONS.get(url, requests)
        answer = http.request(method, url + path, json=body, headers=_admin_headers(token), timeout=30)
    except requests.RequestException as exc:
        raise CliError(f"the server at {url} did not answer {method} {path}: {exc}") from exc
    try:
        payload = answer.json() if answer.content else {}
    except ValueError:  # not JSON (a proxy's or aiohttp's own error page): its text says what happened
        payload = {}
    if answer.status_code >= 300 or not isinstance(payload, dict) or "data" not in payload:
        detail = payload.get("error", answer.text) if isinstance(payload, dict) else answer.text
        raise CliError(f"{method} {path} failed with HTTP {answer.status_code}: {detail}")
    return payload["data"]


def open_existing_store(data_dir: Path) -> Store:
    if not (data_dir / DB_NAME).exists():
        raise CliError(f"{data_dir} holds no branchkey-local store; create one with 'branchkey-local init'.")
    return Store(data_dir)


def resolve_branch(store: Store, branch_id: str | None) -> Branch:
    if branch_id:
        return store.require_branch(branch_id)
    branches = store.list_branches()
    if len(branches) != 1:
        listed = ", ".join(f"{b.id} ({b.name})" for b in branches) or "none"
        raise CliError(f"the store holds {len(branches)} branches ({listed}); pass --branch-id.")
    return branches[0]


def change_branch(args: argparse.Namespace, in_store: Callable[[Store, Branch], tuple[dict[str, Any], str]],
                  through_live: Callable[[tuple[str, str], Branch], tuple[dict[str, Any], str]]
                  ) -> tuple[Branch, dict[str, Any], str]:
    """Resolve ``--branch-id``, then change the branch through the live server when one runs (so its
    state and the leaves follow), else directly in the store. Returns (branch, result, how)."""
    data_dir = Path(args.data_dir)
    store = open_existing_store(data_dir)
    try:
        branch = resolve_branch(store, args.branch_id)
        live = live_server(data_dir)
        result, how = in_store(store, branch) if live is None else through_live(live, branch)
    finally:
        store.close()
    return branch, result, how
