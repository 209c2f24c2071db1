"""The console's drawing studio (#/draw) in a real browser, on the built-in 64x64 text-to-image model."""

from __future__ import annotations

import base64
from typing import Any

import httpx

from tests.browser.conftest import API_KEY, PHONE, Console

PROMPT = "a red circle on a blue background"

# Records, in order, what the result images and the progress bar showed (a MutationObserver sees
# every change, however short-lived, so the test does not race the page).
_TRACE = """() => {
  window.__draw = {images: [], steps: []};
  const out = document.querySelector('#draw-output');
  const note = () => {
    for (const img of out.querySelectorAll('#draw-results img')) {
      const item = `${img.dataset.index}|${img.dataset.state}|${img.getAttribute('src') || ''}`;
      if (window.__draw.images.at(-1) !== item) window.__draw.images.push(item);
    }
    const p = out.querySelector('#draw-progress');
    if (p.hasAttribute('value')) window.__draw.steps.push(Number(p.value));
  };
  new MutationObserver(note).observe(out, {subtree: true, childList: true, attributes: true});
}"""


def _fill(page: Any, *, prompt: str = PROMPT, steps: int | None = None, n: int | None = None) -> None:
    page.fill("#draw-prompt", prompt)
    if steps is not None:
        page.fill("#draw-steps", str(steps))
    if n is not None:
        page.fill("#draw-n", str(n))


def _wait_done(page: Any, state: str = "done") -> None:
    """Wait until the run ended (done, failed or cancelled) and check it ended as `state`."""
    ended = ",".join(f'#draw-status[data-state="{s}"]' for s in ("done", "error", "cancelled"))
    page.wait_for_selector(ended, timeout=30_000)
    assert page.get_attribute("#draw-status", "data-state") == state, page.text_content("#draw-status")


def _finals(page: Any) -> list[str]:
    return page.eval_on_selector_all('#draw-results img[data-state="final"]', "els => els.map(e => e.src)")


def _entry_images(page: Any, index: int) -> list[str]:
    return page.eval_on_selector_all(
        f'[data-testid="draw-entry"]:nth-child({index + 1}) img', "els => els.map(e => e.src)")


def _png(data_url: str) -> bytes:
    assert data_url.startswith("data:image/png;base64,"), data_url[:40]
    raw = base64.b64decode(data_url.split(",", 1)[1])
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return raw


def test_draw_streams_progress_preview_and_final(console: Console) -> None:
    page = console.goto("draw")
    assert page.is_checked("#draw-random")
    assert page.input_value("#draw-size") == "64x64"
    assert page.input_value("#draw-sampler") == "dpmpp_2m"
    page.evaluate(_TRACE)
    _fill(page, steps=80)  # ~1 s: previews are throttled to one per 250 ms
    page.click("#draw-generate")
    _wait_done(page)

    trace = page.evaluate("window.__draw")
    steps = trace["steps"]
    assert any(0 < s < 80 for s in steps), f"the bar never showed an intermediate step: {steps}"
    states = [item.split("|")[1] for item in trace["images"] if item.split("|")[2]]
    assert "preview" in states, trace["images"]
    assert states.index("preview") < states.index("final"), states
    preview_src = next(i.split("|", 2)[2] for i in trace["images"] if "|preview|" in i)
    _png(preview_src)

    finals = _finals(page)
    assert len(finals) == 1
    _png(finals[0])
    shown = page.text_content("#draw-seed-value")
    assert shown and shown.isdigit()
    assert page.input_value("#draw-seed") == shown  # the seed used is filled in, editable
    assert page.is_checked("#draw-random")  # ... and the next run is random again
    entry = page.locator('[data-testid="draw-entry"]').first
    assert entry.get_attribute("data-seed") == shown
    assert entry.locator('dd[data-key="prompt"]').text_content() == PROMPT
    assert entry.locator('dd[data-key="steps"]').text_content() == "80"
    href = entry.locator('[data-testid="draw-download"]').get_attribute("href")
    assert href == finals[0]
    assert entry.locator('[data-testid="draw-download"]').get_attribute("download") == f"tandem-{shown}.png"
    console.shot("draw")


