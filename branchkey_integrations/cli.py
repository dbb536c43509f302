"""``branchkey-local``: set up, serve and steer a local BranchKey-compatible server, or simulate.

Commands: ``init`` (tree, branch and leaf credential files), ``serve`` (run the server),
``branch strategy NAME`` (change a branch's aggregation between rounds), ``branch max-model-mb MB|learn``
(how large an upload to it may inflate),
``run start|pause|stop`` (through the live server's admin API when one serves the data
directory, so leaves are notified; else directly in the store), ``round drop-upload LEAF|reset``
(unlock an open round, the same way), ``status`` (disk use included), ``login-link`` (a one-time
dashboard login link from the live server, printed, never logged), and ``simulate``
(an embedded server and N leaf processes, see :mod:`branchkey_integrations.simulate`).

The module sits above both :mod:`branchkey_integrations.server` and the simulation: it imports
them, never the other way round. aiohttp and the simulation's dependencies are imported only by
the commands that need them, so ``init``, ``run`` and ``status`` work without them; ``serve`` and
``simulate`` name the extra to install when one is missing.

Conventions: options work before or after the subcommand; ``--data-dir`` defaults to
``$BRANCHKEY_DATA_DIR``; ``--help`` shows every default; exit status 0 on success, 2 for a usage
error (argparse), 1 for a runtime failure (one line on stderr, no traceback); a closed stdout
(``branchkey-local status | head -1``) is not an error.

Why one module of this size: every command shares one parser's conventions, the live-server
detection and the admin call (``run`` and ``round`` act through a live server when one serves the
data directory, else in the store); split by command, each part would import the others' helpers.
"""

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
from typing import Any, Callable, Sequence

import requests

from . import __version__
from .core.errors import BranchKeyError, InvalidValueError, RecordNotFoundError
from .core.protocol import ADMIN_PREFIX, RUN_STATUSES
from .server.durable import write_private_file
from .server.history import latest_metrics, metric_summary
from .server.lock import FileLock
from .server.progress import round_progress
from .server.store import ADMIN_TOKEN_FILE, DB_NAME, Branch, Store
from .server.strategies import CATALOGUE, DEFAULT_STRATEGY, STRATEGIES, check_strategy, describe, strategy_for

logger = logging.getLogger("branchkey_integrations.server")

