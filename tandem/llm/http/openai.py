"""OpenAI-compatible HTTP API over the LLM entries (what the `openai` client and vLLM users expect).

    POST /v1/completions           prompt (str | [str, ...] | token ids) -> "text_completion"
    POST /v1/chat/completions      messages, rendered by the tokenizer's chat template -> "chat.completion"
    GET  /v1/models[/{model}]      every LLM (base weights) and every loaded adapter
    POST /v1/load_lora_adapter     {"lora_name", "lora_path"[, "model"]}  (vLLM's runtime LoRA API)
    POST /v1/unload_lora_adapter   {"lora_name"[, "model"]}

`model` names an LLM (its base weights) or one of its adapters ("name" or "llm/name", see
`LLMDirectory.resolve`). Request parsing is pure (`parse_completion`, `parse_chat`): an invalid
field is a 400 naming the field and its allowed values; unknown fields are ignored.

Supported beyond OpenAI (vLLM extensions): `top_k`, `repetition_penalty`, `ignore_eos`.
Not supported (400): `n` > 1, `best_of` > 1, `suffix`, nonzero presence/frequency penalties,
`tools` / `tool_choice` / `response_format` other than text, image or audio message parts.
Logprobs are those of the chosen tokens only: no top alternatives are computed, so completions'
`logprobs: k` (any k in 0..5) returns the chosen tokens with `top_logprobs: null`, and chat's
`top_logprobs` must be 0. Echoed prompt tokens get no logprobs.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from tandem.errors import ErrorKind, InvalidInput, ModelNotFound, TandemError, error_for
from tandem.llm.client import Generation, GenEvent, LLMClient
from tandem.llm.http.common import (
    OPENAI_ERROR,
    LLMDirectory,
    json_response,
    openai_error,
    opt_float,
    opt_int,
    read_json,
    sse_response,
)
from tandem.llm.messages import AdapterReply
from tandem.llm.params import SamplingParams
from tandem.llm.text import render_chat
from tandem.serving.kinds import RouteDoc, RouteSpec, Schema
from tandem.serving.openapi import json_body, nullable, obj, sse

__all__ = [
    "ChatRequest", "CompletionLogprobs", "CompletionRequest", "chat_max_tokens", "finish_reason",
    "openai_routes", "parse_chat", "parse_completion", "parse_load_adapter", "parse_messages",
    "parse_unload_adapter", "sampling_params",
]

logger = logging.getLogger(__name__)
Handler = Callable[[Request], Awaitable[Response]]
Prompt = str | list[int]

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
DEFAULT_CHAT_TOKENS = 256  # chat default: the remaining token budget, at most this
MAX_STOPS = 4
GREEDY_BELOW = 1e-5  # temperatures under this are greedy (as vLLM does), avoiding overflow in logits / T
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


# -- field validation ------------------------------------------------------------------------------
def _bool(body: dict[str, Any], key: str, default: bool = False) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidInput(f"{key} must be true or false; got {value!r}")
    return value


def _model(body: dict[str, Any]) -> str | None:
    value = body.get("model")
    if value is not None and not isinstance(value, str):
        raise InvalidInput(f"model must be a string (an LLM or adapter name, see GET /v1/models); got {value!r}")
    return value or None


def _stops(body: dict[str, Any]) -> list[str]:
    """`stop`: a string or a list of up to 4 strings."""
    value = body.get("stop")
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or len(value) > MAX_STOPS or not all(isinstance(s, str) for s in value):
        raise InvalidInput(f"stop must be a string or a list of at most {MAX_STOPS} strings; got {value!r}")
    return list(value)


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise InvalidInput(f"stream_options must be an object like {{\"include_usage\": true}}; got {options!r}")
    return _bool(options, "include_usage")


def _reject_unsupported(body: dict[str, Any]) -> None:
    """400 for OpenAI features this server does not implement (rather than silently ignoring them)."""
    for key in ("presence_penalty", "frequency_penalty"):
        value = opt_float(body, key, -2.0, 2.0)
        if value:
            raise InvalidInput(f"{key} is not supported (only 0); use repetition_penalty (> 0, 1 = off) instead")
    for key in ("n", "best_of"):
        value = body.get(key)
        if value is not None and (isinstance(value, bool) or value != 1):
            raise InvalidInput(f"{key} must be 1 (several choices per prompt are not supported); got {value!r}")


def sampling_params(body: dict[str, Any], max_tokens: int, logprobs: bool) -> SamplingParams:
    """The sampling fields shared by completions and chat: temperature 0 is greedy, > 0 samples."""
    _reject_unsupported(body)
    temperature = opt_float(body, "temperature", 0.0, 2.0)
    temperature = 1.0 if temperature is None else temperature
    greedy = temperature < GREEDY_BELOW
    top_p = opt_float(body, "top_p", 0.0, 1.0, lo_open=True)
    top_k = opt_int(body, "top_k", -1)
    penalty = opt_float(body, "repetition_penalty", 0.0, None, lo_open=True)
    seed = opt_int(body, "seed", -(2**63), 2**64 - 1)
    return SamplingParams(
        max_new_tokens=max_tokens, do_sample=not greedy, temperature=1.0 if greedy else temperature,
        top_k=max(top_k or 0, 0), top_p=1.0 if top_p is None else top_p,
        repetition_penalty=1.0 if penalty is None else penalty, seed=seed, logprobs=logprobs,
        ignore_eos=_bool(body, "ignore_eos"))


# -- request parsing -------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompletionRequest:
    """A validated /v1/completions body. `prompts` has several entries only when not streaming."""

    model: str | None
    prompts: list[Prompt]
    params: SamplingParams
    stops: list[str]
    stream: bool
    include_usage: bool
    logprobs: int | None
    echo: bool


@dataclass(frozen=True)
class ChatRequest:
    """A validated /v1/chat/completions body; `max_tokens` None means the remaining budget (<= 256)."""

    model: str | None
    messages: list[dict[str, str]]
    max_tokens: int | None
    params: SamplingParams  # max_new_tokens is set once the prompt length is known (chat_max_tokens)
    stops: list[str]
    stream: bool
    include_usage: bool
    logprobs: bool


def _is_ids(value: list[Any]) -> bool:
    return bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _parse_prompts(value: Any) -> list[Prompt]:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return list(value)
        if _is_ids(value):
            return [list(value)]
        if all(isinstance(p, list) and _is_ids(p) for p in value):
            return [list(p) for p in value]
    raise InvalidInput("prompt must be a string, a non-empty list of strings, a list of token ids or a list of "
                       f"token-id lists; got {str(value)[:100]!r}")


def parse_completion(body: dict[str, Any]) -> CompletionRequest:
    """Validate a /v1/completions body (400 naming the field on any problem)."""
    if body.get("suffix") not in (None, ""):
        raise InvalidInput("suffix is not supported (no fill-in-the-middle)")
    prompts = _parse_prompts(body.get("prompt"))
    stream = _bool(body, "stream")
    if stream and len(prompts) > 1:
        raise InvalidInput(f"stream: true takes one prompt; got {len(prompts)} (send them as separate requests)")
    logprobs = opt_int(body, "logprobs", 0, 5)
    max_tokens = opt_int(body, "max_tokens", 1)
    params = sampling_params(body, max_tokens or DEFAULT_COMPLETION_TOKENS, logprobs is not None)
    return CompletionRequest(_model(body), prompts, params, _stops(body), stream, _include_usage(body), logprobs,
                             _bool(body, "echo"))


def _content(where: str, content: Any, role: str) -> str:
    """A message's content: a string or a list of text parts (joined by newlines)."""
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""
    if not isinstance(content, list):
        raise InvalidInput(f"{where}.content must be a string or a list of text parts; got {str(content)[:100]!r}")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidInput(f"{where}.content[{j}] must be {{\"type\": \"text\", \"text\": \"...\"}}; "
                               "only text parts are supported")
        texts.append(part["text"])
    return "\n".join(texts)


