"""How a ``branchkey-local`` command fails: one line on stderr and exit status 1 (:class:`CliError`), and
the line that names the extra to install when a command's optional dependency is missing."""

from __future__ import annotations

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
