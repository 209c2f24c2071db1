"""Text Generation Inference (TGI) compatible API, so TGI's clients work unmodified.

    POST /generate          {"inputs", "parameters": {..., "adapter_id"}}  -> {"generated_text", "details"?}
    POST /generate_stream   same body -> server-sent events, one per token, the last with the text
    POST /                  TGI's compat route: `stream` picks /generate_stream, else a one-item list
    GET  /info, GET /health

Parameters TGI has but Tandem does not implement (best_of > 1, typical_p, watermark, grammar,
frequency_penalty, top_n_tokens, decoder_input_details) are refused naming them, never silently
ignored. Invalid requests answer 422 with `error_type: "validation"`, as TGI's clients expect.
Sampling is on when do_sample is true or a warper is set (temperature
!= 1, top_k, top_p < 1), as in TGI.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from tandem import __version__
from tandem.errors import InvalidInput
from tandem.llm.client import Generation, GenEvent, LLMClient
from tandem.llm.http.common import (
    TGI_ERROR,
    LLMDirectory,
    json_response,
    opt_float,
    opt_int,
    read_json,
    sse_response,
    tgi_error,
)
from tandem.llm.params import SamplingParams
from tandem.serving.kinds import RouteDoc, RouteSpec, Schema
from tandem.serving.openapi import json_body, nullable, obj, sse

__all__ = ["TGIRequest", "compat_stream", "parse_generate", "tgi_routes"]


def _flag(p: dict[str, Any], key: str) -> bool:
    value = p.get(key)
    if value is not None and not isinstance(value, bool):
        raise InvalidInput(f"parameters.{key} must be a boolean; got {value!r}")
    return bool(value)


# Each check reads the field with its type checked (a wrong type is a validation error naming it)
# and says whether the value asks for something this server does not implement.
_UNSUPPORTED: dict[str, Callable[[dict[str, Any]], bool]] = {
    "typical_p": lambda p: (opt_float(p, "typical_p", 0.0, 1.0, lo_open=True, name="parameters.typical_p")
                            or 1.0) < 1.0,
    "watermark": lambda p: _flag(p, "watermark"),
    "grammar": lambda p: p.get("grammar") is not None,
    "frequency_penalty": lambda p: bool(opt_float(p, "frequency_penalty", -2.0, 2.0,
                                                  name="parameters.frequency_penalty")),
    "top_n_tokens": lambda p: bool(opt_int(p, "top_n_tokens", 0, name="parameters.top_n_tokens")),
    "decoder_input_details": lambda p: _flag(p, "decoder_input_details"),
    "best_of": lambda p: opt_int(p, "best_of", 1, name="parameters.best_of") not in (None, 1),
}


@dataclass(frozen=True)
class TGIRequest:
    inputs: str
    params: SamplingParams
    stops: list[str]
    adapter: str
    details: bool
    return_full_text: bool
    truncate: int | None


def _sampling(p: dict[str, Any], default_max_new: int) -> SamplingParams:
    temperature = opt_float(p, "temperature", 0.0, None, lo_open=True, name="parameters.temperature")
    top_k = opt_int(p, "top_k", 1, name="parameters.top_k")
    top_p = opt_float(p, "top_p", 0.0, 1.0, lo_open=True, name="parameters.top_p")
    rep = opt_float(p, "repetition_penalty", 0.0, None, lo_open=True, name="parameters.repetition_penalty")
    max_new = opt_int(p, "max_new_tokens", 1, name="parameters.max_new_tokens")
    seed = opt_int(p, "seed", 0, 2**64 - 1, name="parameters.seed")
    warpers = (temperature not in (None, 1.0)) or bool(top_k) or (top_p is not None and top_p < 1.0)
    return SamplingParams(max_new_tokens=max_new or default_max_new, do_sample=_flag(p, "do_sample") or warpers,
                          temperature=temperature or 1.0, top_k=top_k or 0, top_p=top_p or 1.0,
                          repetition_penalty=rep or 1.0, seed=seed, logprobs=True)


def parse_generate(body: dict[str, Any], default_max_new: int) -> TGIRequest:
    """Validate a TGI request body; every problem is a 400 naming the field."""
    inputs = body.get("inputs")
    if not isinstance(inputs, str) or not inputs:
        raise InvalidInput("`inputs` must be a non-empty string")
    p = body.get("parameters")
    p = {} if p is None else p
    if not isinstance(p, dict):
        raise InvalidInput("`parameters` must be an object")
    for name, unsupported in _UNSUPPORTED.items():
        if unsupported(p):
            raise InvalidInput(f"parameters.{name}={p[name]!r} is not supported by this server")
    stops = p.get("stop") or []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise InvalidInput("parameters.stop must be a list of at most 4 strings")
    adapter = p.get("adapter_id")
    if adapter is not None and not isinstance(adapter, str):
        raise InvalidInput("parameters.adapter_id must be a string")
    truncate = opt_int(p, "truncate", 1, name="parameters.truncate")
    return TGIRequest(inputs, _sampling(p, default_max_new), stops, adapter or "", _flag(p, "details"),
                      _flag(p, "return_full_text"), truncate)


def compat_stream(body: dict[str, Any]) -> bool:
    """`stream` of TGI's compat route `POST /`: a boolean (absent or null: false)."""
    value = body.get("stream")
    if value is not None and not isinstance(value, bool):
        raise InvalidInput(f"stream must be a boolean; got {value!r}")
    return bool(value)


