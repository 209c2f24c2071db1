"""Shared pieces of the LLM HTTP APIs (TGI and OpenAI): model/adapter lookup, SSE, JSON bodies.

Streaming responses start only after the first token arrived (`LLMClient.start`), so request
errors are ordinary JSON 4xx answers; an error after streaming began is sent as a final SSE event.
When the client disconnects, Starlette stops iterating the body and `Generation.close()` cancels
the request in the worker, freeing its KV slot at the next step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from starlette.background import BackgroundTask
from starlette.requests import Request as HTTPRequest
from starlette.responses import StreamingResponse

from tandem.errors import InvalidInput, ModelNotFound, TandemError
from tandem.llm.client import Generation, LLMClient
from tandem.serving.bodies import json_response, read_limited

__all__ = ["LLMDirectory", "error_kind", "json_response", "openai_error", "opt_float", "opt_int", "read_json",
           "sse_response", "tgi_error"]

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
    body = await read_limited(request, limit, "LLM requests")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(f"malformed JSON body: {e}") from None
    if not isinstance(data, dict):
        raise InvalidInput("the JSON body must be an object")
    return data


class LLMDirectory:
    """The LLM entries of a front, by name; the first one is the default (TGI routes serve it)."""

    def __init__(self, clients: list[LLMClient] | None = None) -> None:
        self.set_clients(clients or [])

    def set_clients(self, clients: list[LLMClient]) -> None:
        """Filled when the front connects to its workers (routes are built before that)."""
        self.clients = list(clients)
        self.by_name = {c.name: c for c in self.clients}

    @property
    def default(self) -> LLMClient:
        if not self.clients:
            raise ModelNotFound("this server has no LLM (start it with --llm PATH or a kind: llm entry)")
        return self.clients[0]

    def get(self, name: str | None) -> LLMClient:
        if not name:
            return self.default
        if name not in self.by_name:
            raise ModelNotFound(f"unknown model {name!r}; LLMs served: {sorted(self.by_name)}")
        return self.by_name[name]

    def resolve(self, model: str | None) -> tuple[LLMClient, str]:
        """OpenAI `model`: an LLM's name (base model) or an adapter name ('name' or 'llm/adapter')."""
        if not model or model in self.by_name:
            return self.get(model), ""
        if "/" in model and model.split("/", 1)[0] in self.by_name:
            llm, adapter = model.split("/", 1)
            return self.by_name[llm], adapter
        return self.default, model  # the worker answers 404 naming it if no such adapter exists


def tgi_error(status: int, message: str, kind: str) -> dict[str, Any]:
    """TGI's error body: `{"error": message, "error_type": kind}`."""
    return {"error": message, "error_type": kind}


def openai_error(status: int, message: str, kind: str) -> dict[str, Any]:
    """OpenAI's error body, which the openai client turns into the exception's message."""
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


ErrorShape = Callable[[int, str, str], dict[str, Any]]


def error_kind(e: TandemError) -> str:
    return {400: "invalid_request_error", 404: "not_found_error", 422: "validation", 503: "overloaded"}.get(
        e.status, "internal")


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
            yield b"data:" + orjson.dumps(shape(e.status, str(e), error_kind(e))) + b"\n\n"
        except Exception as e:  # keep serving others; the client sees why its stream ended
            logger.exception("stream failed")
            yield b"data:" + orjson.dumps(shape(500, f"{type(e).__name__}: {e}", "internal")) + b"\n\n"
        finally:
            await gen.close()

    return StreamingResponse(body(), media_type="text/event-stream", headers=_SSE_HEADERS,
                             background=BackgroundTask(gen.close))
