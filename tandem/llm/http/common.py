"""Shared pieces of the LLM HTTP APIs (TGI and OpenAI): model/adapter lookup, SSE, JSON bodies.

Streaming responses start only after the first token arrived (`LLMClient.start`), so request
errors are ordinary JSON 4xx answers; an error after streaming began is sent as a final SSE event.
When the client disconnects, Starlette stops iterating the body and `Generation.close()` cancels
the request in the worker, freeing its KV slot at the next step.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request as HTTPRequest
from starlette.responses import StreamingResponse

from tandem.errors import ErrorKind, ModelNotFound, TandemError
from tandem.llm.client import Generation, LLMClient
from tandem.serving.bodies import json_object, json_response, opt_float, opt_int, read_limited
from tandem.serving.kinds import ErrorShape, FrontState, Schema
from tandem.serving.openapi import obj
from tandem.serving.protocols.openai_errors import OPENAI_ERROR, openai_error
from tandem.serving.sse import sse_stream

__all__ = ["LLMDirectory", "OPENAI_ERROR", "TGI_ERROR", "json_response", "openai_error", "opt_float", "opt_int",
           "read_json", "sse_response", "tgi_error"]

logger = logging.getLogger(__name__)
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


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
    """Server-sent events from dicts (see tandem/serving/sse.py); the generation is closed when it ends."""
    return sse_stream(events, gen.close, shape, done_marker=done_marker)
