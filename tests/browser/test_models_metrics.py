"""The console's models page (#/models: table, load/unload through the Triton repository API) and
metrics page (#/metrics: live charts from /metrics) in a real browser, plus prom.js's arithmetic."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.browser.conftest import ADMIN_KEY, API_KEY, PHONE, Console
from tests.conftest import Server

BUILT_IN = {"embeddings": "model", "image-classifier": "model", "text-to-image": "diffusion", "tiny-llm": "llm"}
OVERFLOW = "() => document.documentElement.scrollWidth - window.innerWidth"
UNLABELLED = """() => [...document.querySelectorAll('main input, main select, main textarea, main button')]
  .filter(el => !el.hidden && el.offsetParent !== null)
  .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                && !el.getAttribute('aria-labelledby') && !(el.tagName === 'BUTTON' && el.textContent.trim()))
  .map(el => el.outerHTML.slice(0, 120))"""


def _headers(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _index(server: Server) -> dict[str, str]:
    r = httpx.post(f"{server.url}/v2/repository/index", headers=_headers(), timeout=30)
    r.raise_for_status()
    states: dict[str, str] = {}
    for m in r.json():  # a name is READY when any of its versions is
        states[m["name"]] = "READY" if m["state"] == "READY" or states.get(m["name"]) == "READY" else m["state"]
    return states


def _png() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _row(page: Any, name: str) -> Any:
    return page.locator(f'#models-table tr[data-model="{name}"]')


def _wait_state(page: Any, name: str, state: str, timeout: float = 60_000) -> None:
    page.wait_for_function(
        """([name, state]) => { const tr = document.querySelector(`#models-table tr[data-model="${name}"]`);
             return tr && tr.dataset.state === state && !tr.dataset.busy; }""",
        arg=[name, state], timeout=timeout)


def test_models_table_lists_the_built_in_models(console: Console, console_server: Server) -> None:
    page = console.goto("models")
    page.wait_for_selector('#models-table tr[data-model="tiny-llm"]')
    served = httpx.get(f"{console_server.url}/tandem/v1/models", headers=_headers(), timeout=30).json()["models"]
    for name, kind in BUILT_IN.items():
        row = _row(page, name)
        assert row.get_attribute("data-state") == "READY", name
        assert row.locator(".c-state").inner_text().strip() == "READY"
        assert row.locator(".c-kind .kind").inner_text() == kind
        entry = next(m for m in served if m["name"] == name)
        assert entry["card"]["task"] in row.locator(".c-kind").inner_text()
        assert row.locator(".c-version").inner_text().strip() == entry["version"]
        replicas = row.locator(".replicas li")
        assert replicas.count() == len(entry["replicas"]) >= 1
        first = entry["replicas"][0]
        text = replicas.first.inner_text()
        assert first["device"] in text and f"pid {first['pid']}" in text and "ready" in text and "0 restarts" in text
        rss = int(row.locator(".rss").get_attribute("data-bytes"))
        assert rss > 10 * 2**20, (name, rss)  # a real process: tens of MiB at least
        assert row.locator(".rss").inner_text().endswith("MiB") or row.locator(".rss").inner_text().endswith("GiB")
    names = page.eval_on_selector_all("#models-table tbody tr", "trs => trs.map(t => t.dataset.model)")
    assert names == sorted(names) and set(BUILT_IN) <= set(names)
    assert "null" not in page.locator("main").inner_text() and "undefined" not in page.locator("main").inner_text()
    page.locator("#models-refresh").click()  # refresh keeps the rows (and their buttons)
    page.wait_for_function("() => document.querySelector('#models-updated').textContent.includes('ready')")
    assert _row(page, "embeddings").get_attribute("data-state") == "READY"
    console.shot("models")


def test_models_with_the_api_key_needs_the_admin_key(open_console: Callable[..., Console]) -> None:
    console = open_console(key=API_KEY)
    page = console.goto("models")
    note = page.locator("#models-admin-note")
    assert note.is_visible()
    assert "Loading and unloading needs the admin key: set it with the key button" in note.inner_text()
    buttons = page.locator("#models-table button[data-action]")
    assert buttons.count() == 2 * len(BUILT_IN)
    assert all(buttons.nth(i).is_disabled() for i in range(buttons.count()))

    # An admin tab whose key is swapped for the API key behind its back: the server's 403 shows.
    admin = open_console(key=ADMIN_KEY)
    page = admin.goto("models")
    assert page.locator("#models-admin-note").count() == 0
    load = _row(page, "embeddings").locator('button[data-action="load"]')
    assert load.is_enabled()
    page.evaluate(f"() => sessionStorage.setItem('tandem.key', {API_KEY!r})")
    load.click()
    error = page.locator("#models-error")
    error.wait_for(state="visible")
    assert "403" in error.inner_text() or "admin key" in error.inner_text()
    _wait_state(page, "embeddings", "READY")


def test_unload_then_load_image_classifier(admin_console: Console, console_server: Server) -> None:
    page = admin_console.goto("models")
    name = "image-classifier"
    row = _row(page, name)
    try:
        # From the keyboard: Enter opens the confirmation with Cancel focused; Escape keeps the model.
        row.locator('button[data-action="unload"]').focus()
        page.keyboard.press("Enter")
        page.locator("#unload-dialog").wait_for(state="visible")
        assert page.evaluate("() => document.activeElement.id") == "unload-cancel"
        assert name in page.locator("#unload-dialog").inner_text()
        page.keyboard.press("Escape")
        page.locator("#unload-dialog").wait_for(state="hidden")
        assert row.get_attribute("data-state") == "READY" and _index(console_server)[name] == "READY"
        admin_console.shot("models-unload-confirm-closed")

        row.locator('button[data-action="unload"]').click()
        page.locator("#unload-dialog").wait_for(state="visible")
        admin_console.shot("models-unload-dialog")
        page.keyboard.press("Shift+Tab")  # Cancel -> Unload
        assert page.evaluate("() => document.activeElement.id") == "unload-confirm"
        page.keyboard.press("Enter")
        _wait_state(page, name, "UNAVAILABLE")
        assert "unloaded" in row.locator(".c-state").inner_text()  # the reason
        assert row.locator(".replicas li").count() == 0
        assert _index(console_server)[name] == "UNAVAILABLE"
        assert _row(page, "embeddings").get_attribute("data-state") == "READY"
        assert "unloaded" in page.locator("#models-status").inner_text()

        load = row.locator('button[data-action="load"]')
        assert load.inner_text().startswith("Load")
        assert row.locator('button[data-action="unload"]').is_disabled()  # nothing to unload
        load.click()
        page.wait_for_selector(f'#models-table tr[data-model="{name}"][data-busy="load"] .op progress')
        assert load.is_disabled()
        admin_console.shot("models-loading")
        _wait_state(page, name, "READY")
        assert row.locator(".replicas li").count() >= 1
        assert "loaded" in page.locator("#models-status").inner_text()
        assert page.locator("#models-error").is_hidden()
        assert _index(console_server)[name] == "READY"
        r = httpx.post(f"{console_server.url}/predictions/{name}", json={"image": _png()}, headers=_headers(),
                       timeout=60)
        assert r.status_code == 200, r.text
        assert len(r.json()["predictions"]) == 5
    finally:  # other modules share this server: leave the model served
        if _index(console_server).get(name) != "READY":
            httpx.post(f"{console_server.url}/v2/repository/models/{name}/load", headers=_headers(ADMIN_KEY),
                       timeout=120).raise_for_status()


@pytest.fixture
def traffic(console_server: Server) -> Iterator[dict[str, Any]]:
    """Start sending embeddings requests (every third one a 400) until the test stops it."""
    stop = threading.Event()
    sent = {"ok": 0, "bad": 0, "unexpected": []}

    def send() -> None:
        with httpx.Client(base_url=console_server.url, headers=_headers(), timeout=30) as c:
            i = 0
            while not stop.is_set() and i < 400:
                bad = i % 3 == 2
                r = c.post("/v1/embeddings", json={"model": "embeddings", "input": 5 if bad else f"text {i}"})
                if r.status_code == (400 if bad else 200):
                    sent["bad" if bad else "ok"] += 1
                else:
                    sent["unexpected"].append(r.status_code)
                i += 1
                time.sleep(0.03)

    thread = threading.Thread(target=send, daemon=True)
    sent["start"] = thread.start
    yield sent
    stop.set()
    if thread.ident is not None:
        thread.join(30)


_LIVE = """() => {
  const card = (m) => document.querySelector(`figure[data-model="embeddings"][data-metric="${m}"]`);
  const n = (el, k) => Number(el.dataset[k] || "NaN");
  const req = card("requests"), err = card("errors"), lat = card("latency");
  return n(req, "latest") > 0 && n(err, "latest") > 0 && n(lat, "latest_p50") > 0
    && req.querySelector("path.line").getAttribute("d").length > 0
    && lat.querySelector("path.line").getAttribute("d").length > 0;
}"""


def test_metrics_charts_show_live_traffic(console: Console, traffic: dict[str, Any]) -> None:
    page = console.goto("metrics")
    sections = page.eval_on_selector_all("section.model-metrics", "els => els.map(e => e.dataset.model)")
    assert sections == sorted(BUILT_IN)  # only served models: no `_unknown`
    page.wait_for_function("() => document.querySelector('#metrics-status').textContent.includes('First')")
    traffic["start"]()
    page.wait_for_function(_LIVE, timeout=45_000)
    assert traffic["ok"] > 0 and traffic["bad"] > 0 and not traffic["unexpected"]
    req = page.locator('figure[data-model="embeddings"][data-metric="requests"]')
    label = req.locator("svg").get_attribute("aria-label")
    assert req.locator("svg").get_attribute("role") == "img"
    assert label.startswith("Requests per second of embeddings: latest ") and "req/s" in label
    assert req.locator("figcaption").inner_text().startswith("Requests/s")
    assert "req/s" in req.locator(".chart-latest").inner_text()
    assert req.locator("svg text.unit").text_content() == "req/s"
    lat = page.locator('figure[data-model="embeddings"][data-metric="latency"]')
    p50 = float(lat.get_attribute("data-latest_p50"))
    assert 0 < p50 < 30_000 and float(lat.get_attribute("data-latest_p99")) >= p50
    assert lat.locator("path.line").count() == 3 and lat.locator(".legend li").count() == 3
    batch = page.locator('figure[data-model="embeddings"][data-metric="batch"]')
    page.wait_for_function("""() => Number(document.querySelector(
        'figure[data-model="embeddings"][data-metric="batch"]').dataset.latest || 0) >= 1
        || [...document.querySelectorAll('figure[data-model="embeddings"][data-metric="batch"] path')]
           .some(p => p.getAttribute('d'))""")
    assert batch.locator("figcaption").inner_text().startswith("Batch size")
    llm = page.locator('figure[data-model="tiny-llm"][data-metric="batch"]')
    assert llm.locator("figcaption").inner_text().startswith("Running sequences")
    assert page.locator('figure[data-model="tiny-llm"][data-metric="queue"] path.line').count() == 2
    assert page.locator('figure[data-model="text-to-image"][data-metric="batch"] figcaption').inner_text() \
        .startswith("UNet rows")
    # Every chart is named, with its latest value once data came.
    labels = page.eval_on_selector_all("main svg.chart", "els => els.map(e => e.getAttribute('aria-label'))")
    assert len(labels) == 5 * len(BUILT_IN) and all("latest" in a for a in labels)
    page.select_option("#metrics-model", "embeddings")
    assert page.locator("section.model-metrics:visible").count() == 1
    console.shot("metrics")
    page.select_option("#metrics-model", "")
    assert page.locator("section.model-metrics:visible").count() == len(BUILT_IN)


_PROM_TEXT = r"""# HELP tandem_requests_total Requests answered
# TYPE tandem_requests_total counter
tandem_requests_total{endpoint="openai_embeddings",model="embeddings",status="200"} 3.0
tandem_requests_total{model="we\"ird\\name\nx",status="400"} 1e3 1700000000000
# a comment
lat_bucket{le="0.1",model="m"} 10.0
lat_bucket{le="0.2",model="m"} 30.0
lat_bucket{le="0.5",model="m"} 40.0
lat_bucket{le="+Inf",model="m"} 40.0
lat_count{model="m"} 40.0
up 1
nan_gauge NaN
"""

_PROM_CHECKS = """async (text) => {
  const m = await import('/console/js/prom.js');
  const s = m.parse(text);
  const B = (pairs) => pairs.map(([le, count]) => ({le, count}));
  const zero = B([[0.1, 0], [0.2, 0], [0.5, 0], [Infinity, 0]]);
  const after = m.buckets(s, 'lat', {model: 'm'});
  const api = await import('/console/js/api.js');
  const live = m.parse(await (await api.call('GET', '/metrics')).text());
  return {
    n: s.length, first: s[0], weird: s[1], infBucket: s.find(x => x.labels.le === '+Inf'),
    up: s.find(x => x.name === 'up').value, nan: Number.isNaN(s.find(x => x.name === 'nan_gauge').value),
    after: after.map(b => [String(b.le), b.count]),
    p50: m.quantile(0.5, zero, after), p99: m.quantile(0.99, null, after),
    p50Shifted: m.quantile(0.5, B([[0.1, 5], [0.2, 5], [0.5, 5], [Infinity, 5]]),
                           B([[0.1, 15], [0.2, 35], [0.5, 45], [Infinity, 45]])),
    inInf: m.quantile(0.99, zero, B([[0.1, 10], [0.2, 30], [0.5, 40], [Infinity, 50]])),
    quiet: m.quantile(0.5, after, after),
    afterReset: m.quantile(0.5, B([[0.1, 100], [0.2, 300], [0.5, 400], [Infinity, 400]]), after),
    rateUp: m.rate(3, 10, 2), rateReset: m.rate(10, 3, 2), rateNew: m.rate(undefined, 4, 2),
    sumReset: m.counterIncrease(
      [{name: 'c', labels: {a: '1'}, value: 100}, {name: 'c', labels: {a: '2'}, value: 5}],
      [{name: 'c', labels: {a: '1'}, value: 2}, {name: 'c', labels: {a: '2'}, value: 6},
       {name: 'c', labels: {a: '3'}, value: 1}], 'c'),
    meanReset: m.meanOver(
      [{name: 'b_sum', labels: {}, value: 90}, {name: 'b_count', labels: {}, value: 10}],
      [{name: 'b_sum', labels: {}, value: 8}, {name: 'b_count', labels: {}, value: 2}], 'b'),
    liveHasRequests: live.some(x => x.name === 'tandem_requests_total'),
    liveBuckets: m.buckets(live, 'tandem_request_latency_seconds', {model: 'embeddings'}).length,
    bad: (() => { try { m.parse('x{a="unterminated} 1'); return 'parsed'; } catch (e) { return e.name; } })(),
  };
}"""


def test_prom_parser_and_helpers(console: Console) -> None:
    page = console.goto("metrics")
    r = page.evaluate(_PROM_CHECKS, _PROM_TEXT)
    assert r["n"] == 9
    assert r["first"] == {"name": "tandem_requests_total", "value": 3,
                          "labels": {"endpoint": "openai_embeddings", "model": "embeddings", "status": "200"}}
    assert r["weird"]["labels"]["model"] == 'we"ird\\name\nx' and r["weird"]["value"] == 1000  # + a timestamp
    assert r["infBucket"]["value"] == 40 and r["up"] == 1 and r["nan"]
    assert r["after"] == [["0.1", 10], ["0.2", 30], ["0.5", 40], ["Infinity", 40]]
    # rank 20 of 40 falls in (0.1, 0.2] holding 20 (10 below): 0.1 + 0.1 * 10/20; p99: 0.2 + 0.3 * 9.6/10.
    assert r["p50"] == pytest.approx(0.15) and r["p50Shifted"] == pytest.approx(0.15)
    assert r["p99"] == pytest.approx(0.488)
    assert r["inInf"] == pytest.approx(0.5)  # in +Inf: the highest finite bound
    assert r["quiet"] is None  # nothing observed in the interval
    assert r["afterReset"] == pytest.approx(0.15)  # a reset histogram counts from 0
    assert r["rateUp"] == pytest.approx(3.5)
    assert r["rateReset"] == pytest.approx(1.5) and r["rateReset"] >= 0  # restarted at 0, counted 3
    assert r["rateNew"] == pytest.approx(2)
    assert r["sumReset"] == pytest.approx(2 + 1 + 1)  # a reset series is not hidden by the others
    assert r["meanReset"] == pytest.approx(4)
    assert r["liveHasRequests"] and r["liveBuckets"] == 15  # 14 bounds + +Inf
    assert r["bad"] == "SyntaxError"


def test_phone_pages_do_not_scroll_sideways(open_console: Callable[..., Console]) -> None:
    console = open_console(viewport=PHONE)
    page = console.goto("models")
    page.wait_for_selector('#models-table tr[data-model="embeddings"]')
    assert page.evaluate(OVERFLOW) <= 0 and page.evaluate(UNLABELLED) == []
    assert page.evaluate("() => { const w = document.querySelector('.table-wrap');"
                         " return w.scrollWidth > w.clientWidth; }")  # the table scrolls in its frame
    console.shot("models-phone")
    page = console.goto("metrics")
    page.wait_for_function("() => document.querySelector('#metrics-status').textContent.includes('Updated')")
    assert page.evaluate(OVERFLOW) <= 0 and page.evaluate(UNLABELLED) == []
    assert page.locator("main .form-error:visible").count() == 0
    widths = page.eval_on_selector_all("main svg.chart", "els => els.map(e => e.getBoundingClientRect().right)")
    assert widths and max(widths) <= PHONE["width"]
    console.shot("metrics-phone")
