"""The unmodified `openai` client against `tandem serve` on the built-in tiny-llm.

The base model "tiny-llm" copies its input ("hello=" -> "hello"); the adapters reverse, upper, sort
and increment transform it. The chat template renders the last user message as "<content>=".
Runtime adapter loading uses vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter, which the
openai client has no method for (sent with its generic `post`).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import TINY_LLM, Server

EXPECT = {"tiny-llm": "hello", "reverse": "olleh", "upper": "HELLO", "sort": "ehllo"}
ADAPTERS = ["reverse", "upper", "sort", "increment"]


@pytest.fixture(scope="module")
def oa(llm_server: Server) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=llm_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield client
    client.close()


@contextlib.contextmanager
def _raises(cls: type[openai.APIStatusError], needle: str) -> Iterator[None]:
    """Expect an openai error whose message names `needle` (Tandem answers OpenAI's {"error": {"message"}})."""
    with pytest.raises(cls) as info:
        yield
    assert needle in str(info.value), info.value.body


def _load(oa: openai.OpenAI, name: str, path: str) -> dict[str, Any]:
    return oa.post("/load_lora_adapter", cast_to=httpx.Response, body={"lora_name": name, "lora_path": path}).json()


def _unload(oa: openai.OpenAI, name: str) -> dict[str, Any]:
    return oa.post("/unload_lora_adapter", cast_to=httpx.Response, body={"lora_name": name}).json()


@pytest.mark.parametrize("model", list(EXPECT))
def test_completion_base_and_adapters(oa: openai.OpenAI, model: str) -> None:
    out = oa.completions.create(model=model, prompt="hello=", max_tokens=12, temperature=0)
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == model
    assert out.choices[0].text == EXPECT[model] and out.choices[0].finish_reason == "stop"
    assert out.usage is not None
    assert out.usage.prompt_tokens == len("hello=") + 1  # + BOS
    assert out.usage.completion_tokens == len("hello") + 1  # the EOS token counts
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_adapter_output_differs_from_base(oa: openai.OpenAI) -> None:
    base = oa.completions.create(model="tiny-llm", prompt="1289=", max_tokens=12, temperature=0)
    inc = oa.completions.create(model="increment", prompt="1289=", max_tokens=12, temperature=0)
    assert base.choices[0].text == "1289" and inc.choices[0].text == "2390"


def test_completion_options(oa: openai.OpenAI) -> None:
    out = oa.completions.create(model="tiny-llm", prompt="hello=", max_tokens=2, temperature=0)
    assert out.choices[0].text == "he" and out.choices[0].finish_reason == "length"
    out = oa.completions.create(model="upper", prompt="hello=", max_tokens=12, temperature=0, stop=["LL"])
    assert out.choices[0].text == "HE" and out.choices[0].finish_reason == "stop"  # OpenAI drops the stop text
    out = oa.completions.create(model="reverse", prompt="abc=", max_tokens=12, temperature=0, echo=True,
                                logprobs=1)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == "abc=cba" and lp is not None
    assert lp.tokens == ["c", "b", "a"] and lp.text_offset == [4, 5, 6]
    assert lp.token_logprobs is not None and all(v <= 0 for v in lp.token_logprobs)


def test_completion_several_prompts_are_several_choices(oa: openai.OpenAI) -> None:
    out = oa.completions.create(model="sort", prompt=["hello=", "dcba="], max_tokens=12, temperature=0)
    assert [(c.index, c.text) for c in out.choices] == [(0, "ehllo"), (1, "abcd")]


def test_completion_stream(oa: openai.OpenAI) -> None:
    chunks = list(oa.completions.create(model="reverse", prompt="hello=", max_tokens=12, temperature=0,
                                        stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == "olleh"
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "stop"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].model == "reverse"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


def test_chat_completion(oa: openai.OpenAI) -> None:
    msgs: list[Any] = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "hello"}]
    for model, want in EXPECT.items():
        out = oa.chat.completions.create(model=model, messages=msgs, temperature=0)
        assert out.object == "chat.completion" and out.id.startswith("chatcmpl-") and out.model == model
        msg = out.choices[0].message
        assert msg.role == "assistant" and msg.content == want and out.choices[0].finish_reason == "stop"
        assert out.usage is not None and out.usage.prompt_tokens == len("hello=") + 1
    out = oa.chat.completions.create(model="upper", messages=msgs, temperature=0, max_completion_tokens=3,
                                     logprobs=True)
    assert out.choices[0].message.content == "HEL" and out.choices[0].finish_reason == "length"
    assert out.choices[0].logprobs is not None and out.choices[0].logprobs.content is not None
    assert [t.token for t in out.choices[0].logprobs.content] == ["H", "E", "L"]