def parse_messages(value: Any) -> list[dict[str, str]]:
    """Chat messages as [{"role", "content": str}]; roles system/user/assistant ("developer" = system)."""
    if not isinstance(value, list) or not value:
        raise InvalidInput("messages must be a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise InvalidInput(f"messages[{i}] must be an object with role and content; got {str(msg)[:100]!r}")
        role = msg.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise InvalidInput(f"messages[{i}].role must be one of system, user, assistant; got {role!r}")
        out.append({"role": _ROLES[role], "content": _content(f"messages[{i}]", msg.get("content"), role)})
    return out


def _reject_tools(body: dict[str, Any]) -> None:
    for key in ("tools", "functions"):
        if body.get(key):
            raise InvalidInput(f"{key} (function calling) are not supported")
    for key in ("tool_choice", "function_call"):
        if body.get(key) not in (None, "none"):
            raise InvalidInput(f"{key} is not supported (tools are not supported); got {str(body[key])[:100]!r}")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise InvalidInput("response_format is not supported (only {\"type\": \"text\"})")


def parse_chat(body: dict[str, Any]) -> ChatRequest:
    """Validate a /v1/chat/completions body (400 naming the field on any problem)."""
    _reject_tools(body)
    messages = parse_messages(body.get("messages"))
    logprobs = _bool(body, "logprobs")
    if opt_int(body, "top_logprobs", 0, 20):
        raise InvalidInput("top_logprobs must be 0: only the chosen token's logprob is computed")
    max_tokens = opt_int(body, "max_completion_tokens", 1) or opt_int(body, "max_tokens", 1)
    params = sampling_params(body, max_tokens or 1, logprobs)
    return ChatRequest(_model(body), messages, max_tokens, params, _stops(body), _bool(body, "stream"),
                       _include_usage(body), logprobs)


def chat_max_tokens(requested: int | None, prompt_len: int, max_total_tokens: int) -> int:
    """The requested max tokens, or the remaining budget capped at 256 (at least 1, so a too-long
    prompt still gets the 422 of the length check)."""
    if requested is not None:
        return requested
    return max(1, min(DEFAULT_CHAT_TOKENS, max_total_tokens - prompt_len))


# -- response pieces -------------------------------------------------------------------------------
def finish_reason(finish: str | None) -> str | None:
    """Engine finish -> OpenAI: "length" stays, eos_token / stop_sequence are "stop", None while running."""
    if finish is None:
        return None
    return "length" if finish == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _meta(prefix: str, obj: str, model: str) -> dict[str, Any]:
    """The fields every response / chunk of one request shares."""
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()), "model": model}


