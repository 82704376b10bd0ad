"""A real browser for the dashboard: Debian's chromium (scripts/browser.sh) driven by Playwright.

Playwright launches the system chromium by its path; no browser is ever
downloaded (`playwright install` is not part of the set-up). Without chromium
or the playwright package the browser tests skip, and fail under CI=true.

Every page a test opens is watched: console errors, uncaught exceptions,
dialogs (an ``alert`` a task's text managed to run), and any request for a
host other than this machine, which is aborted before it leaves.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import unavailable

SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost"})
# How long expect() waits for the page to show something (it polls; no sleeps).
EXPECT_TIMEOUT_MS = 20_000


@dataclass
class Watch:
    """What one page did that a user would not want: each list must stay empty."""

    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    outside_requests: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    # Console errors a test expects (the browser logs a 401 answer to a wrong login, say).
    allowed_console: list[str] = field(default_factory=list)

    def unexpected_console(self) -> list[str]:
        return [m for m in self.console_errors if not any(a in m for a in self.allowed_console)]

    def check(self) -> None:
        assert self.unexpected_console() == [], "console errors"
        assert self.page_errors == [], "uncaught exceptions in the page"
        assert self.outside_requests == [], "requests for another host (aborted)"
        assert self.dialogs == [], "dialogs opened"


@pytest.fixture(scope="module")  # not session: its event loop must end before other tests run asyncio
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        unavailable("the playwright package is not installed (pip install -e '.[dev]')")
    chromium = shutil.which("chromium")
    if chromium is None:
        unavailable("no chromium on PATH: run scripts/browser.sh (as root, it installs Debian's chromium)")
    expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    args = ["--no-sandbox"] if os.geteuid() == 0 else []  # chromium's own sandbox refuses to run as root
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, headless=True, args=args)
        yield launched
        launched.close()


def _outside(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme not in ("data", "blob", "about") and parts.hostname not in LOCAL_HOSTS


@pytest.fixture
def watch() -> Watch:
    return Watch()


@pytest.fixture
def new_page(browser: Any, watch: Watch) -> Iterator[Any]:
    """``new_page(base_url)``: a page in a fresh context (no cookies), watched by ``watch``."""
    contexts: list[Any] = []

    def make(base_url: str) -> Any:
        context = browser.new_context(base_url=base_url, viewport={"width": 1280, "height": 800})
        contexts.append(context)

        def route(request_route: Any) -> None:
            url = request_route.request.url
            if _outside(url):
                watch.outside_requests.append(url)
                request_route.abort()
            else:
                request_route.continue_()

        context.route("**/*", route)
        page = context.new_page()
        page.on("console", lambda m: watch.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc: watch.page_errors.append(str(exc)))

        def dialog(d: Any) -> None:
            watch.dialogs.append(f"{d.type}: {d.message}")
            d.dismiss()

        page.on("dialog", dialog)
        return page

    yield make
    for context in contexts:
        context.close()


def screenshot(page: Any, name: str) -> Path:
    """The whole page as it is now, in tests/browser/screenshots/<name>.png (look at them)."""
    SCREENSHOTS.mkdir(exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.evaluate("window.scrollTo(0, 0)")  # a sticky header would otherwise be drawn mid-page
    page.screenshot(path=str(path), full_page=True)
    return path
