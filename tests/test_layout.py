"""The package's shape: imports run one way (adapters -> federation core -> client/protocol/wire; server and
simulation apart), modules stay small or say why not, and the CLI's old module path still works."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import branchkey_integrations

PACKAGE = Path(branchkey_integrations.__file__).parent


def imported_modules(path: Path, tree: ast.AST | None = None) -> set[str]:
    """Absolute names of what ``path`` (or its parsed ``tree``) imports, relative imports resolved."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree or ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_server_imports_neither_the_cli_nor_the_simulation_and_rounds_know_no_http() -> None:
    for path in (PACKAGE / "server").glob("*.py"):
        forbidden = {name for name in imported_modules(path) if name.startswith((
            "branchkey_integrations.simulat", "branchkey_integrations.cli"))}
        assert not forbidden, f"{path.name} imports {sorted(forbidden)}"
    # httpio (answers, the error table) imports nothing of the server: the upload receiver, which
    # reads aiohttp's request, may use it; the round logic and the store may not.
    http = {"routes", "admin", "httpio", "app", "state"}
    below = {"rounds": http | {"uploads"}, "uploads": http - {"httpio"} | {"rounds"},
             "store": http | {"rounds", "uploads"}}
    for module, banned in below.items():
        names = imported_modules(PACKAGE / "server" / f"{module}.py")
        bad = {n for n in names if n.split(".")[:3] in [["branchkey_integrations", "server", b] for b in banned]}
        if module != "uploads":  # the upload receiver reads aiohttp's request; the rest needs no HTTP
            bad |= {n for n in names if n.split(".")[0] == "aiohttp"}
        assert not bad, f"server/{module}.py imports {sorted(bad)}: the import graph must run one way"

def test_the_simulation_imports_no_server_internals() -> None:
    for path in (PACKAGE / "simulation").glob("*.py"):
        server = {n for n in imported_modules(path) if n.startswith("branchkey_integrations.server")}
        assert not server, f"simulation/{path.name} imports {sorted(server)}; it talks to the server over HTTP"


def test_the_old_module_path_still_runs_the_cli() -> None:
    result = subprocess.run([sys.executable, "-m", "branchkey_integrations.server.cli", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "branchkey-local" in result.stdout, result.stderr


def runtime_imports(path: Path) -> set[str]:
    """:func:`imported_modules` without the ``if TYPE_CHECKING:`` blocks (annotations only, never run)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = [ast.Pass()]
    return imported_modules(path, tree)


#: module -> the layers below it that it may import (first level of the package: core, server, ...)
CORE_LAYERS = {
    # the transport layer: knows the protocol, nothing of rounds or frameworks
    "errors": set(), "backoff": set(), "protocol": {"errors"}, "credentials": {"errors"},
    # the model archive: tensor codecs and the zip container below the archive rules; wire is their facade
    "tensor_codecs": {"errors"}, "zipformat": {"errors", "tensor_codecs"}, "npy": {"errors", "zipformat"},
    "archive": {"errors", "protocol"}, "payload_kinds": {"errors", "protocol", "archive"},
    "archive_write": {"errors", "archive", "tensor_codecs", "npy", "payload_kinds", "zipformat"},
    "archive_read": {"errors", "protocol", "archive", "tensor_codecs", "npy", "payload_kinds", "zipformat"},
    "wire": {"errors", "protocol", "archive", "archive_read", "archive_write", "tensor_codecs", "payload_kinds", "zipformat"},
    "http": {"errors", "backoff"}, "transfer": {"errors", "wire", "tensor_codecs"}, "client_options": {"errors", "protocol"},
    "download": {"errors", "protocol", "wire", "http", "transfer"},
    "waiter": {"errors", "protocol"}, "notifications": {"errors", "protocol", "backoff"},
    "progress": {"errors", "protocol"}, "watch": {"errors", "progress", "waiter"},
    "client": {"errors", "protocol", "wire", "payload_kinds", "credentials", "http", "transfer", "client_options", "waiter",
               "notifications", "progress", "watch", "download"},
}


def test_core_imports_run_one_way_and_never_reach_frameworks_server_or_simulation() -> None:
    for path in (PACKAGE / "core").glob("*.py"):
        names = runtime_imports(path)
        outside = {n for n in names if n.startswith("branchkey_integrations.")
                   and n.split(".")[1] in ("lightning", "keras", "server", "simulation", "simulate", "cli")}
        frameworks = {n for n in names if n.split(".")[0] in ("torch", "lightning", "keras", "tensorflow", "aiohttp")}
        assert not outside | frameworks, f"core/{path.name} imports {sorted(outside | frameworks)}"
        module = path.stem
        if module in CORE_LAYERS:
            core = {n.split(".")[2] for n in names if n.startswith("branchkey_integrations.core.")}
            assert core <= CORE_LAYERS[module], f"core/{module}.py imports {sorted(core - CORE_LAYERS[module])} above it"


def test_adapters_go_through_the_federation_core_only() -> None:
    allowed = {"callback_kit", "outcome", "federation", "protocol", "credentials", "errors"}
    for adapter in ("lightning", "keras"):
        core = {n.split(".")[2] for n in runtime_imports(PACKAGE / f"{adapter}.py")
                if n.startswith("branchkey_integrations.core.")}
        assert core <= allowed, f"{adapter}.py reaches past the federation core: {sorted(core - allowed)}"


def test_modules_stay_small_or_say_why() -> None:
    for path in PACKAGE.rglob("*.py"):
        lines = len(path.read_text().splitlines())
        if lines > 520:
            docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert "one module" in docstring, f"{path.relative_to(PACKAGE)} has {lines} lines and no word on why"
