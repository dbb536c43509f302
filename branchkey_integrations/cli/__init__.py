"""``branchkey-local``: set up, serve and steer a local BranchKey-compatible server, or simulate.

Commands: ``init`` (tree, branch and leaf credential files), ``serve`` (run the server),
``branch strategy NAME`` (change a branch's aggregation between rounds), ``branch max-model-mb MB|learn``
(how large an upload to it may inflate),
``run start|pause|stop`` (through the live server's admin API when one serves the data
directory, so leaves are notified; else directly in the store), ``round drop-upload LEAF|reset``
(unlock an open round, the same way), ``leaf add|list|revoke|rotate`` and ``admin-token rotate`` (credentials,
the same way), ``status`` (disk use and the audit trail included), ``login`` (alias ``login-link``: a one-time
dashboard login link from the live server, printed, never logged), and ``simulate``
(an embedded server and N leaf processes, see :mod:`branchkey_integrations.simulate`).

The package sits above both :mod:`branchkey_integrations.server` and the simulation: it imports
them, never the other way round. aiohttp and the simulation's dependencies are imported only by
the commands that need them, so ``init``, ``run`` and ``status`` work without them; ``serve`` and
``simulate`` name the extra to install when one is missing.

Conventions: options work before or after the subcommand; ``--data-dir`` defaults to
``$BRANCHKEY_DATA_DIR``; ``--help`` shows every default; exit status 0 on success, 2 for a usage
error (argparse), 1 for a runtime failure (one line on stderr, no traceback); a closed stdout
(``branchkey-local status | head -1``) is not an error.

Where things live: :mod:`.parser` builds the argument parser (every command's options and help);
the commands, one module per group: :mod:`.branches` (``init``, ``branch``), :mod:`.serving`
(``serve``, ``login``), :mod:`.runs` (``run``, ``round``, ``status``), :mod:`.leaves` (``leaf``,
``admin-token``), :mod:`.simulating`
(``simulate``); :mod:`.live` finds the live server and acts through it or in the store;
:mod:`.failures` is the one-line failure; :mod:`.units` the sizes as the CLI reads and prints them.
This module runs one command (:func:`main`, the ``branchkey-local`` console script).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Sequence

from ..core.errors import BranchKeyError
from .failures import EXIT_FAILURE, CliError
from .parser import DATA_DIR_ENV, build_parser
from .serving import announce_dashboard


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


__all__ = ["main", "build_parser", "announce_dashboard", "CliError", "DATA_DIR_ENV", "EXIT_FAILURE"]
