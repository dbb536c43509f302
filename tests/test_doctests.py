"""The docstring examples of every module run as written, and every example that does not run says why."""

from __future__ import annotations

import ast
import doctest
import importlib
import re
from pathlib import Path

import pytest

import branchkey_integrations

PACKAGE = Path(branchkey_integrations.__file__).parent
MODULES = sorted(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
                 for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")
WHY_SKIPPED = re.compile(r"Example \(skipped: [^)]+\):")


@pytest.mark.parametrize("name", MODULES)
def test_the_docstring_examples_run_as_written(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples fail"


def test_every_skipped_example_says_why():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node) or ""
                if "+SKIP" in docstring:
                    assert WHY_SKIPPED.search(docstring), \
                        f"{path.relative_to(PACKAGE)}: an example with +SKIP under no 'Example (skipped: why):'"
