"""The unmodified TGI clients against `tandem serve` on the built-in tiny-llm (base copies, adapters transform).

`text_generation.Client` (TGI's own client) has no adapter_id, so it covers the base model;
`huggingface_hub.InferenceClient.text_generation(..., adapter_id=...)` covers adapters.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from huggingface_hub import InferenceClient
from text_generation import Client
from text_generation.errors import BadRequestError

from tests.conftest import Server

EXPECT = {"": "hello", "reverse": "olleh", "upper": "HELLO", "sort": "ehllo"}


@pytest.fixture(autouse=True)
def _hub_client_may_reach_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 (no hub downloads in tests) also blocks InferenceClient's calls to our own
    loopback server; lift it for these tests only. Nothing here talks to the hub."""
    from huggingface_hub import constants
    from huggingface_hub.utils import reset_sessions

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    reset_sessions()


def test_text_generation_client_base_model(llm_server: Server) -> None:
    client = Client(llm_server.url, timeout=60)
    resp = client.generate("hello=", max_new_tokens=12)
    assert resp.generated_text == "hello"
    assert resp.details.finish_reason.value == "eos_token"
    assert resp.details.generated_tokens == len("hello") + 1  # the EOS token counts
    assert [t.text for t in resp.details.tokens][:5] == list("hello")
    assert all(t.logprob is not None and t.logprob <= 0 for t in resp.details.tokens)
    streamed = list(client.generate_stream("hello=", max_new_tokens=12))
    assert "".join(r.token.text for r in streamed if not r.token.special) == "hello"
    assert streamed[-1].generated_text == "hello" and streamed[-1].details is not None


def test_text_generation_client_errors(llm_server: Server) -> None:
    client = Client(llm_server.url, timeout=60)
    with pytest.raises(BadRequestError, match="typical_p"):
        client.generate("hello=", typical_p=0.5)
    with pytest.raises(Exception, match="max_total_tokens"):
        client.generate("x" * 60 + "=", max_new_tokens=10)


@pytest.mark.parametrize("adapter", ["", "reverse", "upper", "sort"])
def test_inference_client_adapter_id(llm_server: Server, adapter: str) -> None:
    client = InferenceClient(llm_server.url, timeout=60)
    kw = {"adapter_id": adapter} if adapter else {}
    assert client.text_generation("hello=", max_new_tokens=12, **kw) == EXPECT[adapter]
    out = client.text_generation("hello=", max_new_tokens=12, details=True, **kw)
    assert out.generated_text == EXPECT[adapter] and out.details.finish_reason == "eos_token"
    chunks = list(client.text_generation("hello=", max_new_tokens=12, stream=True, **kw))
    assert "".join(chunks) == EXPECT[adapter]


def test_increment_adapter_and_stop_sequence(llm_server: Server) -> None:
    client = InferenceClient(llm_server.url, timeout=60)
    assert client.text_generation("1289=", max_new_tokens=12, adapter_id="increment") == "2390"
    out = client.text_generation("hello=", max_new_tokens=12, adapter_id="upper", stop=["LL"], details=True)
    assert out.generated_text == "HELL" and out.details.finish_reason == "stop_sequence"  # TGI keeps the stop text


def test_tgi_errors_are_json_4xx(llm_server: Server) -> None:
    with llm_server.client() as c:
        r = c.post("/generate", json={"inputs": "abc=", "parameters": {"adapter_id": "no-such"}})
        assert r.status_code == 404 and "no-such" in r.json()["error"]
        r = c.post("/generate", json={"inputs": "abc=", "parameters": {"max_new_tokens": 100}})
        assert r.status_code == 422 and "64" in r.json()["error"]
        for bad in ({"temperature": 0}, {"top_p": 1.5}, {"top_k": -1}, {"max_new_tokens": "5"}, {"stop": "x"}):
            r = c.post("/generate", json={"inputs": "abc=", "parameters": bad})
            assert r.status_code == 400, (bad, r.text)
            assert next(iter(bad)) in r.json()["error"]
        assert c.post("/generate", content=b"{nope").status_code == 400
        assert c.post("/generate", json={"inputs": ""}).status_code == 400
        info = c.get("/info").json()
        assert info["max_total_tokens"] == 64 and info["model_id"] == "tiny-llm"
        assert c.get("/health").status_code == 200


def test_sampling_with_seed_is_reproducible(llm_server: Server) -> None:
    client = InferenceClient(llm_server.url, timeout=60)
    a = client.text_generation("abcdef=", max_new_tokens=8, do_sample=True, temperature=1.5, seed=7)
    b = client.text_generation("abcdef=", max_new_tokens=8, do_sample=True, temperature=1.5, seed=7)
    assert a == b


def _metric(server: Server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_disconnect_mid_stream_frees_slot_and_others_continue(llm_server: Server) -> None:
    """Streams dropped after one event are cancelled in the worker; a concurrent request is unaffected."""
    body = {"inputs": "abcdefghij=", "parameters": {"max_new_tokens": 50, "temperature": 4.0, "seed": 1}}
    before = _metric(llm_server, "tandem_llm_cancelled_total")
    results: list[str] = []

    def steady() -> None:
        r = httpx.post(llm_server.url + "/generate", timeout=60,
                       json={"inputs": "hello=", "parameters": {"max_new_tokens": 12, "adapter_id": "upper"}})
        results.append(r.json()["generated_text"])

    t = threading.Thread(target=steady)
    t.start()
    for _ in range(40):  # more than the 32 KV slots
        with httpx.stream("POST", llm_server.url + "/generate_stream", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    json.loads(line[5:])
                    break
    t.join(60)
    assert results == ["HELLO"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _metric(llm_server, "tandem_llm_cancelled_total") < before + 20:
        time.sleep(0.2)
    assert _metric(llm_server, "tandem_llm_cancelled_total") >= before + 20  # at temperature 4, few end by EOS
    while time.monotonic() < deadline and _metric(llm_server, "tandem_llm_running") > 0:
        time.sleep(0.2)
    assert _metric(llm_server, "tandem_llm_running") == 0
    r = httpx.post(llm_server.url + "/generate", timeout=60,
                   json={"inputs": "abc=", "parameters": {"max_new_tokens": 8, "adapter_id": "reverse"}})
    assert r.json()["generated_text"] == "cba"