def _token(client: LLMClient, ev: GenEvent) -> dict[str, Any]:
    text = client.tokenizer.decode([ev.token], skip_special_tokens=False)
    return {"id": ev.token, "text": text, "logprob": ev.logprob, "special": ev.special}


async def _start(llms: LLMDirectory, body: dict[str, Any]) -> tuple[LLMClient, TGIRequest, Generation]:
    client = llms.default
    req = parse_generate(body, client.cfg.default_max_new_tokens)
    ids = list(client.tokenizer(req.inputs)["input_ids"])
    if req.truncate is not None:
        ids = ids[-req.truncate:]
    gen = await client.start(ids, req.params, req.adapter, req.stops, include_stop=True)
    return client, req, gen


def _details(req: TGIRequest, finish: str, tokens: list[dict[str, Any]]) -> dict[str, Any]:
    return {"finish_reason": finish, "generated_tokens": len(tokens), "seed": req.params.seed,
            "prefill": [], "tokens": tokens, "top_tokens": None, "best_of_sequences": None}


async def _generate_json(llms: LLMDirectory, body: dict[str, Any]) -> dict[str, Any]:
    client, req, gen = await _start(llms, body)
    text, tokens, finish = "", [], "length"
    try:
        async for ev in gen.events():
            text += ev.text
            tokens.append(_token(client, ev))
            finish = ev.finish or finish
    finally:
        await gen.close()
    out: dict[str, Any] = {"generated_text": (req.inputs + text) if req.return_full_text else text}
    if req.details:
        out["details"] = _details(req, finish, tokens)
    return out


async def _stream(llms: LLMDirectory, body: dict[str, Any]) -> Response:
    client, req, gen = await _start(llms, body)

    async def events() -> AsyncIterator[dict[str, Any]]:
        text, n = "", 0
        async for ev in gen.events():
            text += ev.text
            n += 1
            last = ev.finish is not None
            full = (req.inputs + text) if req.return_full_text else text
            yield {"index": n, "token": {**_token(client, ev), "text": ev.text}, "top_tokens": None,
                   "generated_text": full if last else None,
                   "details": {"finish_reason": ev.finish, "generated_tokens": n, "seed": req.params.seed}
                   if last else None}

    return sse_response(events(), gen, done_marker=False)


# -- OpenAPI schemas ----------------------------------------------------------------------------------------------
def _n(t: str, **kw: Any) -> Schema:
    return {"type": [t, "null"], **kw}


_PARAMETERS = obj(optional={
    "max_new_tokens": _n("integer", minimum=1), "temperature": _n("number", exclusiveMinimum=0),
    "top_k": _n("integer", minimum=1), "top_p": _n("number", exclusiveMinimum=0, maximum=1),
    "repetition_penalty": _n("number", exclusiveMinimum=0), "seed": _n("integer", minimum=0, maximum=2**64 - 1),
    "do_sample": _n("boolean"), "details": _n("boolean"), "return_full_text": _n("boolean"),
    "stop": _n("array", items={"type": "string"}, maxItems=4), "adapter_id": _n("string"),
    "truncate": _n("integer", minimum=1),
    # TGI's parameters this server refuses (422) unless they ask for nothing:
    "typical_p": _n("number", exclusiveMinimum=0, maximum=1, description="only 1 (off)"),
    "best_of": _n("integer", minimum=1, description="only 1"),
    "top_n_tokens": _n("integer", minimum=0, description="only 0"),
    "frequency_penalty": _n("number", minimum=-2, maximum=2, description="only 0"),
    "watermark": _n("boolean", description="only false"),
    "decoder_input_details": _n("boolean", description="only false"), "grammar": {"type": "null"}})
_GENERATE = obj({"inputs": {"type": "string", "minLength": 1}},
                {"parameters": {"anyOf": [_PARAMETERS, {"type": "null"}]}})
_TOKEN = obj({"id": {"type": "integer"}, "text": {"type": "string"}, "logprob": {"type": ["number", "null"]},
              "special": {"type": "boolean"}})
