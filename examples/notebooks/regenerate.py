"""Re-run the tutorial notebooks and save them with their outputs, plots included, so that a reader on a
code host sees the results without running anything:

    python examples/notebooks/regenerate.py            # all three (a few minutes on 2 CPU cores)
    python examples/notebooks/regenerate.py 03_non_iid # one of them

Each notebook runs top to bottom in a fresh kernel, in a temporary working directory (as the test suite
runs them, see tests/notebooks/test_notebooks.py). The saved outputs name no path of the machine that made
them: the temporary directory, the home directory and this checkout are written as ``<tmp>``, ``~`` and
``<repo>``, and a one-time dashboard login code as ``<one-time code>``. Needs the ``[dev]`` extra (nbclient, ipykernel) and the frameworks the notebooks use.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
TIMEOUT_S = 600


def _placeholders() -> list[tuple[str, str]]:
    """(machine path, placeholder), longest first, so the most specific wins."""
    pairs = {str(REPO): "<repo>", os.path.realpath(tempfile.gettempdir()): "<tmp>",
             tempfile.gettempdir(): "<tmp>", os.path.expanduser("~"): "~"}
    return sorted(((path, mark) for path, mark in pairs.items() if len(path) > 1), key=lambda p: -len(p[0]))


def scrub(text: str) -> str:
    for path, mark in _placeholders():
        text = text.replace(path, mark)
    return re.sub(r"#login=[\w-]+", "#login=<one-time code>", text)


def _scrub_outputs(notebook: nbformat.NotebookNode) -> None:
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if "text" in output:
                output["text"] = scrub(output["text"])
            for key in ("evalue",):
                if key in output:
                    output[key] = scrub(output[key])
            if "traceback" in output:
                output["traceback"] = [scrub(line) for line in output["traceback"]]
            for mime, value in output.get("data", {}).items():
                if mime.startswith("text/") and isinstance(value, str):
                    output["data"][mime] = scrub(value)


def regenerate(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory(prefix="branchkey-notebook-") as workdir:
        NotebookClient(notebook, timeout=TIMEOUT_S, kernel_name="python3", record_timing=False,
                       resources={"metadata": {"path": workdir}}).execute()
    _scrub_outputs(notebook)
    nbformat.validate(notebook)
    nbformat.write(notebook, path)


def main(names: list[str]) -> int:
    paths = [HERE / f"{name.removesuffix('.ipynb')}.ipynb" for name in names] or sorted(HERE.glob("*.ipynb"))
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        print(f"no such notebook: {', '.join(missing)}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"running {path.name} ...", flush=True)
        regenerate(path)
        print(f"saved   {path.relative_to(REPO)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
