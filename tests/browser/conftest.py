"""The console in a real browser: Playwright for Python driving Debian's chromium (no download).

One `tandem serve` on the built-in models, with an API key and an admin key, serves every test of
this folder. Each test gets a fresh browser context (1280x800 unless it asks for a phone) whose
tab already holds the API key, and fails if the page logged a JavaScript error or a console
error. `shot(page, name)` saves a screenshot under test-artifacts/console/ (TANDEM_ARTIFACTS).

The console's Content-Security-Policy forbids eval, so `page.wait_for_function` / `page.evaluate`
take function strings (`"() => ..."`); a bare expression string fails.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, Server, start_server

API_KEY = "console-user-key"
ADMIN_KEY = "console-admin-key"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
_CLIENT_ERROR_LOG = re.compile(r"Failed to load resource: the server responded with a status of 4\d\d")
ARTIFACTS = Path(os.environ.get("TANDEM_ARTIFACTS", ROOT / "test-artifacts")) / "console"


def chromium_path() -> str:
    """Debian's chromium; the README's test set-up (make test) installs it when missing."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError("no chromium on PATH: run `apt-get install -y chromium` (make test does it when missing)")


# Package scope: the server and the browser go once this folder's tests are done. Playwright's sync
# API runs an event loop in this thread while it is open, which would break every later test that
# calls asyncio.run.
@pytest.fixture(scope="package")
def console_server() -> Iterator[Server]:
    server = start_server(None, "--cpu-workers", "1", "--api-key", API_KEY, "--admin-key", ADMIN_KEY)
    yield server
    server.stop()


@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


class Console:
    """A browser tab on the console, with the errors it logged."""

    def __init__(self, page: Any, url: str) -> None:
        self.page, self.url = page, url
        self.errors: list[str] = []
        page.on("console", self._on_console)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))

    def _on_console(self, message: Any) -> None:
        # Chromium logs every 4xx answer as "Failed to load resource": tests provoke those on purpose
        # (a bad field, a missing admin key) and the page shows them; a 5xx or anything else fails.
        if message.type == "error" and not _CLIENT_ERROR_LOG.match(message.text):
            self.errors.append(f"console.{message.type}: {message.text}")

    def goto(self, name: str) -> Any:
        """Open page `name` (#/draw, #/chat, ...) and wait until it has rendered."""
        self.page.goto(f"{self.url}/#/{name}")
        self.page.wait_for_selector(f'main[data-page="{name}"]')  # app.js sets it once the page mounted
        return self.page

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


def _tab(browser: Any, server: Server, key: str | None, viewport: dict[str, int]) -> tuple[Any, Console]:
    context = browser.new_context(viewport=viewport, accept_downloads=True)
    if key is not None:
        context.add_init_script(f"sessionStorage.setItem('tandem.key', {key!r})")
    page = context.new_page()
    page.set_default_timeout(60_000)
    return context, Console(page, server.url)


@pytest.fixture
def open_console(browser: Any, console_server: Server) -> Iterator[Callable[..., Console]]:
    """open_console(key=API_KEY, viewport=DESKTOP) -> Console; errors logged by any tab fail the test."""
    opened: list[tuple[Any, Console]] = []

    def open_(key: str | None = API_KEY, viewport: dict[str, int] | None = None) -> Console:
        context, console = _tab(browser, console_server, key, viewport or DESKTOP)
        opened.append((context, console))
        return console

    yield open_
    errors = [e for _, c in opened for e in c.errors]
    for context, _ in opened:
        context.close()
    assert not errors, "the console logged errors:\n" + "\n".join(errors)


@pytest.fixture
def console(open_console: Callable[..., Console]) -> Console:
    """A desktop tab holding the API key."""
    return open_console()


@pytest.fixture
def admin_console(open_console: Callable[..., Console]) -> Console:
    """A desktop tab holding the admin key."""
    return open_console(key=ADMIN_KEY)
