"""The OpenAI protocol layer without a server: request parsing and validation, response and chunk shapes.

Handlers run in-process through Starlette's TestClient against a fake LLM client (a character-level
"model" that copies, or with adapter "reverse" reverses, its prompt), with the real tiny-llm tokenizer
when it is present and an equivalent character-level stand-in otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from tandem.errors import ErrorKind, InvalidInput, TandemError
from tandem.llm.client import GenEvent
from tandem.llm.http.common import LLMDirectory, openai_error
from tandem.llm.http.openai import (
    ChatRequest,
    CompletionLogprobs,
    CompletionRequest,
    _chat_stream,
    _completion_stream,
    chat_max_tokens,
    finish_reason,
    openai_routes,
    parse_chat,
    parse_completion,
    parse_messages,
)
from tandem.llm.messages import AdapterInfo, AdapterReply
from tandem.llm.params import SamplingParams
from tandem.llm.text import StopMatcher
from tandem.serving.kinds import FrontState

TINY_BASE = Path(__file__).resolve().parents[2] / "tandem" / "default_repo" / "tiny-llm" / "base"
BOS, EOS = 1, 2


# -- a tokenizer: the real tiny-llm one, or a character-level stand-in with the same ids ----------
class CharTokenizer:
    """Ids 0..3 = <pad> <s> </s> <unk>, then printable ASCII; BOS added; chat = last user message + '='."""

    all_special_ids = [0, 1, 2, 3]
    chat_template = "last user message + '='"

    def __len__(self) -> int:
        return 99

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        head = [BOS] if add_special_tokens else []
        if text.startswith("<s>"):  # special tokens written out in the text (chat template) are matched
            head, text = head + [BOS], text[3:]
        return {"input_ids": head + [4 + ord(c) - 32 for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        names = ["<pad>", "<s>", "</s>", "<unk>"]
        return "".join(("" if skip_special_tokens else names[i]) if i < 4 else chr(i - 4 + 32) for i in ids)

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = False,
                            add_generation_prompt: bool = True) -> str:
        users = [m["content"] for m in messages if m["role"] == "user"]
        return "<s>" + (users[-1] if users else "") + "="


def _tokenizer() -> Any:
    if (TINY_BASE / "tokenizer.json").exists():
        from tandem.llm.text import load_tokenizer

        return load_tokenizer(TINY_BASE)
    return CharTokenizer()


TOKENIZER = _tokenizer()


# -- a fake LLM client: copies (or reverses) the prompt's text, one character per token -----------
class FakeGen:
    """Quacks like `Generation`: events() then close()."""

    def __init__(self, prompt: list[int], events: list[GenEvent]) -> None:
        self.prompt, self._events, self.closed = prompt, events, False

    async def events(self) -> AsyncIterator[GenEvent]:
        for ev in self._events:
            yield ev

    async def close(self) -> None:
        self.closed = True


def _events(text: str, max_new: int, stops: list[str]) -> list[GenEvent]:
    """One event per character then EOS, cut at max_new tokens or at a stop sequence (real StopMatcher)."""
    matcher = StopMatcher(stops)
    out: list[GenEvent] = []
    for i, ch in enumerate(text + "\0"):
        token = EOS if ch == "\0" else 4 + ord(ch) - 32
        piece, stop = matcher.feed("" if ch == "\0" else ch)
        finish = "stop_sequence" if stop else "eos_token" if ch == "\0" else "length" if i + 1 == max_new else None
        if finish and not stop:
            piece += matcher.flush()
        out.append(GenEvent(token, piece, -0.25, token == EOS, finish))
        if finish:
            break
    return out


class FakeClient:
    name = "tiny-llm"
    kind = "llm"
    max_total_tokens = 64

    def __init__(self) -> None:
        self.tokenizer = TOKENIZER
        self.adapters = {"reverse": AdapterInfo(name="reverse", path="/secret/adapters/reverse", rank=8,
                                                nbytes=1, on_device=True, load_ms=1.23456)}
        self.started: list[tuple[list[int], SamplingParams, str]] = []
        self.gens: list[FakeGen] = []

    def check_length(self, prompt: list[int], max_new_tokens: int) -> None:
        from tandem.errors import TooManyTokens

        if len(prompt) + max_new_tokens > self.max_total_tokens:
            raise TooManyTokens("too long")

    async def start(self, prompt: list[int], params: SamplingParams, adapter: str = "",
                    stops: list[str] | None = None, include_stop: bool = True) -> FakeGen:
        from tandem.errors import ModelNotFound

        self.check_length(prompt, params.max_new_tokens)
        if adapter and adapter not in self.adapters:
            raise ModelNotFound(f"unknown adapter {adapter!r}")
        self.started.append((prompt, params, adapter))
        text = self.tokenizer.decode(prompt, skip_special_tokens=True).rstrip("=")
        gen = FakeGen(prompt, _events(text[::-1] if adapter == "reverse" else text, params.max_new_tokens,
                                      stops or []))
        self.gens.append(gen)
        return gen

    def confine(self, path: str) -> Path:
        if not path.startswith("/allowed/"):
            raise InvalidInput(f"lora_path {path!r} is outside the allowed adapter directories")
        return Path(path)

    async def adapter_op(self, kind: str, name: str = "", path: str = "") -> AdapterReply:
        if kind == "load":
            if path.endswith("broken"):
                return AdapterReply(model="tiny-llm", op_id=1, error="not a PEFT adapter",
                                    error_kind=ErrorKind.INVALID, adapters=list(self.adapters.values()))
            self.adapters[name] = AdapterInfo(name=name, path=path, rank=4, nbytes=1, on_device=False, load_ms=7.0)
        if kind == "unload" and self.adapters.pop(name, None) is None:
            return AdapterReply(model="tiny-llm", op_id=1, error=f"adapter {name!r} is not loaded",
                                error_kind=ErrorKind.NOT_FOUND)
        return AdapterReply(model="tiny-llm", op_id=1, adapters=list(self.adapters.values()))


def _wrap(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """What the app's error boundary does for /v1 errors: TandemError -> OpenAI's {"error": {"message", ...}}."""
    async def handler(request: Request) -> Response:
        try:
            return await fn(request)
        except TandemError as e:
            status, body = openai_error(e)
            return Response(orjson.dumps(body), status, media_type="application/json")
    return handler


@pytest.fixture
def fake() -> FakeClient:
    return FakeClient()


@pytest.fixture
def http(fake: FakeClient) -> Iterator[TestClient]:
    routes = openai_routes(LLMDirectory(FrontState(clients={"tiny-llm": fake})))  # type: ignore[dict-item]
    app = Starlette(routes=[Route(r.path, _wrap(r.handler), methods=[r.method]) for r in routes])
    with TestClient(app) as client:
        yield client


def _sse(text: str) -> list[Any]:
    out = []
    for block in text.strip().split("\n\n"):
        assert block.startswith("data:"), block
        payload = block[5:].strip()
        out.append(payload if payload == "[DONE]" else orjson.loads(payload))
    return out


# -- completions parsing ---------------------------------------------------------------------------
def test_completion_defaults_follow_openai() -> None:
    req = parse_completion({"model": "tiny-llm", "prompt": "abc=", "user": "x", "some_future_field": 1})
    assert isinstance(req, CompletionRequest)
    assert req.model == "tiny-llm" and req.prompts == ["abc="] and req.stops == [] and not req.stream
    p = req.params
    assert p.max_new_tokens == 16 and p.do_sample and p.temperature == 1.0 and p.top_p == 1.0 and p.top_k == 0
    assert p.repetition_penalty == 1.0 and p.seed is None and not p.logprobs and not p.ignore_eos
    assert req.logprobs is None and not req.echo and not req.include_usage


def test_completion_sampling_fields() -> None:
    req = parse_completion({"prompt": "a", "temperature": 0.7, "top_p": 0.9, "top_k": 5, "seed": 42,
                            "repetition_penalty": 1.3, "max_tokens": 5, "ignore_eos": True, "logprobs": 3,
                            "echo": True, "stop": ["x", "yz"], "stream": True,
                            "stream_options": {"include_usage": True}, "presence_penalty": 0,
                            "frequency_penalty": 0.0, "n": 1, "best_of": 1, "suffix": None})
    p = req.params
    assert (p.do_sample, p.temperature, p.top_p, p.top_k, p.seed) == (True, 0.7, 0.9, 5, 42)
    assert (p.repetition_penalty, p.max_new_tokens, p.ignore_eos, p.logprobs) == (1.3, 5, True, True)
    assert req.logprobs == 3 and req.echo and req.stops == ["x", "yz"] and req.stream and req.include_usage


@pytest.mark.parametrize("temperature", [0, 0.0, 1e-7])
def test_temperature_zero_is_greedy(temperature: float) -> None:
    p = parse_completion({"prompt": "a", "temperature": temperature, "top_p": 0.5}).params
    assert not p.do_sample and p.temperature == 1.0


@pytest.mark.parametrize("top_k, want", [(-1, 0), (0, 0), (7, 7)])
def test_top_k_minus_one_and_zero_are_off(top_k: int, want: int) -> None:
    assert parse_completion({"prompt": "a", "top_k": top_k}).params.top_k == want


def test_prompt_forms() -> None:
    assert parse_completion({"prompt": ["abc="]}).prompts == ["abc="]
    assert parse_completion({"prompt": ["a=", "b="]}).prompts == ["a=", "b="]
    assert parse_completion({"prompt": [1, 5, 6]}).prompts == [[1, 5, 6]]
    assert parse_completion({"prompt": [[1, 5], [1, 6]]}).prompts == [[1, 5], [1, 6]]


@pytest.mark.parametrize("body, field", [
    ({}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ["a", 1]}, "prompt"),
    ({"prompt": [[1], []]}, "prompt"),
    ({"prompt": [True, False]}, "prompt"),
    ({"prompt": ["a", "b"], "stream": True}, "stream"),
    ({"prompt": "a", "stream": "yes"}, "stream"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "a", "max_tokens": "10"}, "max_tokens"),
    ({"prompt": "a", "temperature": 2.5}, "temperature"),
    ({"prompt": "a", "temperature": -0.1}, "temperature"),
    ({"prompt": "a", "temperature": "hot"}, "temperature"),
    ({"prompt": "a", "temperature": True}, "temperature"),
    ({"prompt": "a", "temperature": float("nan")}, "temperature"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "top_p": 1.5}, "top_p"),
    ({"prompt": "a", "top_k": -2}, "top_k"),
    ({"prompt": "a", "top_k": 1.5}, "top_k"),
    ({"prompt": "a", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "a", "repetition_penalty": -1}, "repetition_penalty"),
    ({"prompt": "a", "seed": "x"}, "seed"),
    ({"prompt": "a", "seed": 2**64}, "seed"),
    ({"prompt": "a", "n": 2}, "n"),
    ({"prompt": "a", "n": 0}, "n"),
    ({"prompt": "a", "best_of": 3}, "best_of"),
    ({"prompt": "a", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "a", "frequency_penalty": -1}, "frequency_penalty"),
    ({"prompt": "a", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "a", "stop": [1]}, "stop"),
    ({"prompt": "a", "stop": 7}, "stop"),
    ({"prompt": "a", "logprobs": 6}, "logprobs"),
    ({"prompt": "a", "logprobs": -1}, "logprobs"),
    ({"prompt": "a", "logprobs": True}, "logprobs"),
    ({"prompt": "a", "echo": 1}, "echo"),
    ({"prompt": "a", "suffix": "end"}, "suffix"),
    ({"prompt": "a", "stream_options": True}, "stream_options"),
    ({"prompt": "a", "stream_options": {"include_usage": "y"}}, "include_usage"),
    ({"prompt": "a", "model": 3}, "model"),
    ({"prompt": "a", "ignore_eos": "no"}, "ignore_eos"),
])
def test_completion_rejects(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput, match=field) as info:
        parse_completion(body)
    assert info.value.status == 400


def test_errors_name_the_allowed_range() -> None:
    with pytest.raises(InvalidInput, match=r"temperature must be a number >= 0 and <= 2; got 3"):
        parse_completion({"prompt": "a", "temperature": 3})
    with pytest.raises(InvalidInput, match=r"top_p must be a number > 0 and <= 1"):
        parse_completion({"prompt": "a", "top_p": 0})
    with pytest.raises(InvalidInput, match=r"logprobs must be an integer between 0 and 5"):
        parse_completion({"prompt": "a", "logprobs": 9})
    with pytest.raises(InvalidInput, match=r"not supported"):
        parse_completion({"prompt": "a", "frequency_penalty": 1})


def test_stop_forms() -> None:
    assert parse_completion({"prompt": "a", "stop": "x"}).stops == ["x"]
    assert parse_completion({"prompt": "a", "stop": ["a", "b", "c", "d"]}).stops == ["a", "b", "c", "d"]
    assert parse_completion({"prompt": "a", "stop": None}).stops == []


# -- chat parsing ----------------------------------------------------------------------------------
def test_chat_defaults_and_messages() -> None:
    req = parse_chat({"model": "reverse", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "developer", "content": "really"},
        {"role": "user", "content": [{"type": "text", "text": "ab"}, {"type": "text", "text": "c"}], "name": "u"},
        {"role": "assistant", "content": None},
    ], "tools": None, "tool_choice": None, "response_format": {"type": "text"}, "top_logprobs": 0})
    assert isinstance(req, ChatRequest)
    assert req.messages == [{"role": "system", "content": "be brief"}, {"role": "system", "content": "really"},
                            {"role": "user", "content": "ab\nc"}, {"role": "assistant", "content": ""}]
    assert req.model == "reverse" and req.max_tokens is None and not req.logprobs and not req.stream
    assert req.params.do_sample and req.params.temperature == 1.0


def test_chat_max_tokens_fields() -> None:
    msgs = [{"role": "user", "content": "a"}]
    assert parse_chat({"messages": msgs, "max_tokens": 7}).max_tokens == 7
    assert parse_chat({"messages": msgs, "max_completion_tokens": 5, "max_tokens": 7}).max_tokens == 5
    req = parse_chat({"messages": msgs, "logprobs": True, "temperature": 0})
    assert req.logprobs and req.params.logprobs and not req.params.do_sample


def test_chat_max_tokens_default_is_remaining_budget_capped() -> None:
    assert chat_max_tokens(None, 10, 64) == 54
    assert chat_max_tokens(None, 10, 4096) == 256
    assert chat_max_tokens(12, 10, 64) == 12
    assert chat_max_tokens(None, 64, 64) == 1  # over budget: the length check answers 422
    assert chat_max_tokens(None, 100, 64) == 1


@pytest.mark.parametrize("messages, field", [
    (None, "messages"),
    ([], "messages"),
    ("hi", "messages"),
    (["hi"], r"messages\[0\]"),
    ([{"content": "hi"}], r"messages\[0\]\.role"),
    ([{"role": "tool", "content": "hi"}], r"messages\[0\]\.role"),
    ([{"role": "user", "content": "a"}, {"role": "robot", "content": "hi"}], r"messages\[1\]\.role"),
    ([{"role": "user"}], r"messages\[0\]\.content"),
    ([{"role": "user", "content": 5}], r"messages\[0\]\.content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     r"messages\[0\]\.content\[0\]"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], r"messages\[0\]\.content\[0\]"),
])
def test_messages_rejects(messages: Any, field: str) -> None:
    with pytest.raises(InvalidInput, match=field):
        parse_messages(messages)
    with pytest.raises(InvalidInput, match=field):
        parse_chat({"messages": messages})


@pytest.mark.parametrize("extra, field", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"top_logprobs": 50}, "top_logprobs"),
    ({"logprobs": 1}, "logprobs"),
    ({"n": 3}, "n"),
    ({"presence_penalty": 1}, "presence_penalty"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"temperature": 9}, "temperature"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_chat_rejects(extra: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput, match=field):
        parse_chat({"messages": [{"role": "user", "content": "a"}], **extra})


# -- response pieces -------------------------------------------------------------------------------
@pytest.mark.parametrize("finish, want", [(None, None), ("length", "length"), ("eos_token", "stop"),
                                          ("stop_sequence", "stop")])
def test_finish_reason(finish: str | None, want: str | None) -> None:
    assert finish_reason(finish) == want


def test_completion_logprobs_offsets() -> None:
    lp = CompletionLogprobs(offset=4)
    lp.add("a", -0.1, "a")
    lp.add("\ufffd", -0.2, "")
    lp.add("bc", -0.3, "bc")
    assert lp.as_dict() == {"tokens": ["a", "\ufffd", "bc"], "token_logprobs": [-0.1, -0.2, -0.3],
                            "top_logprobs": None, "text_offset": [4, 5, 5]}
    assert lp.as_dict(2)["text_offset"] == [5]


def _collect(it: AsyncIterator[dict[str, Any]]) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        return [x async for x in it]
    return asyncio.run(run())


META = {"id": "x-1", "object": "o", "created": 1, "model": "m"}


def test_completion_stream_chunks(fake: FakeClient) -> None:
    gen = FakeGen([1, 2, 3], [GenEvent(69, "a", -0.1, False, None), GenEvent(70, "", -0.2, False, None),
                              GenEvent(71, "bc", -0.3, False, None), GenEvent(EOS, "", -0.4, True, "eos_token")])
    req = parse_completion({"prompt": "p=", "stream": True, "stream_options": {"include_usage": True}})
    chunks = _collect(_completion_stream(fake, gen, req, META, ""))  # type: ignore[arg-type]
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == ["a", "bc", ""]  # held-back token skipped
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None, None, "stop"]
    assert all(c["usage"] is None and c["id"] == "x-1" and c["object"] == "o" for c in chunks[:-1])
    assert all(c["choices"][0]["index"] == 0 and c["choices"][0]["logprobs"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_completion_stream_echo_and_logprobs(fake: FakeClient) -> None:
    gen = FakeGen([1], [GenEvent(69, "a", -0.1, False, None), GenEvent(70, "b", -0.2, False, "length")])
    req = parse_completion({"prompt": "p=", "stream": True, "logprobs": 2, "echo": True})
    chunks = _collect(_completion_stream(fake, gen, req, META, "p="))  # type: ignore[arg-type]
    assert "usage" not in chunks[0] and len(chunks) == 2
    assert [c["choices"][0]["text"] for c in chunks] == ["p=a", "b"]
    assert chunks[1]["choices"][0]["finish_reason"] == "length"
    lps = [c["choices"][0]["logprobs"] for c in chunks]
    assert lps[0]["text_offset"] == [2] and lps[1]["text_offset"] == [3]
    assert lps[0]["token_logprobs"] == [-0.1] and lps[0]["top_logprobs"] is None
    assert lps[0]["tokens"] == [TOKENIZER.decode([69])]


def test_chat_stream_chunks(fake: FakeClient) -> None:
    gen = FakeGen([1, 5], [GenEvent(69, "a", -0.1, False, None), GenEvent(70, "", -0.2, False, None),
                           GenEvent(EOS, "b", -0.3, True, "stop_sequence")])
    req = parse_chat({"messages": [{"role": "user", "content": "x"}], "stream": True, "logprobs": True,
                      "stream_options": {"include_usage": True}})
    chunks = _collect(_chat_stream(fake, gen, req, META))  # type: ignore[arg-type]
    choices = [c["choices"][0] for c in chunks[:-1]]
    assert choices[0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["delta"] for c in choices[1:]] == [{"content": "a"}, {"content": ""}, {"content": "b"}, {}]
    assert [c["finish_reason"] for c in choices] == [None, None, None, None, "stop"]
    entry = choices[1]["logprobs"]["content"][0]
    assert entry["logprob"] == -0.1 and entry["top_logprobs"] == [] and entry["bytes"] == list(entry["token"].encode())
    assert choices[3]["logprobs"] is None  # special token: no logprob entry
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


# -- handlers over a fake client -------------------------------------------------------------------
def test_http_completion(http: TestClient, fake: FakeClient) -> None:
    r = http.post("/v1/completions", json={"model": "tiny-llm", "prompt": "abc=", "temperature": 0, "logprobs": 0,
                                           "echo": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == "tiny-llm"
    assert isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["text"] == "abc=abc" and choice["finish_reason"] == "stop" and choice["index"] == 0
    assert choice["logprobs"]["text_offset"] == [4, 5, 6] and len(choice["logprobs"]["token_logprobs"]) == 3
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    assert fake.started[0][2] == "" and not fake.started[0][1].do_sample


def test_http_completion_several_prompts_and_adapter(http: TestClient, fake: FakeClient) -> None:
    r = http.post("/v1/completions", json={"model": "reverse", "prompt": ["abc=", "xy="], "max_tokens": 2,
                                           "stop": "q"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "reverse"
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "cb", "length"), (1, "yx", "length")]
    assert body["usage"]["prompt_tokens"] == 5 + 4 and body["usage"]["completion_tokens"] == 4
    assert {s[2] for s in fake.started} == {"reverse"} and all(g.closed for g in fake.gens)


def test_http_completion_token_ids_and_stop(http: TestClient) -> None:
    ids = TOKENIZER("hello=")["input_ids"]
    r = http.post("/v1/completions", json={"prompt": ids, "stop": ["ll"], "echo": True})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "hello=he" and r.json()["choices"][0]["finish_reason"] == "stop"
    assert r.json()["model"] == "tiny-llm"
    r = http.post("/v1/completions", json={"prompt": [1, 100000]})
    assert r.status_code == 400 and "token ids" in r.json()["error"]["message"]


def test_http_completion_errors(http: TestClient, fake: FakeClient) -> None:
    r = http.post("/v1/completions", json={"prompt": "x" * 60 + "=", "max_tokens": 10})
    assert r.status_code == 422
    r = http.post("/v1/completions", json={"prompt": ["ab=", "x" * 60 + "="]})
    assert r.status_code == 422 and not fake.started  # all prompts are checked before any starts
    assert http.post("/v1/completions", json={"prompt": "a=", "model": "nope"}).status_code == 404
    assert http.post("/v1/completions", json={"prompt": "a=", "top_p": 2}).status_code == 400
    assert http.post("/v1/completions", content=b"{not json").status_code == 400


def test_http_completion_stream(http: TestClient, fake: FakeClient) -> None:
    r = http.post("/v1/completions", json={"prompt": "abc=", "stream": True, "temperature": 0,
                                           "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _sse(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "abc"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    assert len({c["id"] for c in chunks}) == 1 and fake.gens[0].closed


def test_http_chat(http: TestClient, fake: FakeClient) -> None:
    r = http.post("/v1/chat/completions", json={"model": "reverse", "temperature": 0, "logprobs": True, "messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": "abc"}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion" and body["model"] == "reverse"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "cba"} and choice["finish_reason"] == "stop"
    assert [e["token"] for e in choice["logprobs"]["content"]] == ["c", "b", "a"]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    assert fake.started[0][0] == TOKENIZER("abc=")["input_ids"]
    assert fake.started[0][1].max_new_tokens == 64 - 5  # remaining budget (under the 256 cap)


def test_http_chat_stream(http: TestClient) -> None:
    r = http.post("/v1/chat/completions", json={"stream": True, "max_tokens": 2, "messages": [
        {"role": "user", "content": "abc"}]})
    assert r.status_code == 200
    events = _sse(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "ab"
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}


def test_http_chat_errors(http: TestClient) -> None:
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 70}]})
    assert r.status_code == 422
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}], "tools": [{}]})
    assert r.status_code == 400 and "tools" in r.json()["error"]["message"]
    r = http.post("/v1/chat/completions", json={"model": "ghost", "messages": [{"role": "user", "content": "a"}]})
    assert r.status_code == 404


def test_http_models_lists_base_and_adapters_without_paths(http: TestClient) -> None:
    r = http.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert ids == ["tiny-llm", "reverse"]
    base, adapter = body["data"]
    assert base["owned_by"] == "tandem" and base["object"] == "model" and base["parent"] is None
    assert adapter["parent"] == "tiny-llm" and adapter["root"] == "tiny-llm"
    assert "/secret" not in r.text
    assert http.get("/v1/models/reverse").json()["id"] == "reverse"
    assert http.get("/v1/models/ghost").status_code == 404


def test_http_load_and_unload_adapter(http: TestClient, fake: FakeClient) -> None:
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "mine", "lora_path": "/allowed/mine"})
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "loaded", "lora_name": "mine", "load_ms": 7.0}
    assert "mine" in [m["id"] for m in http.get("/v1/models").json()["data"]]
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "mine"})
    assert r.status_code == 200 and r.json() == {"status": "unloaded", "lora_name": "mine"}
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "mine"}).status_code == 404


@pytest.mark.parametrize("body, status, needle", [
    ({"lora_name": "a", "lora_path": "/etc/passwd"}, 400, "outside"),
    ({"lora_name": "a", "lora_path": "/allowed/broken"}, 400, "not a PEFT adapter"),
    ({"lora_name": "", "lora_path": "/allowed/a"}, 400, "lora_name"),
    ({"lora_name": "a"}, 400, "lora_path"),
    ({"lora_name": 3, "lora_path": "/allowed/a"}, 400, "lora_name"),
    ({"lora_name": "tiny-llm", "lora_path": "/allowed/a"}, 400, "name of an LLM"),
    ({"lora_name": "a", "lora_path": "/allowed/a", "model": "ghost"}, 404, "ghost"),
])
def test_http_load_adapter_errors(http: TestClient, body: dict[str, Any], status: int, needle: str) -> None:
    r = http.post("/v1/load_lora_adapter", json=body)
    assert r.status_code == status and needle in r.json()["error"]["message"], r.text


def test_http_unload_adapter_needs_a_name(http: TestClient) -> None:
    assert http.post("/v1/unload_lora_adapter", json={}).status_code == 400