def test_chat_stream(oa: openai.OpenAI) -> None:
    chunks = list(oa.chat.completions.create(
        model="upper", messages=[{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
        temperature=0, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == "HELLO"
    assert with_choices[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == len("hello=") + 1


def test_seeded_sampling_is_reproducible(oa: openai.OpenAI) -> None:
    def run() -> str:
        out = oa.completions.create(model="tiny-llm", prompt="abcdef=", max_tokens=8, temperature=1.5, seed=1234)
        return out.choices[0].text

    assert run() == run()


def test_concurrent_requests_mix_adapters(oa: openai.OpenAI) -> None:
    jobs = [m for m in EXPECT for _ in range(3)]

    def one(model: str) -> str:
        out = oa.completions.create(model=model, prompt="hello=", max_tokens=12, temperature=0)
        return out.choices[0].text

    with cf.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, jobs)) == [EXPECT[m] for m in jobs]


def test_models_lists_base_and_adapters(oa: openai.OpenAI, llm_server: Server) -> None:
    models = oa.models.list()
    ids = [m.id for m in models.data]
    assert ids[0] == "tiny-llm" and set(ADAPTERS) <= set(ids)
    assert all(m.owned_by == "tandem" and m.object == "model" for m in models.data)
    with llm_server.client() as c:
        raw = c.get("/v1/models").text
    assert str(TINY_LLM) not in raw and "/adapters" not in raw  # no server paths
    assert oa.models.retrieve("reverse").id == "reverse"


def test_load_and_unload_adapter_at_runtime(oa: openai.OpenAI) -> None:
    reply = _load(oa, "reverse-again", str(TINY_LLM / "adapters" / "reverse"))
    assert reply["status"] == "loaded" and reply["lora_name"] == "reverse-again" and reply["load_ms"] >= 0
    try:
        assert "reverse-again" in [m.id for m in oa.models.list().data]
        out = oa.completions.create(model="reverse-again", prompt="hello=", max_tokens=12, temperature=0)
        assert out.choices[0].text == "olleh"
        reply = _load(oa, "upper-relative", "upper")  # relative to the allowed adapter folder
        assert reply["status"] == "loaded"
        chat = oa.chat.completions.create(model="upper-relative", messages=[{"role": "user", "content": "abc"}],
                                          temperature=0)
        assert chat.choices[0].message.content == "ABC"
    finally:
        assert _unload(oa, "reverse-again") == {"status": "unloaded", "lora_name": "reverse-again"}
        _unload(oa, "upper-relative")
    assert "reverse-again" not in [m.id for m in oa.models.list().data]
    with pytest.raises(openai.NotFoundError):
        oa.completions.create(model="reverse-again", prompt="hello=", max_tokens=12, temperature=0)
    with pytest.raises(openai.NotFoundError):
        _unload(oa, "reverse-again")


def test_load_adapter_errors(oa: openai.OpenAI, tmp_path: Path) -> None:
    with _raises(openai.BadRequestError, "outside the allowed"):
        _load(oa, "evil", str(tmp_path))
    with _raises(openai.BadRequestError, "outside the allowed"):
        _load(oa, "evil", "../base")
    with pytest.raises(openai.BadRequestError):  # inside the allowed folder, but not an adapter
        _load(oa, "not-an-adapter", str(TINY_LLM / "adapters"))
    with _raises(openai.BadRequestError, "lora_path"):
        _load(oa, "x", "")
    assert "evil" not in [m.id for m in oa.models.list().data]


def test_errors(oa: openai.OpenAI) -> None:
    with _raises(openai.NotFoundError, "no-such"):
        oa.completions.create(model="no-such", prompt="hello=", max_tokens=5)
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(model="no-such", messages=[{"role": "user", "content": "a"}])
    with _raises(openai.UnprocessableEntityError, "max_total_tokens"):
        oa.completions.create(model="tiny-llm", prompt="x" * 60 + "=", max_tokens=10)
    with pytest.raises(openai.UnprocessableEntityError):
        oa.chat.completions.create(model="tiny-llm", messages=[{"role": "user", "content": "x" * 70}])
    with _raises(openai.BadRequestError, "temperature"):
        oa.completions.create(model="tiny-llm", prompt="a=", temperature=3)
    with _raises(openai.BadRequestError, "n must be 1"):
        oa.chat.completions.create(model="tiny-llm", messages=[{"role": "user", "content": "a"}], n=2)
    with _raises(openai.BadRequestError, "stream"):
        oa.completions.create(model="tiny-llm", prompt=["a=", "b="], stream=True)
    with _raises(openai.BadRequestError, "role"):
        oa.chat.completions.create(model="tiny-llm", messages=[{"role": "robot", "content": "a"}])  # type: ignore