_DETAILS = obj({"finish_reason": {"type": "string"}, "generated_tokens": {"type": "integer"},
                "seed": {"type": ["integer", "null"]}, "tokens": {"type": "array", "items": _TOKEN}},
               {"prefill": {"type": "array"}})
_GENERATED = obj({"generated_text": {"type": "string"}}, {"details": _DETAILS})
_EVENT = obj({"index": {"type": "integer"}, "token": _TOKEN, "generated_text": _n("string"),
              "details": nullable(obj({"finish_reason": {"type": "string"}, "generated_tokens": {"type": "integer"},
                                       "seed": _n("integer")}))})
_SSE = sse({"anyOf": [_EVENT, TGI_ERROR]})  # an error after streaming began is the last event
_ERRORS = (404, 413, 422, 503, 504)
_INFO = obj({"model_id": {"type": "string"}, "max_total_tokens": {"type": "integer"},
             "max_input_tokens": {"type": "integer"}, "max_stop_sequences": {"type": "integer"},
             "version": {"type": "string"}})
_HEALTH = json_body(obj({"healthy": {"type": "boolean"}}))


def _docs() -> dict[str, RouteDoc]:
    """Each TGI route's OpenAPI description, by endpoint label."""
    compat = obj({"inputs": {"type": "string", "minLength": 1}},
                 {"parameters": {"anyOf": [_PARAMETERS, {"type": "null"}]}, "stream": _n("boolean")})
    return {
        "tgi_generate": RouteDoc("TGI: generate text (adapter_id picks a LoRA adapter)", "tgi",
                                 request=json_body(_GENERATE), responses={200: json_body(_GENERATED)},
                                 errors=_ERRORS, error=TGI_ERROR),
        "tgi_stream": RouteDoc("TGI: generate text as server-sent events, one per token", "tgi",
                               request=json_body(_GENERATE), responses={200: _SSE}, errors=_ERRORS, error=TGI_ERROR),
        "tgi_compat": RouteDoc("TGI's compat route: `stream` picks /generate_stream, else a one-item list", "tgi",
                               request=json_body(compat),
                               responses={200: {**json_body({"type": "array", "items": _GENERATED}), **_SSE}},
                               errors=_ERRORS, error=TGI_ERROR),
        "tgi_info": RouteDoc("TGI: the served model and its limits", "tgi", responses={200: json_body(_INFO)},
                             errors=(404,), error=TGI_ERROR),
        "tgi_health": RouteDoc("TGI: health of the default LLM", "tgi", responses={200: _HEALTH, 503: _HEALTH},
                               errors=(404,), error=TGI_ERROR),
    }


def tgi_routes(llms: LLMDirectory) -> list[RouteSpec]:
    """The TGI API's routes, answering errors in TGI's shape."""
    docs = _docs()

    async def generate(http: HTTPRequest) -> Response:
        return json_response(await _generate_json(llms, await read_json(http)))

    async def generate_stream(http: HTTPRequest) -> Response:
        return await _stream(llms, await read_json(http))

    async def compat(http: HTTPRequest) -> Response:
        body = await read_json(http)
        if compat_stream(body):
            return await _stream(llms, body)
        return json_response([await _generate_json(llms, body)])

    async def info(http: HTTPRequest) -> Response:
        c = llms.default
        return json_response({
            "model_id": c.name, "model_sha": None, "model_dtype": c.cfg.dtype, "model_device_type": "auto",
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": c.cfg.max_batch_size + c.cfg.max_waiting,
            "max_best_of": 1, "max_stop_sequences": 4, "max_input_tokens": c.max_total_tokens - 1,
            "max_total_tokens": c.max_total_tokens, "validation_workers": 1, "max_client_batch_size": 1,
            "router": "tandem", "version": __version__, "sha": None, "docker_label": None})

    async def health(http: HTTPRequest) -> Response:
        ok = llms.default.ready
        return json_response({"healthy": ok}, 200 if ok else 503)

    def label(r: HTTPRequest) -> str:
        return llms.default_name()

    table: list[tuple[str, Callable[[HTTPRequest], Any], str, str]] = [
        ("/generate", generate, "POST", "tgi_generate"), ("/generate_stream", generate_stream, "POST", "tgi_stream"),
        ("/", compat, "POST", "tgi_compat"), ("/info", info, "GET", "tgi_info"),
        ("/health", health, "GET", "tgi_health")]
    # /health is a probe (public); the rest need the API key when one is configured (README "Auth")
    return [RouteSpec(path, method, endpoint, fn, shape=tgi_error, model_of=label, doc=docs.get(endpoint),
                      access="public" if path == "/health" else "user")
            for path, fn, method, endpoint in table]

