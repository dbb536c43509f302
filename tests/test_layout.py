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
             # the store facade and its record families (store_*.py)
             **{path.stem: http | {"rounds", "uploads"} for path in (PACKAGE / "server").glob("store*.py")}}
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
    "errors": set(), "backoff": set(), "version": set(), "protocol": {"errors"}, "credentials": {"errors"},
    # the model archive: tensor codecs and the zip container below the archive rules; wire is their facade
    "tensor_codecs": {"errors"}, "zipformat": {"errors", "tensor_codecs"}, "npy": {"errors", "zipformat"},
    "archive": {"errors", "protocol"}, "payload_kinds": {"errors", "protocol", "archive"},
    "archive_write": {"errors", "archive", "tensor_codecs", "npy", "payload_kinds", "zipformat"},
    "archive_read": {"errors", "protocol", "archive", "tensor_codecs", "npy", "payload_kinds", "zipformat"},
    "float_codecs": {"errors", "tensor_codecs", "npy"},
    "wire": {"errors", "protocol", "archive", "archive_read", "archive_write", "tensor_codecs", "payload_kinds", "zipformat",
             "float_codecs"},
    "http": {"errors", "backoff"}, "transfer": {"errors", "wire", "tensor_codecs"}, "client_options": {"errors", "protocol", "tensor_codecs", "float_codecs", "delta"},
    "delta": {"tensor_codecs"},
    "codec_choice": {"client_options", "float_codecs", "tensor_codecs", "transfer"},
    "upload_encoding": {"client_options", "codec_choice", "errors", "delta"},
    "streamed_archive": {"archive_write", "errors", "float_codecs", "npy", "payload_kinds", "tensor_codecs",
                         "zipformat"},
    "streamed_upload": {"wire", "streamed_archive", "upload_encoding"},
    "download": {"errors", "protocol", "wire", "http", "transfer"},
    "waiter": {"errors", "protocol"}, "notifications": {"errors", "protocol", "backoff"},
    "progress": {"errors", "protocol"}, "watch": {"errors", "progress", "protocol", "waiter"},
    "client": {"errors", "protocol", "wire", "credentials", "http", "transfer", "client_options", "waiter",
               "notifications", "progress", "watch", "download", "version", "client_payloads", "upload_encoding",
               "delta", "client_properties", "streamed_archive", "streamed_upload"},
    "client_properties": {"credentials", "http", "notifications", "waiter"},
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


def package_modules() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its own name, not ``__init__``)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports, anywhere in it: under ``TYPE_CHECKING`` and in functions too
    (``from . import x`` names the module ``x``, not the package; ``from .x import y`` the module ``x``, or
    ``x.y`` where that is a module)."""
    modules = package_modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                module = ".".join(part for part in (base, node.module or "") if part)
                imported.update(f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module
                                for a in node.names)
        targets = set()
        for target in imported:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: its strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = [stack.pop()]
            while component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_the_package_has_no_import_cycle_not_even_for_type_checking() -> None:
    assert cycles(import_graph()) == [], "modules that import each other, directly or around a loop"
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check sees one


def private_names_used(source: str, *, on_any_object: bool = False) -> set[str]:
    """``_private`` names that ``source`` takes from another module of the package: ``from .m import _x``,
    ``import branchkey_integrations.m._x``, or ``m._x`` on a module ``m`` of the package it imported;
    ``on_any_object``: ``v._x`` on any name but ``self``, ``cls`` and third-party modules too. Dunders such as
    ``__version__`` are public; a third party's privates (``torch._foreach_add_``) are that party's business."""
    def private(name: str) -> bool:
        return any(part.startswith("_") and not part.startswith("__") for part in name.split("."))

    def ours(node: ast.ImportFrom | ast.Import, name: str) -> bool:
        return (isinstance(node, ast.ImportFrom) and node.level > 0) or name.split(".")[0] == PACKAGE.name

    tree = ast.parse(source)
    found: set[str] = set()
    own: set[str] = set()  # names bound to the package's modules (or to anything taken from them)
    foreign: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if not ours(node, module):
                foreign.update(a.asname or a.name for a in node.names)
                continue
            found.update(f"{'.' * node.level}{module}.{a.name}" for a in node.names if private(a.name))
            if private(module):
                found.add(module)
            own.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                bound = alias.asname or alias.name.split(".")[0]
                if ours(node, alias.name):
                    found.update({alias.name} if private(alias.name) else set())
                    own.add(bound)
                else:
                    foreign.add(bound)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and private(node.attr):
            owner = node.value.id
            if owner in own or (on_any_object and owner not in foreign and owner not in ("self", "cls")):
                found.add(f"{owner}.{node.attr}")
    return found


#: other libraries' private names the package relies on, each documented by that library or stable for years
THIRD_PARTY_PRIVATES = {
    "_replace",  # namedtuple's public API, underscored only to avoid field names
    "_exit",  # os._exit: a child process that must not run the parent's cleanup
    "_flatten_layers",  # Keras 3 has no public recursive walk; Model.layers itself uses it
    "_foreach_add_", "_foreach_sub", "_foreach_copy_",  # torch's fused multi-tensor ops
    "_get_help_string",  # argparse's documented formatter hook
}


def private_attributes_from_elsewhere(source: str) -> set[str]:
    """``obj._x`` where ``_x`` is defined nowhere in ``source`` (not ``self``/``cls``/``super()``): a reach into
    another module's object, such as ``self.client._upload_arrays`` from outside the client."""
    tree = ast.parse(source)
    defined: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            defined.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defined.add(node.target.id)
    found = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            continue
        if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
            continue
        if node.attr not in defined and node.attr not in THIRD_PARTY_PRIVATES:
            found.add(ast.unparse(node))
    return found


