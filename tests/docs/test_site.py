"""The documentation site: ``mkdocs build --strict`` as the README writes it (into a temporary directory), a
site that names no remote asset (it works offline, from the file system), a command-line reference generated
from the parser, and the built site in a real headless Chromium from ``file://``: its navigation, its API
reference showing ``BranchKeyCallback`` with its docstring, and its search."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from branchkey_integrations.cli.parser import build_parser

from ..conftest import REPO
from ..test_readme import blocks_run_as

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
#: tags that make a browser fetch something, and their attribute that names it
FETCHING = re.compile(r"<(script|link|img|iframe|source|audio|video|embed)\b[^>]*?\b(src|href)=\"([^\"]*)\"", re.I)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The site built by the README's own command (its ``mkdocs build`` part; the install is .ci/setup's)."""
    [block] = blocks_run_as("docs-build")
    [build] = [part.strip() for part in block.strip().split("&&") if "mkdocs build" in part]
    out = tmp_path_factory.mktemp("site")
    assert "--strict" in build and "--site-dir site" in build, build
    command = build.replace(".venv/bin/", f"{BIN}/").replace("--site-dir site", f"--site-dir {out}")
    result = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    yield out


def test_the_site_builds_strict_and_fetches_nothing_from_the_network(site: Path) -> None:
    pages = sorted(site.rglob("*.html"))
    assert len(pages) >= 18, [p.name for p in pages]
    remote = {f"{page.relative_to(site)}: {m.group(0)[:120]}" for page in pages
              for m in FETCHING.finditer(page.read_text(encoding="utf-8"))
              if m.group(1).lower() != "a" and re.match(r"(https?:)?//", m.group(3))}
    assert not remote, f"the site fetches from the network (it must work offline): {sorted(remote)[:5]}"
    for sheet in site.rglob("*.css"):
        assert not re.search(r"(@import|url\()\s*['\"]?(https?:)?//", sheet.read_text(encoding="utf-8")), sheet
    assert (site / "search" / "search_index.js").exists()  # the offline plugin's search, usable from file://
    assert (site / "dashboard.png").stat().st_size > 0


def test_the_command_reference_is_every_command_of_the_parser(site: Path) -> None:
    html = (site / "reference" / "cli.html").read_text(encoding="utf-8")
    parser = build_parser()
    [commands] = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    names: dict[int, list[str]] = {}  # a command's name and its aliases (login, login-link) share one parser
    for name, command in commands.choices.items():
        names.setdefault(id(command), []).append(name)
    for name, command in commands.choices.items():
        assert any(f"branchkey-local {each}" in html for each in names[id(command)]), name
        for action in command._actions:
            for option in action.option_strings:
                assert option in html, f"{name} {option} is missing from the generated command reference"
    assert "<!-- cli-reference -->" not in html


def test_the_site_opens_offline_navigates_and_shows_the_api_reference(site: Path, page) -> None:
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto((site / "index.html").as_uri())
    assert page.title().startswith("branchkey-integrations")
    # navigation: the sidebar's entries lead to the guides and to the reference
    page.locator("nav.md-nav a", has_text="PyTorch Lightning").first.click()
    page.wait_for_url("**/guides/lightning.html")
    assert page.locator("h1").inner_text().startswith("PyTorch Lightning")
    page.locator("nav.md-nav a", has_text="Python API").first.click()
    page.wait_for_url("**/reference/api.html")
    heading = page.locator(".doc-heading", has_text="BranchKeyCallback").first
    heading.wait_for()
    # the class's docstring, rendered beside its heading
    assert "Federate a LightningModule through BranchKey" in page.locator("article").inner_text()
    # search works from file:// (the offline plugin's inlined index, the vendored iframe-worker shim)
    page.locator("input.md-search__input").click()
    page.keyboard.type("FedProx")  # typed: the search answers key events (fill() sends none)
    page.locator(".md-search-result__item").first.wait_for()
    assert "matching document" in page.locator(".md-search-result__meta").inner_text()
    off_machine = [url for url in requests if not url.startswith(("file:", "data:", "blob:", "about:"))]
    assert not off_machine, off_machine
