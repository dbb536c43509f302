"""``branchkey-local``'s argument parser: every command's options, their checks and help texts.

The commands themselves live in one module per group (:mod:`.branches`, :mod:`.serving`, :mod:`.runs`,
:mod:`.simulating`); the parser names each subcommand's function (``func``), which
:func:`branchkey_integrations.cli.main` calls.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable

from .. import __version__
from ..core.protocol import RUN_STATUSES
from ..server.strategies import CATALOGUE, DEFAULT_STRATEGY, STRATEGIES, describe
from .branches import cmd_branch_field_ops, cmd_branch_max_model, cmd_branch_strategy, cmd_init
from .leaves import cmd_admin_token, cmd_leaf
from .runs import cmd_round, cmd_run, cmd_status
from .serving import cmd_login_link, cmd_serve
from .simulating import cmd_simulate

DATA_DIR_ENV = "BRANCHKEY_DATA_DIR"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


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
    serve.add_argument("--max-fields", type=_positive_int, metavar="N",
                       help="refuse an analytics upload of more than N fields (default 10000)")
    add_tls_options(serve)
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

    branch = commands.add_parser(
        "branch", help="change a branch's settings between rounds; with --field-op, how analytics rounds combine "
                       "a field")
    branch.add_argument("--field-op", type=_field_op, action="append", default=[], metavar="NAME=OP",
                        help="how an analytics round combines field NAME: sum, min, max or must_match (every leaf "
                             "sends the same value); NAME= removes it; repeatable. Bundle entries of save_analytics "
                             "(<column>_n, _sum, _sumsq, _min, _max, _nan) need none")
    branch.add_argument("--codecs", type=_codec_list, metavar="NAME,...",
                        help="the codecs the branch advertises and accepts uploads in besides plain NPZ: shuffle-zstd "
                             "(lossless), fp16, bf16, int8 (lossy: a leaf uses one only with quantize=); "
                             "'' (empty): plain NPZ only")
    branch.add_argument("--data-dir", default=os.environ.get(DATA_DIR_ENV) or None, metavar="DIR",
                        help=f"the server's data directory (default: ${DATA_DIR_ENV})")
    branch.add_argument("--branch-id", help="needed only when the store holds several branches")
    branch.set_defaults(func=cmd_branch_field_ops)
    branch_commands = branch.add_subparsers(dest="branch_command", required=False, metavar="ACTION",
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
    add_lifecycle_parsers(commands)
    add_simulate_parser(commands)
    return parser


def add_lifecycle_parsers(commands: Any) -> None:
    """``leaf add|list|revoke|rotate`` and ``admin-token rotate`` (:mod:`.leaves`)."""
    leaf = commands.add_parser("leaf", help="add, list, revoke or rotate a branch's leaves")
    actions = leaf.add_subparsers(dest="leaf_command", required=True, metavar="ACTION", parser_class=CommandParser)
    add = actions.add_parser("add", help="add leaves to the branch and write their credential files (0600); they "
                                         "count in rounds from the next round on")
    add.add_argument("--count", type=_positive_int, default=1, help="how many leaves")
    add.add_argument("--force", action="store_true", help="overwrite existing credential files")
    listing = actions.add_parser("list", help="the branch's leaves, revoked ones included (no tokens)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    revoke = actions.add_parser("revoke", help="refuse the leaf's token on every route at once, close its WebSocket, "
                                               "delete its RabbitMQ user")
    revoke.add_argument("leaf", help="the leaf's name (leaf_2) or id")
    revoke.add_argument("--drop-upload", action="store_true",
                        help="drop its upload from the open round (default: kept, it counts)")
    revoke.add_argument("--note", help="why, shown to the leaves in the round's progress when an upload is dropped")
    rotate = actions.add_parser("rotate", help="give the leaf a new token and rewrite its credential file; the old "
                                               "token is refused")
    rotate.add_argument("leaf", help="the leaf's name (leaf_2) or id")
    for action in (add, listing, revoke, rotate):
        add_data_dir(action)
        action.add_argument("--branch-id", help="needed only when the store holds several branches")
        action.set_defaults(func=cmd_leaf)
    for action in (add, rotate):
        action.add_argument("--credentials-dir", required=True, help="where <leaf name>.json is written")
    token = commands.add_parser("admin-token", help="rotate the admin token")
    token_actions = token.add_subparsers(dest="token_command", required=True, metavar="ACTION",
                                         parser_class=CommandParser)
    rotate_token = token_actions.add_parser("rotate", help="write a new admin token to DIR/admin_token; the old one "
                                                           "is refused and dashboard sessions end")
    add_data_dir(rotate_token)
    rotate_token.set_defaults(func=cmd_admin_token)


def add_tls_options(serve: argparse.ArgumentParser) -> None:
    """``serve``'s TLS options (docs/deployment.md)."""
    serve.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS and WSS with this PEM certificate (then any "
                                                         "intermediates); SIGHUP reloads it")
    serve.add_argument("--tls-key", metavar="FILE", help="the certificate's PEM private key, readable by its owner "
                                                        "only (chmod 600)")
    serve.add_argument("--tls-client-ca", metavar="FILE", help="require client certificates signed by this CA "
                                                              "(mutual TLS: others are refused at the handshake)")


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
    add_backend_options(simulate)
    simulate.set_defaults(func=cmd_simulate)


def add_backend_options(simulate: argparse.ArgumentParser) -> None:
    """Where the leaves run (``--backend``, Ray's options) and how many train each round."""
    simulate.add_argument("--leaves-per-round", type=_positive_int, metavar="M",
                          help="each round M of the leaves, drawn by the seed, train and upload (default: all)")
    simulate.add_argument("--backend", choices=["process", "ray"], default="process",
                          help="process: a worker process per leaf on this machine; ray: Ray tasks "
                               "(pip install 'branchkey-integrations[ray]')")
    simulate.add_argument("--ray-address", metavar="ADDRESS",
                          help="ray: 'auto' or HOST:PORT of a running cluster (default: start a local Ray for the run)")
    simulate.add_argument("--leaf-cpus", type=_non_negative_float, default=1.0, help="ray: CPUs per leaf task")
    simulate.add_argument("--leaf-gpus", type=_non_negative_float, default=0.0, help="ray: GPUs per leaf task")
    simulate.add_argument("--max-concurrent-leaves", type=_positive_int, default=4, metavar="K",
                          help="ray: leaves training at once; the others wait their turn")
    simulate.add_argument("--advertise-host", default="127.0.0.1", metavar="ADDR",
                          help="where the embedded server listens and leaves dial it (an address a cluster's "
                               "workers reach; default loopback)")


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



def _codec_list(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _field_op(text: str) -> tuple[str, str | None]:
    """``NAME=OP`` of ``branch --field-op`` (``NAME=`` removes NAME's operation)."""
    name, sep, op = text.rpartition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=OP such as labels=sum, received {text!r}")
    return name, op or None


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
