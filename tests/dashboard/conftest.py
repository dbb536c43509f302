"""A real headless Chromium (Debian's ``chromium``, installed by ``.ci/setup``) driven by Playwright.

Playwright's own browser downloads are never used: it launches the system browser by path. Without
the browser or Playwright, the browser tests skip on a developer machine and fail under CI.
"""

from __future__ import annotations

import os
import shutil
from typing import Iterator

import pytest

from benchmarks.harness import CHROMIUM, CHROMIUM_ARGS  # shared with the dashboard benchmark

from ..conftest import IN_CI


def _missing() -> str | None:
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, as .ci/setup does)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install -e '.[dev]')"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator:
    """One headless Chromium per test module; each test opens its own context (fresh sessionStorage)."""
    problem = _missing()
    if problem:
        if IN_CI:
            pytest.fail(f"{problem}; CI needs it for the dashboard tests.")
        pytest.skip(problem)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser) -> Iterator:
    # bypass_csp: the test's own wait_for_function probes are evaluated strings, which the page's CSP forbids
    context = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        yield page
    finally:
        context.close()