def _token_text(client: LLMClient, token: int) -> str:
    return str(client.tokenizer.decode([token]))


@dataclass
class CompletionLogprobs:
    """Completions' logprobs object: chosen tokens, their logprobs and character offsets in the text."""

    offset: int = 0  # where the next token's text starts (after any echoed prompt)
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add(self, token: str, logprob: float, text: str) -> None:
        self.tokens.append(token)
        self.token_logprobs.append(logprob)
        self.text_offset.append(self.offset)
        self.offset += len(text)

    def as_dict(self, start: int = 0) -> dict[str, Any]:
        """The entries from `start` on (streaming sends each chunk's own tokens)."""
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": None, "text_offset": self.text_offset[start:]}


def _chat_logprob(client: LLMClient, ev: GenEvent) -> dict[str, Any]:
    token = _token_text(client, ev.token)
    return {"token": token, "logprob": ev.logprob, "bytes": list(token.encode()), "top_logprobs": []}


def _chunk(meta: dict[str, Any], choice: dict[str, Any], include_usage: bool) -> dict[str, Any]:
    """A stream chunk; with include_usage every chunk carries `usage: null` until the usage chunk."""
    out = {**meta, "choices": [choice]}
    if include_usage:
        out["usage"] = None
    return out


# -- generation ------------------------------------------------------------------------------------
async def _generate(client: LLMClient, adapter: str, ids: list[int], params: SamplingParams,
                    stops: list[str]) -> list[GenEvent]:
    """Run one generation to its end and return its events."""
    gen = await client.start(ids, params, adapter, stops=stops, include_stop=False)
    try:
        return [ev async for ev in gen.events()]
    finally:
        await gen.close()


async def _generate_all(client: LLMClient, adapter: str, prompts: list[list[int]], params: SamplingParams,
                        stops: list[str]) -> list[list[GenEvent]]:
    """Several prompts concurrently (all length-checked first); the first failure is raised."""
    for ids in prompts:
        client.check_length(ids, params.max_new_tokens)
    results = await asyncio.gather(*(_generate(client, adapter, ids, params, stops) for ids in prompts),
                                   return_exceptions=True)
    out: list[list[GenEvent]] = []
    for r in results:
        if isinstance(r, BaseException):
            raise r
        out.append(r)
    return out


