"""The documentation site's tests reuse the dashboard tests' headless Chromium (Debian's, by path)."""

from ..dashboard.conftest import browser, page  # noqa: F401 - fixtures, found by pytest through this module
