"""The console's shell: every page renders at desktop and phone sizes with labelled controls and no
errors, the key dialog works from the keyboard, and a server that needs a key says so."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.browser.conftest import ADMIN_KEY, PHONE, Console

PAGES = ["draw", "chat", "embed", "classify", "models", "metrics"]

# Controls without a label, an aria-label or aria-labelledby; and whether the page scrolls sideways.
UNLABELLED = """() => [...document.querySelectorAll('main input, main select, main textarea, main button')]
  .filter(el => !el.hidden && el.type !== 'hidden' && el.offsetParent !== null)
  .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                && !el.getAttribute('aria-labelledby') && !(el.tagName === 'BUTTON' && el.textContent.trim()))
  .map(el => el.outerHTML.slice(0, 120))"""
OVERFLOW = "() => document.documentElement.scrollWidth - window.innerWidth"


@pytest.mark.parametrize("size", ["desktop", "phone"])
def test_every_page_renders_labelled_and_fits(open_console: Callable[..., Console], size: str) -> None:
    console = open_console(viewport=PHONE if size == "phone" else None)
    for name in PAGES:
        page = console.goto(name)
        assert page.locator("main h1").count() >= 1, name
        assert page.evaluate(UNLABELLED) == [], name
        assert page.evaluate(OVERFLOW) <= 0, f"{name} scrolls sideways at {size}"
        assert page.locator("main .form-error:visible").count() == 0, name  # no error on arrival
        console.shot(f"page-{name}-{size}")


def test_a_server_with_keys_asks_for_one_and_the_dialog_sets_it(open_console: Callable[..., Console]) -> None:
    console = open_console(key=None)
    page = console.page
    page.goto(f"{console.url}/#/models")
    banner = page.locator("#banner")
    banner.wait_for(state="visible")
    assert "needs an API key" in banner.inner_text()
    assert "401" in page.locator("main").inner_text() or "key" in page.locator("main").inner_text()
    page.locator("#key-button").focus()  # from the keyboard: Enter opens, type, Enter saves
    page.keyboard.press("Enter")
    page.locator("#key-input").wait_for(state="visible")
    assert page.evaluate("() => document.activeElement.id") == "key-input"
    assert "No valid key" in page.locator("#key-status").inner_text()
    page.keyboard.type(ADMIN_KEY)
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelector('#key-button').textContent.includes('admin')")
    assert banner.is_hidden()
    page.wait_for_selector("main table")
    assert page.evaluate("() => sessionStorage.getItem('tandem.key')") == ADMIN_KEY
    page.locator("#key-button").click()
    page.locator("#key-clear").click()
    page.wait_for_function("() => document.querySelector('#key-button').textContent.includes('not set')")
    assert page.evaluate("() => sessionStorage.getItem('tandem.key')") is None
    console.shot("key-dialog-cleared")


def test_navigation_by_keyboard(console: Console) -> None:
    page = console.goto("draw")
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.className") == "skip"  # skip link first
    for _ in range(3):  # from the skip link: brand, Draw, Chat
        page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.dataset.page") == "chat"
    page.keyboard.press("Enter")
    page.wait_for_selector('main[data-page="chat"]')
    assert page.title().startswith("Chat")
    assert page.locator('#nav a[data-page="chat"]').get_attribute("aria-current") == "page"

