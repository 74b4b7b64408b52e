"""Test helper (not part of the package): open an HTML file in headless Chromium, list its problems.

Used by the report tests and the CLI test of a trained model's report:

    skip_unless_browser()
    assert check_page_in_browser(html_path, tmp_path / "page.png") == []

Chromium comes from Debian (``apt-get install chromium``); playwright's own browser download is not
used. Without Chromium or playwright the browser tests skip, unless ``VAELAB_REQUIRE_BROWSER`` is
set (to anything but ``0``): then they fail, so that CI cannot pass without rendering the page.
Tests import this module as ``from browser import ...`` (``tests/`` has no ``__init__.py``, so
pytest puts it on ``sys.path``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
REQUIRE_BROWSER = "VAELAB_REQUIRE_BROWSER"
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
NARROW_WIDTH = 400  # a phone: the page must not scroll sideways at this width

_BROKEN_IMAGES_JS = """() => Array.from(document.images)
    .filter(img => !(img.complete && img.naturalWidth > 0))
    .map(img => img.alt || img.src.slice(0, 60))"""
_OVERFLOW_JS = "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"


def browser_unavailable() -> str | None:
    """Why the browser check cannot run here (a reason for ``pytest.skip``), or None if it can."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not found; install it with `apt-get install chromium`"
    if importlib.util.find_spec("playwright") is None:
        return "playwright (Python) is not installed; `pip install playwright`"
    return None


def skip_unless_browser() -> None:
    """Skip the calling test when the browser check cannot run here, or fail it where
    ``VAELAB_REQUIRE_BROWSER`` asks for the browser (CI sets it)."""
    reason = browser_unavailable()
    if reason is None:
        return
    if os.environ.get(REQUIRE_BROWSER, "") not in ("", "0"):
        pytest.fail(f"{REQUIRE_BROWSER} is set, but {reason}", pytrace=False)
    pytest.skip(reason)


def check_page_in_browser(
    html_path: str | os.PathLike[str],
    screenshot_path: str | os.PathLike[str] | None = None,
    width: int = 1100,
) -> list[str]:
    """Load ``html_path`` in headless Chromium and return what is wrong with it (empty: nothing).

    Reported: console errors, uncaught page errors, requests for anything but ``file:`` or
    ``data:`` URLs (a self-contained page makes none), images that did not decode, and sideways
    scrolling at ``width`` or at ``NARROW_WIDTH`` pixels. A full-page screenshot at ``width`` is
    saved to ``screenshot_path`` when given.
    """
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    url = Path(html_path).resolve().as_uri()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.on(
                "console",
                lambda m: (
                    problems.append(f"console error: {m.text}") if m.type == "error" else None
                ),
            )
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on(
                "request",
                lambda r: (
                    None
                    if r.url.startswith(("file:", "data:"))
                    else problems.append(f"external request: {r.url}")
                ),
            )
            page.goto(url, wait_until="load")
            problems.extend(
                f"image not loaded: {name}" for name in page.evaluate(_BROKEN_IMAGES_JS)
            )
            for viewport_width in (width, NARROW_WIDTH):
                page.set_viewport_size({"width": viewport_width, "height": 900})
                overflow = page.evaluate(_OVERFLOW_JS)
                if overflow > 0:
                    problems.append(
                        f"page scrolls sideways by {overflow}px at width {viewport_width}"
                    )
            if screenshot_path is not None:
                page.set_viewport_size({"width": width, "height": 900})
                page.screenshot(path=str(screenshot_path), full_page=True)
        finally:
            browser.close()
    return problems