#: private names still taken across modules, each with why it is not fixed here (empty it, never grow it)
KNOWN_PRIVATE_NAMES: dict[str, set[str]] = {}


def test_no_module_takes_another_modules_private_names() -> None:
    sample = ("from .m import _x\nimport branchkey_integrations.mod._y\nfrom . import wire\nimport torch\n"
              "wire._z(); obj._w; self._v; torch._foreach_add_\nfrom .a import __version__")
    assert private_names_used(sample) == {".m._x", "branchkey_integrations.mod._y", "wire._z"}  # the check sees each form
    assert private_attributes_from_elsewhere("class C:\n    def _own(self): self.client._upload(); other._own()\n") == \
        {"self.client._upload"}
    for name, path in sorted(package_modules().items()):
        found = private_names_used(path.read_text()) | private_attributes_from_elsewhere(path.read_text())
        found -= KNOWN_PRIVATE_NAMES.get(name, set())
        assert not found, f"{name} takes private names of other modules: {sorted(found)}; give the callee a public call"


#: private names a benchmark still uses, each with why (empty it, never grow it)
KNOWN_PRIVATE_IN_BENCHMARKS = {
    # fills a store with 20,000 rows in one transaction; server/store.py is being split by record family,
    # and the bulk insert belongs to the new store's public calls
    "dashboard.py": {"store._tx"},
}


def test_benchmarks_use_the_public_api_only_and_nothing_of_the_tests() -> None:
    for path in sorted((PACKAGE.parent / "benchmarks").glob("*.py")):
        from_tests = {n for n in imported_modules(path) if n.split(".")[0] == "tests"}
        assert not from_tests, f"benchmarks/{path.name} imports {sorted(from_tests)}: the test suite is not an API"
        found = private_names_used(path.read_text(), on_any_object=True) - KNOWN_PRIVATE_IN_BENCHMARKS.get(path.name, set())
        assert not found, f"benchmarks/{path.name} uses private names {sorted(found)}"


def test_every_module_has_its_row_in_the_where_things_live_table() -> None:
    """The contributing guide's map (docs/contributing.md) names every module (or, for the simulation, its
    folder): a module moved or added without its row is a room a newcomer cannot find."""
    readme = (PACKAGE.parent / "docs" / "contributing.md").read_text()
    table = readme.split("## Where things live", 1)[1].split("\n## ", 1)[0]
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if path.name == "__init__.py" and path.parent != PACKAGE / "cli" or "/static/" in relative:
            continue
        if f"`{relative}`" not in table and f"`{relative.split('/')[0]}/`" not in table:
            missing.append(relative)
    assert not missing, f"modules without a row in docs/contributing.md's 'where things live' table: {missing}"