def test_again_with_this_seed_reproduces_the_bytes(console: Console, console_server: Any) -> None:
    page = console.goto("draw")
    _fill(page, prompt="a green square on a yellow background", steps=12, n=2)
    page.fill("#draw-negative", "blurry")
    page.click("#draw-generate")
    _wait_done(page)
    seed = int(page.text_content("#draw-seed-value") or "")
    first = _entry_images(page, 0)
    assert len(first) == 2 and first[0] != first[1]

    # Change the form, then let the gallery refill it with exactly the run's parameters.
    _fill(page, prompt="something else", steps=5, n=1)
    page.click('[data-testid="draw-entry"] >> nth=0 >> [data-testid="draw-again"]')
    page.wait_for_function("() => document.querySelectorAll('[data-testid=\"draw-entry\"]').length === 2")
    _wait_done(page)
    assert page.input_value("#draw-prompt") == "a green square on a yellow background"
    assert page.input_value("#draw-steps") == "12"
    assert page.input_value("#draw-n") == "2"
    assert page.input_value("#draw-seed") == str(seed)
    again = _entry_images(page, 0)
    assert page.get_attribute('[data-testid="draw-entry"] >> nth=0', "data-seed") == str(seed)
    assert [_png(s) for s in again] == [_png(s) for s in first]

    # The same request made directly gives the same bytes.
    r = httpx.post(f"{console_server.url}/v1/images/generations", timeout=60,
                   headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"model": "text-to-image", "prompt": "a green square on a yellow background",
                         "negative_prompt": "blurry", "size": "64x64", "steps": 12,
                         "guidance_scale": float(page.input_value("#draw-guidance")),
                         "sampler": "dpmpp_2m", "seed": seed, "n": 2, "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    direct = [base64.b64decode(d["b64_json"]) for d in r.json()["data"]]
    assert direct == [_png(s) for s in first]

    # The history outlives a reload of the tab.
    page.reload()
    page.wait_for_selector('[data-testid="draw-entry"]')
    assert page.locator('[data-testid="draw-entry"]').count() == 2
    assert _entry_images(page, 1) == first


def test_server_error_shows_next_to_the_field(console: Console) -> None:
    page = console.goto("draw")
    _fill(page, steps=1000)
    page.click("#draw-generate")
    error = page.locator('.field[data-param="steps"] .field-error')
    error.wait_for(state="visible")
    assert "between 1 and 100" in (error.text_content() or "")
    assert page.get_attribute("#draw-steps", "aria-invalid") == "true"
    assert page.is_hidden("#draw-form-error")
    assert page.get_attribute("#draw-status", "data-state") == "error"

    page.fill("#draw-prompt", "")  # now an empty prompt: the server names `prompt`
    page.fill("#draw-steps", "10")
    page.click("#draw-generate")
    page.locator('.field[data-param="prompt"] .field-error').wait_for(state="visible")
    assert page.is_hidden('.field[data-param="steps"] .field-error')

    _fill(page, steps=10)
    page.click("#draw-generate")
    _wait_done(page)
    assert page.is_hidden('.field[data-param="prompt"] .field-error')
    assert len(_finals(page)) == 1


def test_cancel_then_generate_again(console: Console) -> None:
    page = console.goto("draw")
    _fill(page, steps=100, n=4)
    page.click("#draw-generate")
    page.wait_for_function("() => Number(document.querySelector('#draw-progress').dataset.step) >= 1")
    assert page.is_enabled("#draw-cancel")
    page.click("#draw-cancel")
    _wait_done(page, "cancelled")
    assert "cancelled" in (page.text_content("#draw-status") or "").lower()
    assert page.is_disabled("#draw-cancel") and page.is_enabled("#draw-generate")
    assert page.locator('[data-testid="draw-entry"]').count() == 0

    _fill(page, steps=10, n=1)
    page.click("#draw-generate")
    _wait_done(page)
    assert len(_finals(page)) == 1
    assert page.locator('[data-testid="draw-entry"]').count() == 1


def test_phone_layout_has_no_horizontal_scroll(open_console: Any) -> None:
    console = open_console(viewport=PHONE)
    page = console.goto("draw")
    _fill(page, prompt="a blue triangle on a white background", steps=10, n=2)
    page.focus("#draw-prompt")
    page.keyboard.press("Control+Enter")  # in the prompt: generates
    _wait_done(page)
    assert page.locator('[data-testid="draw-entry"]').count() == 1
    assert page.evaluate("document.documentElement.scrollWidth <= innerWidth"), page.evaluate(
        "[document.documentElement.scrollWidth, innerWidth]")
    console.shot("draw-phone")
