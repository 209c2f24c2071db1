"""Text Generation Inference (TGI) compatible API, so TGI's clients work unmodified.

    POST /generate          {"inputs", "parameters": {..., "adapter_id"}}  -> {"generated_text", "details"?}
    POST /generate_stream   same body -> server-sent events, one per token, the last with the text
    POST /                  TGI's compat route: `stream` picks /generate_stream, else a one-item list
    GET  /info, GET /health

Parameters TGI has but Tandem does not implement (best_of > 1, typical_p, watermark, grammar,
frequency_penalty, top_n_tokens, decoder_input_details) are refused with 400 naming them,
never silently ignored. Sampling is on when do_sample is true or a warper is set (temperature
!= 1, top_k, top_p < 1), as in TGI.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from tandem import __version__
from tandem.errors import InvalidInput
from tandem.llm.client import Generation, GenEvent, LLMClient
from tandem.llm.params import SamplingParams
from tandem.serving.protocols.llm_common import LLMDirectory, json_response, opt_float, opt_int, read_json, sse_response

__all__ = ["TGIRequest", "parse_generate", "tgi_routes"]

Handler = Callable[[HTTPRequest], Awaitable[Response]]
_UNSUPPORTED = {"typical_p": lambda v: v is not None and v < 1.0, "watermark": bool, "grammar": bool,
                "frequency_penalty": lambda v: bool(v), "top_n_tokens": lambda v: bool(v),
                "decoder_input_details": bool, "best_of": lambda v: v not in (None, 1)}


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
    return SamplingParams(max_new_tokens=max_new or default_max_new, do_sample=bool(p.get("do_sample")) or warpers,
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
    for name, bad in _UNSUPPORTED.items():
        if bad(p.get(name)):
            raise InvalidInput(f"parameters.{name}={p[name]!r} is not supported by this server")
    stops = p.get("stop") or []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise InvalidInput("parameters.stop must be a list of at most 4 strings")
    adapter = p.get("adapter_id") or ""
    if not isinstance(adapter, str):
        raise InvalidInput("parameters.adapter_id must be a string")
    truncate = opt_int(p, "truncate", 1, name="parameters.truncate")
    return TGIRequest(inputs, _sampling(p, default_max_new), stops, adapter, bool(p.get("details")),
                      bool(p.get("return_full_text")), truncate)


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


def tgi_routes(llms: LLMDirectory) -> list[tuple[str, Handler, str, str]]:
    """(path, handler, method, metric name) for the TGI API."""

    async def generate(http: HTTPRequest) -> Response:
        return json_response(await _generate_json(llms, await read_json(http)))

    async def generate_stream(http: HTTPRequest) -> Response:
        return await _stream(llms, await read_json(http))

    async def compat(http: HTTPRequest) -> Response:
        body = await read_json(http)
        if body.get("stream"):
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
        ok = any(llms.default.up)
        return json_response({"healthy": ok}, 200 if ok else 503)

    return [("/generate", generate, "POST", "tgi_generate"), ("/generate_stream", generate_stream, "POST",
             "tgi_stream"), ("/", compat, "POST", "tgi_compat"), ("/info", info, "GET", "tgi_info"),
            ("/health", health, "GET", "tgi_health")]

