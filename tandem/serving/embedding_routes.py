"""Embedding APIs of tensor models: OpenAI `POST /v1/embeddings` and TEI `POST /embed`.

A tensor model answers them when its request-level signature has an output named `embedding`
(a float vector, `tandem.model.EMBEDDING_FIELD`). Each text is one row of the request-level path
(`rows.py`: the model's preprocess -> predict, batched into as few infer calls as the slot size
allows -> postprocess's `embedding` field); OpenAI token-id inputs go through the model's
`from_token_ids` instead of preprocess, and `usage` counts tokens with its `count_tokens`.

    OpenAI  {"model", "input": str | [str] | [int] | [[int]], "encoding_format": float | base64,
             "dimensions"}  -> {"object": "list", "data": [{"object": "embedding", "index", "embedding"}],
                                "model", "usage": {"prompt_tokens", "total_tokens"}}   errors: OpenAI's object
    TEI     {"inputs": str | [str], "normalize": true, "truncate": false} -> [[float]]
                                                                        errors: {"error", "error_type"}
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from tandem.errors import ErrorKind, InvalidInput, ModelNotFound, PayloadTooLarge, TandemError
from tandem.model import EMBEDDING_FIELD, Request, RequestSpec
from tandem.serving.bodies import json_object, json_response, read_limited
from tandem.serving.kinds import FrontState, RouteDoc, RouteSpec, Schema
from tandem.serving.openapi import json_body, obj
from tandem.serving.protocols.openai_errors import OPENAI_ERROR, openai_error
from tandem.serving.rows import (
    check_row_count,
    checked_rows,
    collect_outputs,
    infer_rows,
    postprocess_rows,
    preprocess_rows,
    row_request,
)
from tandem.serving.tensor_client import TensorClient

__all__ = ["EmbeddingRoutes", "OpenAIEmbeddingsRequest", "embedding_routes", "parse_openai_embeddings",
           "parse_tei_embed", "tei_error"]

_DEFAULT_BODY_LIMIT = 1024 * 1024
Item = str | list[int]


def _bad(message: str, param: str) -> InvalidInput:
    e = InvalidInput(message)
    e.param = param  # type: ignore[attr-defined]  # reported as OpenAI's `param`
    return e


@dataclass
class OpenAIEmbeddingsRequest:
    model: str | None
    items: list[Item]
    encoding_format: str
    dimensions: int | None


def _is_token(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _items(value: Any, field: str) -> list[Item]:
    """OpenAI's `input`: a string, a list of strings, a list of token ids or a list of token-id lists."""
    shapes = "a string, a list of strings, a list of token ids or a list of token-id lists"
    if isinstance(value, str):
        items: list[Item] = [value]
    elif isinstance(value, list) and value and all(_is_token(v) for v in value):
        items = [list(value)]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = list(value)
    elif isinstance(value, list) and all(isinstance(v, list) and all(_is_token(t) for t in v) for v in value):
        items = [list(v) for v in value]
    else:
        got = type(value).__name__ if not isinstance(value, list) else "a list mixing types"
        raise _bad(f"{field} must be {shapes}; got {got}", field)
    for i, item in enumerate(items):
        if len(item) == 0:
            what = "an empty string" if isinstance(item, str) else "an empty token list"
            raise _bad(f"{field}[{i}] is {what}: every input needs content", field)
    return items


def parse_openai_embeddings(body: bytes) -> OpenAIEmbeddingsRequest:
    """Validate an OpenAI embeddings body (400 naming the field on any problem)."""
    data = json_object(body)
    if "input" not in data:
        raise _bad("missing field input: a string or a list of strings (or token ids)", "input")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad(f"model must be a string (an embedding model's name); got {model!r}", "model")
    fmt = data.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise _bad(f"encoding_format must be 'float' or 'base64'; got {fmt!r}", "encoding_format")
    dims = data.get("dimensions")
    if dims is not None and (not _is_token(dims) or dims < 1):
        raise _bad(f"dimensions must be a positive integer; got {dims!r}", "dimensions")
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad(f"user must be a string; got {user!r}", "user")
    items = data["input"]
    if isinstance(items, list) and not items:
        raise _bad("input is empty: send at least one input", "input")
    return OpenAIEmbeddingsRequest(model or None, _items(items, "input"), fmt, dims)


