"""``branchkey-local serve`` (the server, its signals, ``server.json`` once the rounds are recovered, the
dashboard's address) and ``login`` (alias ``login-link``: a one-time dashboard login link from the live server)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from ..core.protocol import ADMIN_PREFIX
from ..server.durable import write_private_file
from ..server.lock import FileLock
from ..server.store import ADMIN_TOKEN_FILE
from .failures import CliError, missing_dependency
from .live import SERVER_FILE, admin_call, live_server
from .units import bytes_of

logger = logging.getLogger("branchkey_integrations.server")

LOCK_FILE = "server.lock"


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import aiohttp  # noqa: F401 - checked first, so a missing extra is one clear line
    except ModuleNotFoundError as exc:
        raise missing_dependency("serve", exc) from None
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = FileLock(data_dir / LOCK_FILE)
    if not lock.acquire():
        raise CliError(f"another branchkey-local server already serves {data_dir}; stop it first, or pass another "
                       f"--data-dir.")
    with lock:
        asyncio.run(serve(args, data_dir))
    return 0


def _connection_options(args: argparse.Namespace) -> dict[str, Any]:
    """The connection limits given on the command line (the others keep create_app's defaults)."""
    names = {"header_timeout": "header_timeout_s", "upload_idle_timeout": "upload_idle_timeout_s",
             "max_connections": "max_connections", "max_connections_per_leaf": "max_connections_per_leaf",
             "reserved_connections": "reserved_connections", "keep_rounds": "keep_rounds",
             "max_compression_ratio": "max_compression_ratio", "max_members": "max_members",
             "max_fields": "max_fields"}
    options = {option: getattr(args, arg) for arg, option in names.items() if getattr(args, arg, None) is not None}
    if getattr(args, "max_inflated_mb", None) is not None:
        options["max_total_bytes"] = bytes_of(args.max_inflated_mb)
    return options


async def serve(args: argparse.Namespace, data_dir: Path) -> None:
    from aiohttp import web

    from ..server.app import DEFAULT_MAX_UPLOAD_BYTES, GuardedAppRunner, create_app
    from ..server.budget import limit_allocator_retention
    from ..server.tls import TlsAppRunner

    limit_allocator_retention()
    try:
        app = create_app(data_dir, amqp_url=args.amqp_url, amqp_management_url=args.amqp_management_url,
                         amqp_ca=args.amqp_ca,
                         public_url=args.public_url, max_upload_bytes=args.max_upload_bytes or DEFAULT_MAX_UPLOAD_BYTES,
                         keep_uploads=args.keep_uploads, **_connection_options(args))
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    loop = asyncio.get_running_loop()
    tls = _tls_context(args, loop)
    runner = (GuardedAppRunner(app, handle_signals=False, access_log=None) if tls is None else
              TlsAppRunner(app, tls, handle_signals=False, access_log=None))
    await runner.setup()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, stop.set)
        except NotImplementedError:  # Windows' event loops: Ctrl-C arrives as KeyboardInterrupt instead
            signal.signal(signum, lambda *_: loop.call_soon_threadsafe(stop.set))
    try:
        try:
            await web.TCPSite(runner, args.host, args.port).start()
        except OSError as exc:
            raise CliError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from exc
        url = f"{'https' if tls else 'http'}://{_client_host(args.host)}:{runner.addresses[0][1]}"
        if not await _recovered(app, stop, url):
            return
        logger.info("branchkey-local serving %s on %s", data_dir, url)
        announce_dashboard(app, (args.public_url or url).rstrip("/"), args.host, data_dir)
        # last: whoever finds server.json finds the start-up lines written before it
        info = {"url": url, "pid": os.getpid(), **({"tls_cert": str(Path(args.tls_cert).resolve())} if tls else {})}
        write_private_file(data_dir / SERVER_FILE, json.dumps(info) + "\n")
        await stop.wait()
        logger.info("shutting down")
    finally:
        with contextlib.suppress(FileNotFoundError):
            (data_dir / SERVER_FILE).unlink()
        await runner.cleanup()


def _tls_context(args: argparse.Namespace, loop: asyncio.AbstractEventLoop) -> Any:
    """The server's TLS context from ``--tls-cert``/``--tls-key`` (None without them), reloaded on SIGHUP;
    SSL errors asyncio reports itself become one line each (:func:`~..server.tls.quiet_ssl_errors`)."""
    from ..server.tls import TlsConfigError, quiet_ssl_errors, reload_certificate, server_context

    cert, key, client_ca = getattr(args, "tls_cert", None), getattr(args, "tls_key", None), \
        getattr(args, "tls_client_ca", None)
    if cert is None and key is None:
        if client_ca is not None:
            raise CliError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        return None
    if cert is None or key is None:
        raise CliError("pass both --tls-cert FILE and --tls-key FILE (the certificate chain and its private key)")
    if args.public_url and not args.public_url.startswith("https://"):
        logger.warning("--public-url %s is not https: download and login links will send clients off TLS",
                       args.public_url)
    try:
        context = server_context(cert, key, client_ca)
    except TlsConfigError as exc:
        raise CliError(str(exc)) from exc

    def reload() -> None:
        try:
            reload_certificate(context, cert, key)
        except TlsConfigError as exc:  # the old pair keeps serving
            logger.error("SIGHUP: %s; still serving the previous certificate", exc)

    loop.set_exception_handler(quiet_ssl_errors)
    if hasattr(signal, "SIGHUP"):
        loop.add_signal_handler(signal.SIGHUP, reload)
    logger.info("TLS on (TLS 1.2+), certificate %s%s; SIGHUP reloads it", cert,
                f", client certificates required (CA {client_ca})" if client_ca else "")
    return context


async def _recovered(app: Any, stop: asyncio.Event, url: str) -> bool:
    """Wait (listening: API calls are answered 503) until the rounds are recovered; False when stopped first.

    ``server.json`` and the dashboard's link come after it, so whoever finds them finds a server that serves.
    """
    from ..server.app import RECOVERED

    if app[RECOVERED].is_set():
        return True
    waits = [asyncio.ensure_future(app[RECOVERED].wait()), asyncio.ensure_future(stop.wait())]
    done, _ = await asyncio.wait(waits, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
    if not done:  # a long one: a complete round of a large model to aggregate
        logger.info("listening on %s; recovering the rounds first (API calls are answered 503 until then)", url)
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for wait in waits:
        wait.cancel()
    return app[RECOVERED].is_set() and not stop.is_set()


def announce_dashboard(app: Any, url: str, host: str, data_dir: Path) -> None:
    """The dashboard's address; its one-time login link only to a terminal (``serve > log`` keeps none)."""
    from ..server.dashboard import announcement

    text, warning = announcement(app, url, host, data_dir / ADMIN_TOKEN_FILE, with_link=sys.stdout.isatty())
    print(text, flush=True)
    if warning:
        print(warning, file=sys.stderr, flush=True)


def cmd_login_link(args: argparse.Namespace) -> int:
    """A fresh one-time dashboard login link from the server that serves ``--data-dir``, on stdout."""
    data_dir = Path(args.data_dir)
    live = live_server(data_dir)
    if live is None:
        raise CliError(f"no live server serves {data_dir}; start one with 'branchkey-local serve --data-dir {data_dir}'")
    link = admin_call(live, "POST", ADMIN_PREFIX + "/dashboard/links")
    print(f"login link {link['url']}  (one use, valid {int(link['expires_in_s']) // 60} min)")
    return 0


def _client_host(host: str) -> str:
    """The host a local client should dial for a bind address (a wildcard is not dialable)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
