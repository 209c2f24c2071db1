"""The console's playgrounds in chromium: chat (#/chat), embeddings (#/embed), classification (#/classify).

Every answer the page shows is checked against the same request sent straight to the API; model
output must land in the DOM as text (a copied `<b>hi</b>` is shown, never parsed).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.browser.conftest import API_KEY, PHONE, Console
from tests.conftest import Server

CATS = {"tabby, tabby cat", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat, Siamese"}

# Records every text node added to an assistant message, so a test can tell a streamed answer
# (many additions) from one set at once.
WATCH_DELTAS = """() => {
  window.__deltas = [];
  new MutationObserver((records) => {
    for (const r of records) {
      if (!r.target.closest || !r.target.closest('.msg.assistant .text')) continue;
      for (const n of r.addedNodes) window.__deltas.push(n.textContent);
    }
  }).observe(document.getElementById('chat-log'), {childList: true, subtree: true, characterData: true});
}"""


def api(server: Server) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"})


def chat_answer(server: Server, model: str, content: str) -> str:
    with api(server) as c:
        r = c.post("/v1/chat/completions", json={"model": model, "temperature": 0,
                                                 "messages": [{"role": "user", "content": content}]})
    r.raise_for_status()
    return str(r.json()["choices"][0]["message"]["content"])


def send(page: Any, text: str) -> Any:
    """Type a message and send it with the keyboard; return the new assistant message once done."""
    before = page.locator(".msg.assistant").count()
    page.fill("#chat-message", text)
    page.press("#chat-message", "Enter")
    answer = page.locator(".msg.assistant").nth(before)
    answer.wait_for()
    page.wait_for_function("(n) => { const m = document.querySelectorAll('.msg.assistant')[n];"
                           " return m && m.dataset.finish; }", arg=before)
    page.wait_for_selector("#chat-send:not([disabled])")
    return answer


def no_horizontal_scroll(page: Any) -> None:
    width = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"the page scrolls sideways: {width}"


def test_chat_streams_an_adapters_answer(console: Console, console_server: Server) -> None:
    page = console.goto("chat")
    adapters = page.eval_on_selector_all("#chat-adapter option", "os => os.map(o => o.value)")
    assert adapters[0] == "tiny-llm" and {"reverse", "upper", "sort", "increment"} <= set(adapters)
    assert "=" in page.inner_text("#chat-model-hint")  # the prompt format of tiny-llm is explained
    page.select_option("#chat-adapter", "reverse")
    assert page.input_value("#chat-temperature") == "0"
    page.evaluate(WATCH_DELTAS)
    answer = send(page, "hello")
    want = chat_answer(console_server, "reverse", "hello")
    assert want == "olleh"
    assert answer.locator(".text").inner_text() == want
    deltas = page.evaluate("() => window.__deltas")
    assert len(deltas) > 1 and "".join(deltas) == want, deltas  # streamed, token by token
    assert answer.get_attribute("data-finish") == "stop"
    assert "completion tokens" in page.inner_text("#chat-status")
    assert page.locator(".msg.user .text").inner_text() == "hello"
    assert page.is_disabled("#chat-stop-button")
    console.shot("chat")

    # A server error is shown next to the field it names, and the message comes back to be resent.
    page.fill("#chat-temperature", "5")
    page.fill("#chat-message", "abc")
    page.click("#chat-send")
    error = page.locator('.field[data-param="temperature"] .field-error')
    error.wait_for()
    assert "temperature" in error.inner_text()
    assert page.input_value("#chat-message") == "abc" and page.locator(".msg.assistant").count() == 1
    page.fill("#chat-temperature", "0")
    page.select_option("#chat-adapter", "upper")
    assert send(page, "abc").locator(".text").inner_text() == chat_answer(console_server, "upper", "abc") == "ABC"
    assert page.locator('.field[data-param="temperature"].invalid').count() == 0

    page.click("#chat-clear")
    assert page.locator(".msg").count() == 0


def test_chat_output_is_text_never_markup(console: Console, console_server: Server) -> None:
    page = console.goto("chat")
    page.select_option("#chat-adapter", "tiny-llm")
    for markup in ("<b>hi</b>", "<img src>"):
        want = chat_answer(console_server, "tiny-llm", markup)
        assert want == markup  # the base weights copy it, tags and all
        answer = send(page, markup)
        assert answer.locator(".text").inner_text() == markup
        assert answer.locator(".text").evaluate("el => el.textContent") == markup
    # Nothing in the conversation became an element: only the page's own spans.
    tags = page.eval_on_selector_all("#chat-log *", "els => [...new Set(els.map(e => e.tagName))]")
    assert set(tags) <= {"DIV", "SPAN"}, tags
    assert page.locator("#chat-log b, #chat-log img, main img").count() == 0


def test_embeddings_matrix_is_the_cosine_similarity(console: Console, console_server: Server) -> None:
    page = console.goto("embed")
    texts = [t.strip() for t in page.input_value("#embed-texts").split("\n") if t.strip()]
    assert 3 <= len(texts) <= 4
    page.click("#embed-run")
    page.wait_for_selector("#embed-matrix")
    with api(console_server) as c:
        r = c.post("/v1/embeddings", json={"model": "embeddings", "input": texts})
    r.raise_for_status()
    body = r.json()
    vectors = np.array([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])], dtype=np.float64)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = unit @ unit.T
    cells = page.eval_on_selector_all("#embed-matrix td", "tds => tds.map(td => [+td.dataset.i, +td.dataset.j,"
                                      " td.textContent, td.style.backgroundColor])")
    assert len(cells) == len(texts) ** 2
    for i, j, text, shade in cells:
        assert text == f"{sims[i, j]:.3f}" or abs(float(text) - sims[i, j]) <= 0.0005 + 1e-6, (i, j, text)
        assert shade.startswith("rgb"), shade  # shaded from script, which the CSP allows
    assert [c[2] for c in cells if c[0] == c[1]] == ["1.000"] * len(texts)
    assert page.inner_text('[data-testid="embed-dim"]') == f"{vectors.shape[1]} dimensions"
    assert page.inner_text('[data-testid="embed-tokens"]') == f"{body['usage']['prompt_tokens']} tokens"
    console.shot("embed")

    # Blank lines are skipped; a server error (an unknown model) is shown.
    page.fill("#embed-texts", "alpha\n\n  beta  \n")
    page.click("#embed-run")
    page.wait_for_function("() => document.querySelectorAll('#embed-matrix td').length === 4")
    page.eval_on_selector("#embed-model", "s => s.append(new Option('no-such-model', 'no-such-model'))")
    page.select_option("#embed-model", "no-such-model")
    page.click("#embed-run")
    error = page.locator("#embed-form [role=alert]:visible")
    error.wait_for()
    assert "no-such-model" in error.inner_text() and page.is_hidden("#embed-matrix-wrap")


def test_classify_an_uploaded_photo_and_a_bad_file(console: Console, tmp_path: Path) -> None:
    from PIL import Image
    from skimage import data

    cat = tmp_path / "chelsea.png"
    Image.fromarray(data.chelsea()).save(cat)
    page = console.goto("classify")
    assert page.is_disabled("#classify-run")
    page.set_input_files("#classify-file", str(cat))
    page.wait_for_selector("#classify-bars .bar >> nth=4")
    bars = page.locator("#classify-bars .bar")
    assert bars.count() == 5
    assert bars.first.locator(".label").inner_text() in CATS
    scores = [float(s) for s in page.eval_on_selector_all("#classify-bars .bar", "bs => bs.map(b => b.dataset.score)")]
    assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1
    fill, track = page.evaluate("() => { const b = document.querySelector('#classify-bars .bar');"
                                " return [b.querySelector('.fill').getBoundingClientRect().width,"
                                " b.querySelector('.track').getBoundingClientRect().width]; }")
    assert fill / track == pytest.approx(scores[0], abs=0.02)
    assert bars.first.locator(".pct").inner_text() == f"{scores[0] * 100:.1f}%"
    assert page.evaluate("() => { const i = document.getElementById('classify-preview');"
                         " return !i.hidden && i.complete && i.naturalWidth; }") == 451  # chelsea is 451x300
    console.shot("classify")

    bad = tmp_path / "x.png"
    bad.write_bytes(b"this is text, not a picture\n")
    page.set_input_files("#classify-file", str(bad))
    error = page.locator("#classify-error")
    error.wait_for()
    assert "could not decode image" in error.inner_text()
    assert page.locator("#classify-bars .bar").count() == 0

    # Drag and drop: the same photo dropped on the zone is classified alike.
    png = base64.b64encode(cat.read_bytes()).decode()
    page.evaluate("""(b64) => {
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      const dt = new DataTransfer();
      dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
      const zone = document.getElementById('classify-drop');
      zone.dispatchEvent(new DragEvent('dragenter', {dataTransfer: dt, bubbles: true, cancelable: true}));
      if (!zone.classList.contains('over')) throw new Error('no .over while dragging');
      zone.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""", png)
    page.wait_for_selector("#classify-bars .bar >> nth=4")
    assert page.is_hidden("#classify-error") and "dropped.png" in page.inner_text("#classify-chosen")
    assert bars.first.locator(".label").inner_text() in CATS
    assert page.get_attribute("#classify-drop", "class") == "drop"


@pytest.mark.parametrize("name", ["chat", "embed", "classify"])
def test_phone_layout_has_no_sideways_scroll(open_console: Any, console_server: Server, name: str,
                                             tmp_path: Path) -> None:
    console = open_console(viewport=PHONE)
    page = console.goto(name)
    if name == "chat":
        assert not page.eval_on_selector("#chat-sampling", "d => d.open")  # folded: the conversation is in view
        page.select_option("#chat-adapter", "sort")
        send(page, "the quick brown fox")
    elif name == "embed":
        page.click("#embed-run")
        page.wait_for_selector("#embed-matrix")
        wrap = page.evaluate("() => { const w = document.getElementById('embed-matrix-wrap');"
                             " return [w.scrollWidth, w.clientWidth, getComputedStyle(w).overflowX]; }")
        assert wrap[2] == "auto"  # a wide matrix scrolls inside its frame, not the page
    else:
        from PIL import Image
        from skimage import data

        path = tmp_path / "cat.png"
        Image.fromarray(data.chelsea()).save(path)
        page.set_input_files("#classify-file", str(path))
        page.wait_for_selector("#classify-bars .bar >> nth=4")
    no_horizontal_scroll(page)
    console.shot(f"{name}-phone")