SERVER_FILE = "server.json"
LOCK_FILE = "server.lock"
DATA_DIR_ENV = "BRANCHKEY_DATA_DIR"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
EXIT_FAILURE = 1  # a runtime failure; argparse's usage errors exit with 2
# Which extra brings a module that ``serve`` or ``simulate`` imports on demand.
EXTRA_OF_MODULE = {"aiohttp": "server", "sklearn": "simulate", "matplotlib": "simulate", "torch": "lightning",
                   "lightning": "lightning", "keras": "keras", "tensorflow": "tensorflow", "safetensors": "lightning"}


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def missing_dependency(command: str, exc: ModuleNotFoundError) -> CliError:
    """A :class:`CliError` that names the missing module and the extra that installs it."""
    module = (exc.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(module)
    if extra is None:
        return CliError(f"'{command}' needs the Python module {module or exc}, which is not installed.")
    return CliError(f"'{command}' needs {module}, which is not installed; install the extra: "
                    f"pip install \"branchkey-integrations[{extra}]\"")


# -- parser ---------------------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after every option that has a real default (not None, not a flag)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _common_options(defaults: bool) -> argparse.ArgumentParser:
    """Options every command takes, before or after its name (the later one wins)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", choices=LOG_LEVELS, default="INFO" if defaults else argparse.SUPPRESS,
                        help="how much the server and clients log (default: INFO)")
    return common


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: the common options and the defaults-showing help, whoever adds it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs["parents"] = [*kwargs.get("parents", ()), _common_options(defaults=False)]
        super().__init__(*args, **kwargs)


def add_data_dir(parser: argparse.ArgumentParser, help: str = "the server's data directory") -> None:
    """``--data-dir``, defaulting to ``$BRANCHKEY_DATA_DIR`` (required when that is unset)."""
    default = os.environ.get(DATA_DIR_ENV) or None
    parser.add_argument("--data-dir", default=default, required=default is None, metavar="DIR",
                        help=f"{help} (default: ${DATA_DIR_ENV}" + (f" = {default})" if default else ", unset)"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="branchkey-local", description="A local BranchKey-compatible server for federated learning.",
        formatter_class=HelpFormatter, parents=[_common_options(defaults=True)],
        epilog="Exit status: 0 success, 1 runtime failure, 2 usage error.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)

    init = commands.add_parser("init", help="create a tree, a branch and N leaves; write credential files")
    add_data_dir(init, "the server's data directory, created if missing")
    init.add_argument("--leaves", type=_positive_int, required=True, help="number of leaves to create")
    init.add_argument("--credentials-dir", required=True, help="where leaf_1.json, leaf_2.json, ... are written")
    init.add_argument("--min-leaves", type=_positive_int, help="uploads that complete a round (default: all leaves)")
    init.add_argument("--round-deadline", type=_seconds, metavar="S",
                      help="aggregate what is there S seconds after a round's first upload")
    init.add_argument("--branch-name", default="main", help="the new branch's name")
    init.add_argument("--max-model-mb", type=_positive_float, metavar="MB",
                      help="refuse an upload that would inflate past MB megabytes, before inflating it (default: "
                           "learned from the branch's first aggregate, twice its size + 16 MiB)")
    add_strategy_options(init)
    init.add_argument("--host-url", help="the URL leaves will use (printed in the summary)")
    init.add_argument("--force", action="store_true", help="overwrite existing leaf_*.json files")
    init.set_defaults(func=cmd_init)

    serve = commands.add_parser("serve", help="run the server")
    add_data_dir(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8080, help="0 picks a free port (see DIR/server.json)")
    serve.add_argument("--amqp-url", help="publish notifications to RabbitMQ too, e.g. amqp://guest:guest@127.0.0.1:5672/")
    serve.add_argument("--amqp-management-url", help="RabbitMQ management API (default http://<amqp host>:15672)")
    serve.add_argument("--public-url", help="base URL put in download and login links, e.g. the address of a proxy "
                                            "in front (default: the address the server listens on, never a "
                                            "client's Host header)")
    serve.add_argument("--max-upload-bytes", type=_positive_int, default=None,
                       help="refuse larger uploads (default: the server's built-in limit)")
    serve.add_argument("--header-timeout", type=_seconds, metavar="S",
                       help="close a connection that has sent no credentials (a leaf's or the admin's token, a signed "
                            "URL, a WebSocket ticket) within S seconds of opening or of its last request (default 10)")
    serve.add_argument("--upload-idle-timeout", type=_seconds, metavar="S",
                       help="drop an upload whose body sends nothing for S seconds (default 60)")
    serve.add_argument("--max-connections", type=_positive_int, metavar="N",
                       help="open connections at most (default 1000, lowered to fit the open-files limit)")
    serve.add_argument("--max-connections-per-leaf", type=_positive_int, metavar="N",
                       help="connections one leaf may hold (default 32; more are answered 429)")
    serve.add_argument("--reserved-connections", type=int, metavar="N",
                       help="slots clients not yet identified may not fill (default 32): kept for leaves, the admin "
                            "and signed downloads")
    serve.add_argument("--keep-uploads", action="store_true",
                       help="keep every upload on disk (default: removed once its round is aggregated)")
    serve.add_argument("--keep-rounds", type=_non_negative_int, metavar="N",
                       help="keep the aggregates of the latest N rounds of each branch, 0 keeps all (default 5; "
                            "the latest is always kept)")
    serve.add_argument("--max-compression-ratio", type=_ratio, metavar="R",
                       help="refuse an archive that inflates past 64 MiB to more than R times its compressed size, "
                            "a compression bomb (default 100; float weights deflate to about 0.9)")
    serve.add_argument("--max-inflated-mb", type=_positive_float, metavar="MB",
                       help="refuse an upload to any branch that would inflate past MB megabytes (default 17180, "
                            "16 GiB); a branch's own limit ('init --max-model-mb', or learned) is usually lower")
    serve.add_argument("--max-members", type=_positive_int, metavar="N",
                       help="refuse an upload of more than N arrays (default 10000; each costs the server ~0.1 ms)")
    serve.set_defaults(func=cmd_serve)

    round_ = commands.add_parser("round", help="unlock a branch's open round: drop one leaf's upload, or reset it")
    round_commands = round_.add_subparsers(dest="round_command", required=True, metavar="ACTION",
                                           parser_class=CommandParser)
    drop = round_commands.add_parser("drop-upload", help="drop one leaf's upload from the open round; the leaf may "
                                                         "upload again, with another layout if it is the only one")
    drop.add_argument("leaf", help="the leaf's name (leaf_2) or id")
    reset = round_commands.add_parser("reset", help="drop every upload of the open round (it keeps its number)")
    for action in (drop, reset):
        add_data_dir(action)
        action.add_argument("--branch-id", help="needed only when the store holds several branches")
        action.add_argument("--note", help="why, shown to the leaves in the round's progress")
        action.set_defaults(func=cmd_round)

    branch = commands.add_parser("branch", help="change a branch's settings between rounds")
    branch_commands = branch.add_subparsers(dest="branch_command", required=True, metavar="ACTION",
                                            parser_class=CommandParser)
    strategy = branch_commands.add_parser(
        "strategy", help="set the branch's aggregation strategy (refused while its open round holds uploads; "
                         "the server-optimizer state starts afresh)")
    strategy.add_argument("strategy", choices=sorted(CATALOGUE), metavar="NAME", help=_strategies_help())
    strategy.add_argument("--strategy-param", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                          help="a parameter of NAME, repeatable (see 'init --help'); unset ones take their defaults")
    add_data_dir(strategy)
    strategy.add_argument("--branch-id", help="needed only when the store holds several branches")
    strategy.set_defaults(func=cmd_branch_strategy)
    model_size = branch_commands.add_parser(
        "max-model-mb", help="set how large (inflated) an upload to the branch may be, or 'learn' it from the "
                             "branch's first aggregate (twice its size + 16 MiB); a larger one is refused with 413")
    model_size.add_argument("megabytes", type=_megabytes_or_learn, metavar="MB", help="a number of MB > 0, or 'learn'")
    add_data_dir(model_size)
    model_size.add_argument("--branch-id", help="needed only when the store holds several branches")
    model_size.set_defaults(func=cmd_branch_max_model)

    run = commands.add_parser("run", help="start, pause or stop a branch's run")
    run.add_argument("status", choices=RUN_STATUSES, help="the run status to set")
    add_data_dir(run)
    run.add_argument("--branch-id", help="needed only when the store holds several branches")
    run.set_defaults(func=cmd_run)

    status = commands.add_parser("status", help="show branches, run status and rounds")
    add_data_dir(status)
    status.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    status.set_defaults(func=cmd_status)

    link = commands.add_parser("login-link", help="print a new one-time login link to the live server's dashboard")
    add_data_dir(link)
    link.set_defaults(func=cmd_login_link)
    add_simulate_parser(commands)
    return parser


def add_simulate_parser(commands: Any) -> None:
    simulate = commands.add_parser(
        "simulate", help="federated training on this machine: an embedded server, N leaf processes, a report",
        description="Start an embedded branchkey-local, create a branch of N leaves, train each leaf in its own "
                    "process with the real callback on a share of the digits data set, and compare the federated "
                    "model with local-only training and a centralized baseline.")
    simulate.add_argument("--framework", choices=["lightning", "keras"], default="lightning",
                          help="which callback the leaves train with")
    simulate.add_argument("--leaves", type=_positive_int, default=3, help="leaf processes")
    simulate.add_argument("--rounds", type=_positive_int, default=5, help="federated rounds")
    simulate.add_argument("--epochs-per-round", type=_positive_int, default=5,
                          help="local epochs between aggregations")
    simulate.add_argument("--partition", choices=["iid", "dirichlet"], default="iid",
                          help="how the training data is split across leaves (dirichlet: label skew)")
    simulate.add_argument("--alpha", type=_positive_float, default=0.5,
                          help="Dirichlet concentration: small = few classes per leaf")
    simulate.add_argument("--seed", type=int, default=0, help="test split, partition and initial model")
    simulate.add_argument("--amqp-url", help="notify leaves over RabbitMQ instead of WebSocket")
    simulate.add_argument("--output", default="branchkey-simulation", metavar="DIR",
                          help="where report.json and accuracy.png are written")
    simulate.add_argument("--dashboard", action="store_true",
                          help="print the embedded server's dashboard address (a one-time login link) and keep it "
                               "open after the run until Ctrl-C")
    simulate.add_argument("--no-baselines", dest="baselines", action="store_false",
                          help="skip the local-only and centralized baselines (federated accuracy only, faster)")
    add_strategy_options(simulate)
    simulate.add_argument("--proximal-mu", type=_non_negative_float, default=0.0, metavar="MU",
                          help="FedProx on every leaf: the callbacks' proximal_mu (0: plain FedAvg leaves)")
    simulate.set_defaults(func=cmd_simulate)


def add_strategy_options(parser: argparse.ArgumentParser) -> None:
    """``--strategy NAME`` and the repeatable ``--strategy-param KEY=VALUE`` (a branch's aggregation)."""
    parser.add_argument("--strategy", choices=sorted(CATALOGUE), default=DEFAULT_STRATEGY, metavar="NAME",
                        help="how the server aggregates each round (README: Strategies): " + _strategies_help())
    parser.add_argument("--strategy-param", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                        help="a parameter of --strategy, repeatable, e.g. eta=0.01; unset ones take their defaults: "
                             + " | ".join(f"{name}: {describe(name)}" for name in sorted(CATALOGUE) if CATALOGUE[name]))


def _strategies_help() -> str:
    """Every registered strategy with its one-line summary, from the classes."""
    return "; ".join(f"{name}: {STRATEGIES[name].summary}" for name in sorted(STRATEGIES))


def strategy_of(args: argparse.Namespace) -> tuple[str, dict[str, float]]:
    """The checked ``(strategy, parameters)`` of ``--strategy``/``--strategy-param``, or a one-line CliError."""
    params = dict(args.strategy_param)
    try:
        check_strategy(args.strategy, params)
    except InvalidValueError as exc:
        raise CliError(str(exc)) from exc
    return args.strategy, params


def _key_value(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    try:
        if sep and key.strip():
            return key.strip(), float(value)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected KEY=NUMBER such as eta=0.01, received {text!r}")


def _bounded(kind: type, lowest: float, allowed: str, *, strict: bool = False) -> Callable[[str], Any]:
    """An argparse ``type`` reading ``kind`` (int or float) that is >= ``lowest`` (> with ``strict``), finite;
    a refusal says what is ``allowed`` and what was received."""
    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {allowed}, received {text!r}") from None
        if not lowest <= value < float("inf") or (strict and value == lowest):  # NaN fails the first test
            raise argparse.ArgumentTypeError(f"expected {allowed}, received {text!r}")
        return value

    return convert


_positive_int = _bounded(int, 1, "an integer >= 1")
_non_negative_int = _bounded(int, 0, "an integer >= 0")
_ratio = _bounded(float, 1, "a ratio >= 1")
_seconds = _bounded(float, 0, "a number of seconds > 0", strict=True)
_positive_float = _bounded(float, 0, "a number > 0", strict=True)
_non_negative_float = _bounded(float, 0, "a number >= 0")
_model_megabytes = _bounded(float, 0, "a number of MB > 0, or 'learn'", strict=True)


def _megabytes_or_learn(text: str) -> float | None:
    """``branch max-model-mb``'s argument: a number of MB, or ``learn`` (None: learned from the first aggregate)."""
    return None if text.strip().lower() == "learn" else _model_megabytes(text)


def _bytes_of(megabytes: float | None) -> int | None:
    """MB (10^6 bytes, as the CLI prints sizes) as a byte count, or None."""
    return None if megabytes is None else max(int(megabytes * 1e6), 1)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (argparse exits with 2 itself on a usage error)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "DEBUG":
        logging.getLogger("pika").setLevel(logging.WARNING)  # pika narrates every connection at INFO
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, so a closed pipe surfaces inside this try
        return code
    except BrokenPipeError:  # the reader went away (| head): not our failure
        _silence_stdout()
        return 0
    except (CliError, BranchKeyError) as exc:  # BrokerError, StoreError: one line, no traceback
        print(f"branchkey-local {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _silence_stdout() -> None:
    """Point stdout at the null device, so the interpreter's final flush does not fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


# -- live server ----------------------------------------------------------------------------


def live_server(data_dir: Path) -> tuple[str, str] | None:
    """(url, admin token) of the server that serves ``data_dir``, if one answers."""
    try:
        info = json.loads((data_dir / SERVER_FILE).read_text(encoding="utf-8"))
        token = (data_dir / ADMIN_TOKEN_FILE).read_text(encoding="utf-8").strip()
        if sys.platform != "win32":  # on Windows signal 0 is CTRL_C_EVENT: the HTTP answer below must do
            os.kill(int(info["pid"]), 0)
        answer = requests.get(info["url"] + ADMIN_PREFIX + "/branches", headers=_admin_headers(token), timeout=3)
    except (OSError, ValueError, KeyError, TypeError, requests.RequestException):
        return None
    return (info["url"], token) if answer.status_code == 200 else None


def _admin_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "accept": "application/json"}


def admin_call(live: tuple[str, str], method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    url, token = live
    try:
        answer = requests.request(method, url + path, json=body, headers=_admin_headers(token), timeout=30)
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


# -- init -----------------------------------------------------------------------------------


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
    print(f"models  uploads up to {_model_limit(branch['max_model_bytes'])}")
    for path in targets:
        print(f"leaf    {path}")
    if args.host_url:
        print(f"host    leaves connect to {args.host_url}")
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
                                     max_model_bytes=_bytes_of(args.max_model_mb))
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
        "strategy": strategy, "strategy_params": params, "max_model_bytes": _bytes_of(args.max_model_mb)})
    leaves = admin_call(live, "POST", f"{ADMIN_PREFIX}/branches/{branch['id']}/leaves", {"count": args.leaves})
    return branch, leaves["leaves"]


# -- serve ----------------------------------------------------------------------------------


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
             "max_compression_ratio": "max_compression_ratio", "max_members": "max_members"}
    options = {option: getattr(args, arg) for arg, option in names.items() if getattr(args, arg, None) is not None}
    if getattr(args, "max_inflated_mb", None) is not None:
        options["max_total_bytes"] = _bytes_of(args.max_inflated_mb)
    return options


async def serve(args: argparse.Namespace, data_dir: Path) -> None:
    from aiohttp import web

    from .server.app import DEFAULT_MAX_UPLOAD_BYTES, GuardedAppRunner, create_app
    from .server.budget import limit_allocator_retention

    limit_allocator_retention()
    try:
        app = create_app(data_dir, amqp_url=args.amqp_url, amqp_management_url=args.amqp_management_url,
                         public_url=args.public_url, max_upload_bytes=args.max_upload_bytes or DEFAULT_MAX_UPLOAD_BYTES,
                         keep_uploads=args.keep_uploads, **_connection_options(args))
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    runner = GuardedAppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
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
        url = f"http://{_client_host(args.host)}:{runner.addresses[0][1]}"
        if not await _recovered(app, stop, url):
            return
        logger.info("branchkey-local serving %s on %s", data_dir, url)
        announce_dashboard(app, (args.public_url or url).rstrip("/"), args.host, data_dir)
        # last: whoever finds server.json finds the start-up lines written before it
        write_private_file(data_dir / SERVER_FILE, json.dumps({"url": url, "pid": os.getpid()}) + "\n")
        await stop.wait()
        logger.info("shutting down")
    finally:
        with contextlib.suppress(FileNotFoundError):
            (data_dir / SERVER_FILE).unlink()
        await runner.cleanup()


async def _recovered(app: Any, stop: asyncio.Event, url: str) -> bool:
    """Wait (listening: API calls are answered 503) until the rounds are recovered; False when stopped first.

    ``server.json`` and the dashboard's link come after it, so whoever finds them finds a server that serves.
    """
    from .server.app import RECOVERED

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
    from .server.dashboard import announcement

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


# -- run, status ----------------------------------------------------------------------------


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
    value = _bytes_of(args.megabytes)

    def in_store(store: Store, branch: Branch) -> tuple[dict[str, Any], str]:
        return store.set_max_model_bytes(branch.id, value).to_dict(), "in the store (no live server)"

    def through_live(live: tuple[str, str], branch: Branch) -> tuple[dict[str, Any], str]:
        return (admin_call(live, "PUT", f"{ADMIN_PREFIX}/branches/{branch.id}/max-model-bytes",
                           {"max_model_bytes": value}), f"through {live[0]}")

    branch, result, how = change_branch(args, in_store, through_live)
    print(f"branch {branch.id}: uploads up to {_model_limit(result['max_model_bytes'])}, set {how}")
    return 0


def _model_limit(max_model_bytes: int | None) -> str:
    if max_model_bytes is None:
        return "twice the branch's first aggregate + 16 MiB (learned), inflated; larger ones are refused"
    return f"{_megabytes(max_model_bytes)} inflated; larger ones are refused"


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
            result = {"run_number": run_number, "round_index": round_index, "dropped": dropped}
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
    print(f"branch {branch.id} run {result['run_number']} round {result['round_index']}: dropped the upload(s) of "
          f"{', '.join(result['dropped']) or 'nobody'} {how}; they see why in the round's progress and may upload again")
    return 0


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def cmd_status(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir)
    store = open_existing_store(data_dir)
    try:
        live = live_server(data_dir)
        if args.json:
            print(json.dumps(status_document(store, live), indent=2, default=str))
            return 0
        print(f"server  {live[0] if live else 'not running'}")
        disk = store.disk_usage()
        print(f"disk    {_megabytes(sum(disk.values()))} in {data_dir}: uploads {_megabytes(disk['uploads'])}, "
              f"aggregates {_megabytes(disk['aggregates'])}, database {_megabytes(disk['database'])}, "
              f"optimizer state {_megabytes(disk['optimizer_state'])}, other {_megabytes(disk['other'])}")
        for branch in store.list_branches():
            leaves = store.list_leaves(branch.id)
            print(f"branch  {branch.id} ({branch.name}): run_status {branch.run_status}, run {branch.run_number}, "
                  f"{len(leaves)} leaves, round needs {store.required_uploads(branch)}")
            for line in round_progress(store, branch.id).lines():
                print(f"  {line}")
            for item in store.list_rounds(branch.id)[-5:]:
                print(f"  run {item['run_number']} round {item['round_index']}: {item['status']}, "
                      f"{item['upload_count']} upload(s), aggregate {item['aggregate_id'] or '-'}")
    finally:
        store.close()
    return 0


def status_document(store: Store, live: tuple[str, str] | None) -> dict[str, Any]:
    """What ``status --json`` prints: the server's URL (or null) and every branch with all its rounds."""
    branches = [{
        "id": branch.id, "name": branch.name, "run_status": branch.run_status, "run_number": branch.run_number,
        "leaves": len(store.list_leaves(branch.id)), "required_uploads": store.required_uploads(branch),
        "metrics": _aggregated_metrics(store, branch.id),
        "progress": round_progress(store, branch.id).to_dict(),
        "strategy": branch.algorithm, "strategy_params": branch.params,
        "rounds": [{key: item.get(key) for key in ("run_number", "round_index", "status", "upload_count", "aggregate_id",
                                                   "strategy", "strategy_note")}
                   for item in store.list_rounds(branch.id)],
    } for branch in store.list_branches()]
    return {"server": live[0] if live else None, "disk": store.disk_usage(), "branches": branches}


def _aggregated_metrics(store: Store, branch_id: str) -> dict[str, Any]:
    """The latest run's metrics as the dashboard plots them: per mode/metric and round, the sample-weighted mean."""
    summary = metric_summary(store, branch_id)
    return {"run_number": summary["run_number"], "latest": latest_metrics(summary),
            "series": [{k: s[k] for k in ("mode", "metric", "rounds", "mean")} for s in summary["series"]]}


# -- simulate -------------------------------------------------------------------------------


def cmd_simulate(args: argparse.Namespace) -> int:
    try:
        from .simulate import SimulationConfig, TerminalProgress, SimulationTerminated, run
    except ModuleNotFoundError as exc:
        raise missing_dependency("simulate", exc) from None

    if args.log_level == "INFO":  # the progress display says what these would
        logging.getLogger("branchkey_integrations.simulation").setLevel(logging.WARNING)
    try:
        config = SimulationConfig(framework=args.framework, leaves=args.leaves, rounds=args.rounds,
                                  epochs_per_round=args.epochs_per_round, partition=args.partition,
                                  alpha=args.alpha, seed=args.seed, amqp_url=args.amqp_url, dashboard=args.dashboard,
                                  baselines=args.baselines, strategy=args.strategy,
                                  strategy_params=dict(args.strategy_param), proximal_mu=args.proximal_mu)
        report = run(config, output=args.output, progress=TerminalProgress(),
                     hold=_hold_dashboard if args.dashboard else None)
    except ModuleNotFoundError as exc:
        raise missing_dependency("simulate", exc) from None
    except (ValueError, ImportError) as exc:
        raise CliError(str(exc)) from exc
    except KeyboardInterrupt:
        print("branchkey-local simulate: interrupted; the server and every leaf were stopped", file=sys.stderr)
        return 130
    except SimulationTerminated as exc:
        print(f"branchkey-local simulate: {exc}; the server and every leaf were stopped", file=sys.stderr)
        return 143
    if not args.dashboard:  # with it, _hold_dashboard printed the report already
        print_report(report)
    return 0


def _hold_dashboard(report: Any) -> None:
    """Print the report, then keep the embedded server (and its dashboard) up until Ctrl-C or SIGTERM."""
    import threading

    from .simulate import SimulationTerminated

    print_report(report)
    print("the dashboard stays open; press Ctrl-C to stop the server", flush=True)
    try:
        threading.Event().wait()
    except (KeyboardInterrupt, SimulationTerminated):
        print("\nstopping the server", flush=True)


def print_report(report: Any) -> None:
    from .simulation.report import percent, strategy_label

    config, final = report.config, report.final
    print(f"\n{report.table()}\n")
    print(f"strategy {strategy_label(config)}")
    print(f"after {config['rounds']} rounds: federated {final.global_accuracy:.1%}, local-only (mean) "
          f"{percent(final.local_accuracy)}, centralized {percent(final.centralized_accuracy)}; "
          f"took {report.elapsed_s:.0f} s")
    print(f"report  {report.files['report']}\nplot    {report.files['plot']}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