def _prompt_ids(client: LLMClient, prompt: Prompt) -> list[int]:
    """Token ids of a prompt: strings are tokenized (BOS added by the tokenizer), id lists checked."""
    if isinstance(prompt, str):
        return list(client.tokenizer(prompt)["input_ids"])
    vocab = len(client.tokenizer)
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise InvalidInput(f"prompt token ids must be in 0..{vocab - 1}; got {bad[:5]}")
    return prompt


def _echo_text(client: LLMClient, prompt: Prompt) -> str:
    return prompt if isinstance(prompt, str) else str(client.tokenizer.decode(prompt, skip_special_tokens=True))


def _completion_choice(client: LLMClient, index: int, events: list[GenEvent], echo: str,
                       logprobs: bool) -> dict[str, Any]:
    lp = CompletionLogprobs(offset=len(echo))
    for ev in events:
        if not ev.special:
            lp.add(_token_text(client, ev.token), ev.logprob, ev.text)
    return {"index": index, "text": echo + "".join(ev.text for ev in events),
            "logprobs": lp.as_dict() if logprobs else None,
            "finish_reason": finish_reason(events[-1].finish if events else None)}


async def _completion_stream(client: LLMClient, gen: Generation, req: CompletionRequest, meta: dict[str, Any],
                             echo: str) -> AsyncIterator[dict[str, Any]]:
    """Chunks of one streamed completion: text deltas, the finish reason on the last, then usage."""
    lp = CompletionLogprobs(offset=len(echo)) if req.logprobs is not None else None
    head, count = echo, 0
    async for ev in gen.events():
        count += 1
        text, head = head + ev.text, ""
        start = len(lp.tokens) if lp is not None else 0
        if lp is not None and not ev.special:
            lp.add(_token_text(client, ev.token), ev.logprob, ev.text)
        if not text and ev.finish is None and lp is None:
            continue  # held back (partial character or possible stop sequence)
        choice = {"index": 0, "text": text, "logprobs": lp.as_dict(start) if lp is not None else None,
                  "finish_reason": finish_reason(ev.finish)}
        yield _chunk(meta, choice, req.include_usage)
    if req.include_usage:
        yield {**meta, "choices": [], "usage": usage(len(gen.prompt), count)}


async def _chat_stream(client: LLMClient, gen: Generation, req: ChatRequest,
                       meta: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """Chunks of one streamed chat completion: role, content deltas, finish reason, then usage."""
    first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    yield _chunk(meta, first, req.include_usage)
    count, finish = 0, None
    async for ev in gen.events():
        count, finish = count + 1, ev.finish
        entry = _chat_logprob(client, ev) if req.logprobs and not ev.special else None
        if ev.text or entry is not None:
            choice = {"index": 0, "delta": {"content": ev.text},
                      "logprobs": {"content": [entry]} if entry is not None else None, "finish_reason": None}
            yield _chunk(meta, choice, req.include_usage)
    last = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason(finish)}
    yield _chunk(meta, last, req.include_usage)
    if req.include_usage:
        yield {**meta, "choices": [], "usage": usage(len(gen.prompt), count)}