def parse_tei_embed(body: bytes) -> tuple[list[str], bool, bool]:
    """Validate a TEI `/embed` body: (texts, normalize, truncate)."""
    data = json_object(body)
    if "inputs" not in data:
        raise InvalidInput('missing field "inputs": a string or a list of strings')
    inputs = data["inputs"]
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not all(isinstance(t, str) for t in inputs):
        raise InvalidInput(f'"inputs" must be a string or a list of strings; got {type(inputs).__name__}')
    if not inputs:
        raise InvalidInput('"inputs" is empty: send at least one text')
    for i, text in enumerate(inputs):
        if not text:
            raise InvalidInput(f'"inputs"[{i}] is an empty string')
    flags = []
    for name, default in (("normalize", True), ("truncate", False)):
        value = data.get(name)
        if value is None:
            value = default
        if not isinstance(value, bool):
            raise InvalidInput(f'"{name}" must be true or false; got {value!r}')
        flags.append(value)
    return inputs, flags[0], flags[1]


_TEI_TYPES = {ErrorKind.INVALID: "Validation", ErrorKind.TOO_LARGE: "Validation", ErrorKind.NOT_FOUND: "Validation",
              ErrorKind.VALIDATION: "Validation", ErrorKind.OVERLOADED: "Overloaded",
              ErrorKind.UNAUTHORIZED: "Unauthorized"}
TEI_ERROR: Schema = obj({"error": {"type": "string"}, "error_type": {"type": "string"}})


def tei_error(e: TandemError) -> tuple[int, dict[str, Any]]:
    """TEI's error: `{"error", "error_type"}`; invalid bodies are 422, a full queue 429, as TEI answers."""
    kind = _TEI_TYPES.get(e.kind, "Backend")
    status = {400: 422, 503: 429}.get(e.status, e.status)
    return status, {"error": str(e), "error_type": kind}


def _version_key(v: str) -> tuple[int, Any]:
    return (0, int(v)) if v.isdigit() else (1, v)


def _embedding_spec(client: TensorClient) -> RequestSpec | None:
    return next((s for s in client.model.request_outputs if s.name == EMBEDDING_FIELD), None)


class EmbeddingRoutes:
    """The embedding handlers of one front; models are looked up live (versions come and go)."""

    def __init__(self, state: FrontState) -> None:
        self.state = state

    def models(self) -> dict[str, TensorClient]:
        """The latest version of every embedding model, by name, in serving order."""
        by_name: dict[str, TensorClient] = {}
        for c in self.state.of_kind("model"):
            if _embedding_spec(c) is None:
                continue
            have = by_name.get(c.name)
            if have is None or _version_key(c.entry.config.version) > _version_key(have.entry.config.version):
                by_name[c.name] = c
        return by_name

    def default_name(self) -> str:
        models = self.models()
        if self.state.default_model in models:
            return str(self.state.default_model)
        return next(iter(models), "")

    def pick(self, name: str | None) -> TensorClient:
        models = self.models()
        if not models:
            raise ModelNotFound("this server has no embedding model (a model whose request_outputs have an "
                                f"{EMBEDDING_FIELD!r} field)")
        if name is None:
            return models[self.default_name()]
        if name not in models:
            e = ModelNotFound(f"unknown embedding model {name!r}; served: {sorted(models)}")
            e.param = "model"  # type: ignore[attr-defined]
            raise e
        return models[name]

    async def read(self, r: HTTPRequest) -> bytes:
        limits = [c.entry.config.max_request_bytes for c in self.models().values()]
        return await read_limited(r, max(limits, default=_DEFAULT_BODY_LIMIT), "embedding requests")

    async def embed(self, client: TensorClient, items: list[Item], field: str,
                    truncate: bool = True) -> tuple[np.ndarray, int]:
        """[n, dim] embeddings of the items (texts or token-id lists), and their token count."""
        check_row_count(client, len(items), field)
        spec = client.model.request_inputs[0]
        requests: list[Request] = []
        rows = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                req = row_request(spec, item.encode("utf-8"))
                rows += preprocess_rows(client, [req])
                if not truncate and req.state.get("truncated"):
                    raise PayloadTooLarge(f"{field}[{i}] is longer than model {client.name} takes "
                                          "(send truncate: true to embed its leading tokens)")
            else:
                req = Request(body=b"", state={"token_ids": item})
                rows += checked_rows(client, [client.model.from_token_ids(item)])
            requests.append(req)
        tokens = sum(client.model.count_tokens(row) for row in rows)
        results = postprocess_rows(client, await infer_rows(client, rows), requests)
        embedding = _embedding_spec(client)
        assert embedding is not None
        return collect_outputs(client, [embedding], results)[EMBEDDING_FIELD], tokens

    async def openai(self, r: HTTPRequest) -> Response:
        req = parse_openai_embeddings(await self.read(r))
        with self.pick(req.model).use() as client:
            spec = _embedding_spec(client)
            assert spec is not None
            if req.dimensions is not None and req.dimensions != spec.shape[0]:
                raise _bad(f"dimensions {req.dimensions} is not supported: model {client.name} returns "
                           f"{spec.shape[0]}-dimensional embeddings (omit dimensions or send {spec.shape[0]})",
                           "dimensions")
            vectors, tokens = await self.embed(client, req.items, "input")
        vectors = np.asarray(vectors, dtype=np.float32)
        if req.encoding_format == "base64":
            data: list[Any] = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
        else:
            data = list(vectors)
        return json_response({
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
            "model": client.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        })

    async def tei(self, r: HTTPRequest) -> Response:
        texts, normalize, truncate = parse_tei_embed(await self.read(r))
        with self.pick(None).use() as client:
            vectors, _ = await self.embed(client, list(texts), "inputs", truncate=truncate)
        vectors = np.asarray(vectors, dtype=np.float32)
        if normalize and not _normalized(vectors, 1e-6):  # the model's own unit vectors pass unchanged
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        elif not normalize and _normalized(vectors, 1e-4):
            raise InvalidInput(f"normalize: false is not supported by model {client.name}: it returns "
                               "L2-normalized embeddings only")
        return json_response(vectors)


