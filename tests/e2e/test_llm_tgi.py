"""The unmodified TGI client (`huggingface_hub.InferenceClient.text_generation`) against `tandem serve` on the
built-in tiny-llm (base copies, adapters transform).

The client posts to the base URL (TGI's `/` compat route, `stream` in the body) and parses TGI's details,
stream events and typed errors; raw httpx covers `/generate` and `/generate_stream`, which it never calls.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError

from tests.conftest import Server

EXPECT = {"": "hello", "reverse": "olleh", "upper": "HELLO", "sort": "ehllo"}


pytestmark = pytest.mark.usefixtures("hub_may_reach_loopback")


def test_inference_client_base_model_details(llm_server: Server) -> None:
    client = InferenceClient(llm_server.url, timeout=60)
    resp = client.text_generation("hello=", max_new_tokens=12, details=True)
    assert resp.generated_text == "hello"
    assert resp.details is not None and resp.details.finish_reason == "eos_token"
    assert resp.details.generated_tokens == len("hello") + 1  # the EOS token counts
    assert [t.text for t in resp.details.tokens][:5] == list("hello")
    assert all(t.logprob is not None and t.logprob <= 0 for t in resp.details.tokens)
    assert resp.details.tokens[-1].special and not any(t.special for t in resp.details.tokens[:5])
    streamed = list(client.text_generation("hello=", max_new_tokens=12, details=True, stream=True))
    assert "".join(r.token.text for r in streamed if not r.token.special) == "hello"
    assert all(r.token.logprob <= 0 for r in streamed)
    assert all(r.generated_text is None and r.details is None for r in streamed[:-1])
    assert streamed[-1].generated_text == "hello" and streamed[-1].details is not None
    assert streamed[-1].details.finish_reason == "eos_token"
    assert streamed[-1].details.generated_tokens == len("hello") + 1


def test_inference_client_errors(llm_server: Server) -> None:
    client = InferenceClient(llm_server.url, timeout=60)
    with pytest.raises(ValidationError, match="typical_p") as bad:  # 422 + error_type validation, as TGI
        client.text_generation("hello=", typical_p=0.5)
    assert bad.value.__cause__.response.status_code == 422  # type: ignore[union-attr]
    with pytest.raises(ValidationError, match="max_total_tokens") as invalid:
        client.text_generation("x" * 60 + "=", max_new_tokens=10)
    assert invalid.value.__cause__.response.status_code == 422  # type: ignore[union-attr]
    with pytest.raises(ValidationError, match="max_total_tokens"):
        list(client.text_generation("x" * 60 + "=", max_new_tokens=10, stream=True))


def test_raw_generate_routes_match_the_client(llm_server: Server) -> None:
    """`/generate` and `/generate_stream` (TGI's own routes, which InferenceClient does not use) give what
    the client got from `/`."""
    client = InferenceClient(llm_server.url, timeout=60)
    via_client = client.text_generation("hello=", max_new_tokens=12, adapter_id="reverse", details=True)
    body = {"inputs": "hello=", "parameters": {"max_new_tokens": 12, "adapter_id": "reverse", "details": True}}
    with llm_server.client(timeout=60) as c:
        r = c.post("/generate", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["generated_text"] == via_client.generated_text == "olleh"
        assert out["details"]["finish_reason"] == "eos_token"
        assert [t["text"] for t in out["details"]["tokens"]] == [t.text for t in via_client.details.tokens]
        with c.stream("POST", "/generate_stream", json=body) as s:
            assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
            events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
    assert "".join(e["token"]["text"] for e in events if not e["token"]["special"]) == "olleh"
    assert events[-1]["generated_text"] == "olleh" and events[-1]["details"]["finish_reason"] == "eos_token"


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
            # TGI answers validation errors with 422 + error_type "validation" (huggingface_hub's ValidationError)
            assert r.status_code == 422 and r.json()["error_type"] == "validation", (bad, r.text)
            assert next(iter(bad)) in r.json()["error"]
        for body in ({"content": b"{nope"}, {"json": {"inputs": ""}}):
            r = c.post("/generate", **body)  # type: ignore[arg-type]
            assert r.status_code == 422 and r.json()["error_type"] == "validation"
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
