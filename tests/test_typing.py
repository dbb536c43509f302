"""The package's types reach users (``py.typed``): mypy --strict passes on a small typed user script and
reports, through the package's own hints, each mistake in a script of mistakes.

mypy runs with ``--follow-imports=silent`` as it treats an installed package: it reads the package's
hints but reports only on the user's files."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent / "typed_usage"
pytestmark = pytest.mark.slow  # mypy reads torch, lightning and keras: 20-60 s


def mypy(script: Path, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--cache-dir", str(cache),
                           "--no-error-summary", "--hide-error-context", str(script)],
                          capture_output=True, text=True, timeout=600, cwd=HERE)


def test_the_package_ships_py_typed():
    import branchkey_integrations

    assert (Path(branchkey_integrations.__file__).parent / "py.typed").is_file()


def test_a_typed_user_script_passes_and_mistakes_are_caught(tmp_path):
    clean = mypy(HERE / "user_script.py", tmp_path)
    assert clean.returncode == 0 and clean.stdout == "", clean.stdout + clean.stderr
    mistakes = HERE / "user_mistakes.py"
    expected = {(number, match.group(1)) for number, line in enumerate(mistakes.read_text().splitlines(), 1)
                if (match := re.search(r"# error: ([\w-]+)$", line))}
    result = mypy(mistakes, tmp_path)
    reported = {(int(m.group(1)), m.group(2)) for m in re.finditer(r"user_mistakes\.py:(\d+): error: .*\[([\w-]+)\]$",
                                                                    result.stdout, re.M)}
    assert len(expected) == 4 and reported == expected, result.stdout + result.stderr