# -- handlers --------------------------------------------------------------------------------------
def _name_field(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{key} must be a non-empty string; got {value!r}")
    return value


def parse_load_adapter(body: dict[str, Any]) -> tuple[str, str, str | None]:
    """A /v1/load_lora_adapter body -> (lora_name, lora_path, model); 400 naming the field."""
    return _name_field(body, "lora_name"), _name_field(body, "lora_path"), _model(body)


def parse_unload_adapter(body: dict[str, Any]) -> tuple[str, str | None]:
    """A /v1/unload_lora_adapter body -> (lora_name, model); 400 naming the field."""
    return _name_field(body, "lora_name"), _model(body)


def _raise_reply(reply: AdapterReply) -> None:
    """Turn a failed adapter operation into its error; a rejected adapter is a 400 (the request's fault)."""
    if reply.error:
        raise error_for(reply.error_kind or ErrorKind.INTERNAL, reply.error)


class _OpenAI:
    """The OpenAI route handlers over the LLMs of one front."""

    def __init__(self, llms: LLMDirectory) -> None:
        self.llms = llms
        self.created = int(time.time())

    async def completions(self, request: Request) -> Response:
        req = parse_completion(await read_json(request))
        client, adapter = self.llms.resolve(req.model)
        prompts = [_prompt_ids(client, p) for p in req.prompts]
        echoes = [_echo_text(client, p) if req.echo else "" for p in req.prompts]
        if req.stream:
            meta = _meta("cmpl", "text_completion", req.model or client.name)
            gen = await client.start(prompts[0], req.params, adapter, stops=req.stops, include_stop=False)
            return sse_response(_completion_stream(client, gen, req, meta, echoes[0]), gen, done_marker=True,
                                shape=openai_error)
        results = await _generate_all(client, adapter, prompts, req.params, req.stops)
        choices = [_completion_choice(client, i, events, echoes[i], req.logprobs is not None)
                   for i, events in enumerate(results)]
        tokens = usage(sum(map(len, prompts)), sum(map(len, results)))
        meta = _meta("cmpl", "text_completion", req.model or client.name)
        return json_response({**meta, "choices": choices, "usage": tokens})

    async def chat(self, request: Request) -> Response:
        req = parse_chat(await read_json(request))
        client, adapter = self.llms.resolve(req.model)
        ids = render_chat(client.tokenizer, req.messages)
        max_tokens = chat_max_tokens(req.max_tokens, len(ids), client.max_total_tokens)
        params = msgspec.structs.replace(req.params, max_new_tokens=max_tokens)
        model = req.model or client.name
        if req.stream:
            gen = await client.start(ids, params, adapter, stops=req.stops, include_stop=False)
            meta = _meta("chatcmpl", "chat.completion.chunk", model)
            return sse_response(_chat_stream(client, gen, req, meta), gen, done_marker=True, shape=openai_error)
        events = await _generate(client, adapter, ids, params, req.stops)
        logprobs = None
        if req.logprobs:
            logprobs = {"content": [_chat_logprob(client, ev) for ev in events if not ev.special]}
        choice = {"index": 0, "message": {"role": "assistant", "content": "".join(ev.text for ev in events)},
                  "logprobs": logprobs, "finish_reason": finish_reason(events[-1].finish if events else None)}
        meta = _meta("chatcmpl", "chat.completion", model)
        return json_response({**meta, "choices": [choice], "usage": usage(len(ids), len(events))})

    def _card(self, ident: str, client: LLMClient, adapter: bool) -> dict[str, Any]:
        return {"id": ident, "object": "model", "created": self.created, "owned_by": "tandem",
                "root": client.name, "parent": client.name if adapter else None,
                "max_model_len": client.max_total_tokens}

    async def _cards(self) -> list[dict[str, Any]]:
        """Every LLM and its adapters; adapters of LLMs other than the default are named 'llm/adapter'."""
        cards = []
        for i, client in enumerate(self.llms.clients):
            cards.append(self._card(client.name, client, adapter=False))
            try:
                reply = await client.adapter_op("list")
            except TandemError as e:  # e.g. no live replica: still list the base model
                logger.warning("cannot list the adapters of %s: %s", client.name, e)
                continue
            for info in sorted(reply.adapters, key=lambda a: a.name):
                ident = info.name if i == 0 else f"{client.name}/{info.name}"
                cards.append(self._card(ident, client, adapter=True))
        return cards

    async def models(self, request: Request) -> Response:
        return json_response({"object": "list", "data": await self._cards()})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        for card in await self._cards():
            if card["id"] == name:
                return json_response(card)
        raise ModelNotFound(f"unknown model {name!r}; see GET /v1/models")

    async def load_adapter(self, request: Request) -> Response:
        name, path, model = parse_load_adapter(await read_json(request))
        client = self.llms.get(model)
        if name in self.llms.by_name:
            raise InvalidInput(f"lora_name {name!r} is the name of an LLM; choose another name")
        reply = await client.adapter_op("load", name, str(client.confine(path)))
        _raise_reply(reply)
        load_ms = next((a.load_ms for a in reply.adapters if a.name == name), None)
        return json_response({"status": "loaded", "lora_name": name,
                              "load_ms": round(load_ms, 3) if load_ms is not None else None})

    async def unload_adapter(self, request: Request) -> Response:
        name, model = parse_unload_adapter(await read_json(request))
        client = self.llms.get(model)
        _raise_reply(await client.adapter_op("unload", name))
        return json_response({"status": "unloaded", "lora_name": name})


# -- OpenAPI schemas ----------------------------------------------------------------------------------------------
def _n(t: str, **kw: Any) -> Schema:
    return {"type": [t, "null"], **kw}


_IDS: Schema = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_STOP: Schema = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": MAX_STOPS},
                           {"type": "null"}]}
