"""Shared pieces of the LLM HTTP APIs (TGI and OpenAI): model/adapter lookup, SSE, JSON bodies.

Streaming responses start only after the first token arrived (`LLMClient.start`), so request
errors are ordinary JSON 4xx answers; an error after streaming began is sent as a final SSE event.
When the client disconnects, Starlette stops iterating the body and `Generation.close()` cancels
the request in the worker, freeing its KV slot at the next step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.background import BackgroundTask
from starlette.requests import Request as HTTPRequest
from starlette.responses import StreamingResponse

from tandem.errors import ErrorKind, InternalError, InvalidInput, ModelNotFound, TandemError
from tandem.llm.client import Generation, LLMClient
from tandem.serving.bodies import json_object, json_response, read_limited
from tandem.serving.kinds import ErrorShape, FrontState, Schema
from tandem.serving.openapi import obj
from tandem.serving.protocols.openai_errors import OPENAI_ERROR, openai_error

__all__ = ["LLMDirectory", "OPENAI_ERROR", "TGI_ERROR", "json_response", "openai_error", "opt_float", "opt_int",
           "read_json", "sse_response", "tgi_error"]

logger = logging.getLogger(__name__)
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def opt_int(body: dict[str, Any], key: str, lo: int, hi: int | None = None, *, name: str = "") -> int | None:
    """An optional integer field in [lo, hi]; null or absent gives None. `name` is how errors call it."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bounds = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise InvalidInput(f"{name or key} must be an integer {bounds}; got {value!r}")
    return value


def opt_float(body: dict[str, Any], key: str, lo: float, hi: float | None, *, lo_open: bool = False,
              name: str = "") -> float | None:
    """An optional finite number with lo < / <= value <= hi; null or absent gives None."""
    value = body.get(key)
    if value is None:
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and (hi is None or value <= hi)
    if not ok:
        bounds = f"{'>' if lo_open else '>='} {lo:g}" + (f" and <= {hi:g}" if hi is not None else "")
        raise InvalidInput(f"{name or key} must be a number {bounds}; got {value!r}")
    return float(value)


async def read_json(request: HTTPRequest, limit: int = 4 * 1024 * 1024) -> dict[str, Any]:
    """The request body as a JSON object; 413 past `limit`, 400 naming the problem otherwise."""
    return json_object(await read_limited(request, limit, "LLM requests"))


class LLMDirectory:
    """The LLM entries of a front, by name; the first one is the default (TGI routes serve it).

    A live view of the front's state: clients appear when the front connects to its workers
    (routes are built before that).
    """

    def __init__(self, state: FrontState) -> None:
        self.state = state

    @property
    def clients(self) -> list[LLMClient]:
        return self.state.of_kind("llm")

    @property
    def by_name(self) -> dict[str, LLMClient]:
        return {c.name: c for c in self.clients}

    @property
    def default(self) -> LLMClient:
        clients = self.clients
        if not clients:
            raise ModelNotFound("this server has no LLM (start it with --llm PATH or a kind: llm entry)")
        return clients[0]

    def default_name(self) -> str:
        clients = self.clients
        return clients[0].name if clients else ""

    def get(self, name: str | None) -> LLMClient:
        if not name:
            return self.default
        by_name = self.by_name
        if name not in by_name:
            raise ModelNotFound(f"unknown model {name!r}; LLMs served: {sorted(by_name)}")
        return by_name[name]

    def resolve(self, model: str | None) -> tuple[LLMClient, str]:
        """OpenAI `model`: an LLM's name (base model) or an adapter name ('name' or 'llm/adapter')."""
        by_name = self.by_name
        if not model or model in by_name:
            return self.get(model), ""
        if "/" in model and model.split("/", 1)[0] in by_name:
            llm, adapter = model.split("/", 1)
            return by_name[llm], adapter
        return self.default, model  # the worker answers 404 naming it if no such adapter exists


# TGI's error_type values; its clients (huggingface_hub) map 422 "validation" to ValidationError.
_TGI_TYPES = {ErrorKind.INVALID: "validation", ErrorKind.VALIDATION: "validation", ErrorKind.TOO_LARGE: "validation",
              ErrorKind.NOT_FOUND: "not_found", ErrorKind.OVERLOADED: "overloaded",
              ErrorKind.UNAUTHORIZED: "unauthorized", ErrorKind.FORBIDDEN: "forbidden", ErrorKind.TIMEOUT: "timeout"}


def tgi_error(e: TandemError) -> tuple[int, dict[str, Any]]:
    """TGI's error: `{"error": message, "error_type": kind}`; request validation failures are 422."""
    kind = _TGI_TYPES.get(e.kind, "generation" if e.status >= 500 else "validation")
    status = 422 if kind == "validation" and e.status in (400, 422) else e.status
    return status, {"error": str(e), "error_type": kind}


TGI_ERROR: Schema = obj({"error": {"type": "string"}, "error_type": {"type": "string"}})
# OpenAI's error object lives in the serving core: the tensor kind's /v1/embeddings answers in it too.


def sse_response(events: AsyncIterator[dict[str, Any]], gen: Generation, done_marker: bool,
                 shape: ErrorShape = tgi_error) -> StreamingResponse:
    """Server-sent events from dicts; errors mid-stream become a final error event in the API's shape.

    The generation is closed when the body ends, and again (idempotent) as a background task, which
    Starlette also runs when the client disconnected before the body was ever iterated.
    """

    async def body() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield b"data:" + orjson.dumps(event) + b"\n\n"
            if done_marker:
                yield b"data: [DONE]\n\n"
        except TandemError as e:
            yield b"data:" + orjson.dumps(shape(e)[1]) + b"\n\n"
        except Exception as e:  # keep serving others; the client sees why its stream ended
            logger.exception("stream failed")
            yield b"data:" + orjson.dumps(shape(InternalError(f"{type(e).__name__}: {e}"))[1]) + b"\n\n"
        finally:
            await gen.close()

    return StreamingResponse(body(), media_type="text/event-stream", headers=_SSE_HEADERS,
                             background=BackgroundTask(gen.close))
