"""MkDocs hook: the command-line reference (reference/cli.md) is written at build time from
``branchkey-local``'s own argument parser, so it can never drift from ``--help``."""

from __future__ import annotations

import argparse
import os
from typing import Any

MARKER = "<!-- cli-reference -->"


def _commands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parser and every subcommand's parser below it, depth first, each once (aliases share one)."""
    found = [parser]
    for action in parser._actions:  # argparse keeps its subcommands only here
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for child in action.choices.values():
                if id(child) not in seen:
                    seen.add(id(child))
                    found += _commands(child)
    return found


def cli_reference() -> str:
    """One section per command: its full ``--help`` as ``branchkey-local`` prints it, 80 columns wide (the
    width of the page's code blocks)."""
    from branchkey_integrations.cli.parser import build_parser

    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "80"  # argparse wraps to the terminal; a fixed width makes the page reproducible
    try:
        sections = [f"## `{command.prog}`\n\n```text\n{command.format_help().rstrip()}\n```\n"
                    for command in _commands(build_parser())]
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before
    return "\n".join(sections)


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if page.file.src_uri == "reference/cli.md":
        if MARKER not in markdown:
            raise ValueError(f"reference/cli.md lost its {MARKER} line, where the command reference goes")
        return markdown.replace(MARKER, cli_reference())
    return markdown
