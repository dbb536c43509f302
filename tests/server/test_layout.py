"""The server package's shape: imports run one way, and the CLI's old module path still works."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import branchkey_integrations

PACKAGE = Path(branchkey_integrations.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Absolute names of what ``path`` imports (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
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