_SAMPLING: dict[str, Schema] = {
    "model": _n("string", description="an LLM or adapter name (GET /v1/models)"),
    "temperature": _n("number", minimum=0, maximum=2), "top_p": _n("number", exclusiveMinimum=0, maximum=1),
    "top_k": _n("integer", minimum=-1), "repetition_penalty": _n("number", exclusiveMinimum=0),
    "seed": _n("integer", minimum=-(2**63), maximum=2**64 - 1), "ignore_eos": _n("boolean"),
    "presence_penalty": _n("number", minimum=-2, maximum=2, description="only 0"),
    "frequency_penalty": _n("number", minimum=-2, maximum=2, description="only 0"),
    "n": {"enum": [1, None]}, "stop": _STOP, "stream": _n("boolean"),
    "stream_options": nullable(obj(optional={"include_usage": _n("boolean")})),
}
_COMPLETION = obj({"prompt": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"},
                                                              "minItems": 1},
                                        _IDS, {"type": "array", "items": _IDS, "minItems": 1}]}},
                  {**_SAMPLING, "max_tokens": _n("integer", minimum=1), "logprobs": _n("integer", minimum=0, maximum=5),
                   "echo": _n("boolean"), "best_of": {"enum": [1, None]},
                   "suffix": {"anyOf": [{"const": ""}, {"type": "null"}], "description": "not supported"}})
_TEXT_PART = obj({"type": {"const": "text"}, "text": {"type": "string"}})
_MESSAGE = obj({"role": {"enum": sorted(_ROLES)}},
               {"content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}, {"type": "null"}],
                            "description": "null only for assistant messages"}})
_CHAT = obj({"messages": {"type": "array", "items": _MESSAGE, "minItems": 1}},
            {**_SAMPLING, "max_tokens": _n("integer", minimum=1), "max_completion_tokens": _n("integer", minimum=1),
             "logprobs": _n("boolean"), "top_logprobs": _n("integer", minimum=0, maximum=0),
             "tools": {"anyOf": [{"type": "array", "maxItems": 0}, {"type": "null"}], "description": "not supported"},
             "tool_choice": {"enum": ["none", None]},
             "response_format": nullable(obj({"type": {"const": "text"}}))})
_USAGE = obj({"prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
              "total_tokens": {"type": "integer"}})
_META = {"id": {"type": "string"}, "object": {"type": "string"}, "created": {"type": "integer"},
         "model": {"type": "string"}}
_FINISH: Schema = {"enum": ["stop", "length", None]}
_COMPLETION_OUT = obj({**_META, "choices": {"type": "array", "items": obj(
    {"index": {"type": "integer"}, "text": {"type": "string"}, "logprobs": _n("object"), "finish_reason": _FINISH})},
    "usage": _USAGE})
_CHAT_OUT = obj({**_META, "choices": {"type": "array", "items": obj(
    {"index": {"type": "integer"}, "message": obj({"role": {"const": "assistant"}, "content": {"type": "string"}}),
     "logprobs": _n("object"), "finish_reason": _FINISH})}, "usage": _USAGE})
_CARD = obj({"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
             "owned_by": {"type": "string"}, "root": {"type": "string"}, "parent": _n("string"),
             "max_model_len": {"type": "integer"}})
_COMPLETION_CHUNK = obj({**_META, "choices": {"type": "array", "items": obj(
    {"index": {"type": "integer"}, "text": {"type": "string"}, "finish_reason": _FINISH})}},
    {"usage": nullable(_USAGE)})
