"""Every tutorial notebook runs top to bottom in a fresh kernel, and is committed without outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from ..conftest import REPO

NOTEBOOKS = sorted((REPO / "examples" / "notebooks").glob("*.ipynb"))


def test_the_tutorials_are_there():
    assert [p.name for p in NOTEBOOKS] == ["01_lightning_quickstart.ipynb", "02_keras_quickstart.ipynb",
                                           "03_non_iid.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path: Path):
    notebook = nbformat.read(path, as_version=4)
    dirty = [i for i, cell in enumerate(notebook.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert dirty == [], f"clear the outputs of cells {dirty} (jupyter nbconvert --clear-output --inplace {path})"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path: Path, tmp_path: Path):
    notebook = nbformat.read(path, as_version=4)
    # the working directory is a temporary one, so a run leaves nothing in the checkout
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, naming the cell, on the first error
