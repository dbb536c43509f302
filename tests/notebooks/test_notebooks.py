"""Every tutorial notebook runs top to bottom in a fresh kernel, and is committed with its outputs (plots
included, no errors, no machine paths), as ``python examples/notebooks/regenerate.py`` saves them."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from ..conftest import REPO

NOTEBOOKS = sorted((REPO / "examples" / "notebooks").glob("*.ipynb"))
MACHINE_PATH = re.compile(r"(?<![\w<])/(tmp|work|root|home|Users|private|var/folders)/")
REGENERATE = "python examples/notebooks/regenerate.py"


def test_the_tutorials_are_there():
    assert [p.name for p in NOTEBOOKS] == ["01_lightning_quickstart.ipynb", "02_keras_quickstart.ipynb",
                                           "03_non_iid.ipynb", "05_federated_analytics.ipynb"]


def _texts(output: nbformat.NotebookNode) -> list[str]:
    texts = [output.get("text", ""), output.get("evalue", ""), *output.get("traceback", [])]
    return texts + [value for mime, value in output.get("data", {}).items()
                    if mime.startswith("text/") and isinstance(value, str)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_with_its_outputs(path: Path):
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    counts = [cell.execution_count for cell in code]
    assert counts == list(range(1, len(code) + 1)), f"run every cell once, top to bottom: {REGENERATE} {path.stem}"
    outputs = [output for cell in code for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"], f"a cell failed; fix it and run {REGENERATE}"
    assert any("image/png" in o.get("data", {}) for o in outputs), "the notebook's plot is missing"
    leaked = {m.group(0) for o in outputs for text in _texts(o) for m in MACHINE_PATH.finditer(text)}
    assert not leaked, f"outputs name machine paths {leaked}; save them with {REGENERATE}"
    codes = [text for o in outputs for text in _texts(o) if re.search(r"#login=(?!<one-time code>)", text)]
    assert not codes, f"outputs hold a dashboard login code; save them with {REGENERATE}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path: Path, tmp_path: Path):
    notebook = nbformat.read(path, as_version=4)
    # the working directory is a temporary one, so a run leaves nothing in the checkout
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, naming the cell, on the first error
    assert any("image/png" in o.get("data", {}) for cell in notebook.cells for o in cell.get("outputs", []))