_CHAT_CHUNK = obj({**_META, "choices": {"type": "array", "items": obj(
    {"index": {"type": "integer"},
     "delta": obj(optional={"role": {"const": "assistant"}, "content": {"type": "string"}}),
     "finish_reason": _FINISH})}}, {"usage": nullable(_USAGE)})
_GEN_ERRORS = (400, 404, 413, 422, 503, 504)
_ADAPTER_ERRORS = (400, 404, 409, 413, 503, 504)


def _docs() -> dict[str, RouteDoc]:
    """Each OpenAI route's OpenAPI description, by endpoint label."""
    name = {"type": "string", "minLength": 1, "pattern": r"\S"}
    model = {"model": _n("string", description="the LLM (default: the first)")}
    load = obj({"lora_name": name, "lora_path": {**name, "description": "inside the entry's adapter_dirs"}}, model)
    return {
        "openai_completions": RouteDoc("OpenAI completions (model: the base LLM or an adapter)", "openai",
                                       request=json_body(_COMPLETION),
                                       responses={200: {**json_body(_COMPLETION_OUT),
                                                  **sse({"anyOf": [_COMPLETION_CHUNK, OPENAI_ERROR]}, "[DONE]")}},
                                       errors=_GEN_ERRORS, error=OPENAI_ERROR),
        "openai_chat": RouteDoc("OpenAI chat completions, rendered by the tokenizer's chat template", "openai",
                                request=json_body(_CHAT),
                                responses={200: {**json_body(_CHAT_OUT),
                                                 **sse({"anyOf": [_CHAT_CHUNK, OPENAI_ERROR]}, "[DONE]")}},
                                errors=_GEN_ERRORS, error=OPENAI_ERROR),
        "openai_models": RouteDoc("OpenAI models: every LLM and every loaded adapter", "openai",
                                  responses={200: json_body(obj({"object": {"const": "list"},
                                                                 "data": {"type": "array", "items": _CARD}}))},
                                  error=OPENAI_ERROR),
        "openai_model": RouteDoc("OpenAI model card of one LLM or adapter", "openai",
                                 responses={200: json_body(_CARD)}, errors=(404,), error=OPENAI_ERROR),
        "openai_load_lora": RouteDoc("Load a PEFT LoRA adapter at run time (vLLM's API)", "openai",
                                     request=json_body(load), responses={200: json_body(obj(
                                         {"status": {"const": "loaded"}, "lora_name": {"type": "string"},
                                          "load_ms": _n("number")}))},
                                     errors=_ADAPTER_ERRORS, error=OPENAI_ERROR),
        "openai_unload_lora": RouteDoc("Unload a run-time adapter (vLLM's API)", "openai",
                                       request=json_body(obj({"lora_name": name}, model)),
                                       responses={200: json_body(obj({"status": {"const": "unloaded"},
                                                                      "lora_name": {"type": "string"}}))},
                                       errors=_ADAPTER_ERRORS, error=OPENAI_ERROR),
    }


def openai_routes(llms: LLMDirectory) -> list[RouteSpec]:
    """The OpenAI-compatible endpoints, answering errors with OpenAI's error object."""
    api = _OpenAI(llms)
    docs = _docs()

    def label(r: Request) -> str:
        return llms.default_name()

    table: list[tuple[str, Handler, str, str]] = [
        ("/v1/completions", api.completions, "POST", "openai_completions"),
        ("/v1/chat/completions", api.chat, "POST", "openai_chat"),
        ("/v1/models", api.models, "GET", "openai_models"),
        ("/v1/models/{model:path}", api.model, "GET", "openai_models"),
        ("/v1/load_lora_adapter", api.load_adapter, "POST", "openai_load_lora"),
        ("/v1/unload_lora_adapter", api.unload_adapter, "POST", "openai_unload_lora"),
    ]
    mutating = {"/v1/load_lora_adapter", "/v1/unload_lora_adapter"}  # change the server: the admin key
    return [RouteSpec(path, method, endpoint, fn, shape=openai_error, model_of=label,
                      doc=docs.get("openai_model" if "{model" in path else endpoint),
                      access="admin" if path in mutating else "user")
            for path, fn, method, endpoint in table]