def _normalized(vectors: np.ndarray, atol: float) -> bool:
    return bool(np.allclose(np.linalg.norm(vectors.astype(np.float64), axis=1), 1.0, atol=atol))


_FLOATS: Schema = {"type": "array", "items": {"type": "number"}}
_TOKENS: Schema = {"type": "array", "items": {"type": "integer"}}
_OPENAI_REQUEST = obj({"input": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}},
                                           _TOKENS, {"type": "array", "items": _TOKENS}]}},
                      {"model": {"type": "string"}, "encoding_format": {"enum": ["float", "base64"]},
                       "dimensions": {"type": "integer"}, "user": {"type": "string"}})
_OPENAI_RESPONSE = obj({"object": {"const": "list"},
                        "data": {"type": "array", "items": obj({
                            "object": {"const": "embedding"}, "index": {"type": "integer"},
                            "embedding": {"anyOf": [_FLOATS, {"type": "string"}]}})},
                        "model": {"type": "string"},
                        "usage": obj({"prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}})})
_TEI_REQUEST = obj({"inputs": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}},
                   {"normalize": {"type": "boolean"}, "truncate": {"type": "boolean"}})


def embedding_routes(state: FrontState) -> list[RouteSpec]:
    """OpenAI `/v1/embeddings` and TEI `/embed`, answered by the embedding models served."""
    h = EmbeddingRoutes(state)

    def label(r: HTTPRequest) -> str:
        return h.default_name()

    openai_doc = RouteDoc(
        "OpenAI embeddings", "embeddings", request=json_body(_OPENAI_REQUEST),
        responses={200: json_body(_OPENAI_RESPONSE)}, errors=(400, 404, 413, 503), error=OPENAI_ERROR,
        description="`model` picks one of the embedding models (404 naming them); base64 is little-endian "
                    "float32; `dimensions` must equal the model's.")
    tei_doc = RouteDoc(
        "Text Embeddings Inference embed", "embeddings", request=json_body(_TEI_REQUEST),
        responses={200: json_body({"type": "array", "items": _FLOATS})}, errors=(404, 413, 422, 429),
        error=TEI_ERROR, description="The default embedding model (--default-model, else the first).")
    return [RouteSpec("/v1/embeddings", "POST", "openai_embeddings", h.openai, shape=openai_error, model_of=label,
                      doc=openai_doc),
            RouteSpec("/embed", "POST", "tei_embed", h.tei, shape=tei_error, model_of=label, doc=tei_doc)]
