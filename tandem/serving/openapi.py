"""The OpenAPI 3.1 document of a front (`GET /openapi.json`), assembled from every route's `RouteDoc`.

The core names no kind: each kind describes its own routes (request and response JSON Schemas,
the error shape they answer in) next to their handlers, and this module only lays them out:

    RouteSpec(path "/v2/models/{model}", method, doc=RouteDoc(...))
        -> paths["/v2/models/{model}"]["get"] = {parameters (path + headers), requestBody, responses}

Every route behind the error boundary (`app._wrap`) also gets the 500 it answers on a bug, in
the route's error shape. The schema helpers below are shared by the kinds' route tables.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any

from tandem import __version__
from tandem.serving.kinds import RouteDoc, RouteSpec, Schema

__all__ = ["ANY_JSON", "BINARY", "PLAIN_ERROR", "json_body", "json_body_content", "nullable", "obj",
           "openapi_document", "openapi_path", "sse", "undocumented"]

ANY_JSON: Schema = {}  # any JSON value (a model-defined body)
BINARY: Schema = {"type": "string", "format": "binary"}  # raw bytes (images, Triton binary tensors)
PLAIN_ERROR: Schema = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
_PARAM = re.compile(r"{(\w+)(?::\w+)?}")


def obj(required: dict[str, Schema] | None = None, optional: dict[str, Schema] | None = None, *,
        extra: bool = True) -> Schema:
    """An object schema; `extra=False` forbids properties not listed."""
    schema: Schema = {"type": "object", "properties": {**(required or {}), **(optional or {})}}
    if required:
        schema["required"] = list(required)
    if not extra:
        schema["additionalProperties"] = False
    return schema


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def json_body(schema: Schema) -> dict[str, Schema]:
    return {"application/json": schema}


def sse(event: Schema, done: str | None = None) -> dict[str, Schema]:
    """A `text/event-stream` of `data:{json}` events matching `event`; `done` is a final non-JSON marker."""
    data: Schema = {"type": "string", "contentMediaType": "application/json", "contentSchema": event}
    if done is not None:
        data = {"anyOf": [{"const": done}, data]}
    return {"text/event-stream": obj({"data": data})}


def openapi_path(path: str) -> str:
    """Starlette's `{name:converter}` -> OpenAPI's `{name}`."""
    return _PARAM.sub(lambda m: "{" + m.group(1) + "}", path)


def _operation_id(spec: RouteSpec) -> str:
    words = re.sub(r"[^a-zA-Z0-9]+", "_", openapi_path(spec.path)).strip("_") or "root"
    return f"{spec.method.lower()}_{words}"


def _operation(spec: RouteSpec, doc: RouteDoc, boundary: bool, secured: bool) -> dict[str, Any]:
    params: list[dict[str, Any]] = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                                    for n in _PARAM.findall(spec.path)]
    params += [{"name": h, "in": "header", "required": False, "schema": s} for h, s in doc.headers.items()]
    responses: dict[str, Any] = {}
    for status, content in sorted(doc.responses.items()):
        responses[str(status)] = {"description": HTTPStatus(status).phrase,
                                  "content": {mt: {"schema": s} for mt, s in content.items()}}
    guarded = secured and spec.access != "public"
    auth = (401, 403) if guarded and spec.access == "admin" else (401,) if guarded else ()
    for status in sorted({*doc.errors, *auth, *((500,) if boundary else ())}):
        if str(status) not in responses:
            responses[str(status)] = {"description": HTTPStatus(status).phrase,
                                      "content": json_body_content(doc.error or PLAIN_ERROR)}
    op: dict[str, Any] = {"operationId": _operation_id(spec), "summary": doc.summary, "tags": [doc.tag]}
    if doc.description:
        op["description"] = doc.description
    if guarded:
        op["security"] = [{"bearer": []}, {"apiKey": []}]
    if params:
        op["parameters"] = params
    if doc.request is not None:
        op["requestBody"] = {"required": doc.body_required,
                             "content": {mt: {"schema": s} for mt, s in doc.request.items()}}
    op["responses"] = responses
    return op


def json_body_content(schema: Schema) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def undocumented(specs: Iterable[RouteSpec]) -> list[str]:
    """'METHOD path' of every route without a `doc` (tests require none)."""
    return [f"{s.method} {s.path}" for s in specs if s.doc is None]


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """One operation for a path several kinds answer: summaries joined, bodies and responses united."""
    out = {**a, "summary": f"{a['summary']} | {b['summary']}"}
    if "requestBody" in b:
        body = out.setdefault("requestBody", {"required": b["requestBody"]["required"], "content": {}})
        out["requestBody"] = {**body, "content": {**b["requestBody"]["content"], **body["content"]}}
    responses = dict(a["responses"])
    for status, resp in b["responses"].items():
        if status in responses and "content" in resp:
            responses[status] = {**responses[status], "content": {**resp["content"],
                                                                  **responses[status].get("content", {})}}
        else:
            responses.setdefault(status, resp)
    out["responses"] = responses
    return out


def openapi_document(specs: Iterable[RouteSpec], unwrapped: Iterable[RouteSpec] = (), title: str = "Tandem",
                     secured: bool = False) -> dict[str, Any]:
    """The OpenAPI 3.1 document of these routes; `unwrapped` ones are outside the error boundary.

    `secured` (API keys configured): routes not "public" declare the key schemes and their 401 (403 on admin).

    Routes without a `doc` are left out (see `undocumented`).
    """
    paths: dict[str, dict[str, Any]] = {}
    tags: set[str] = set()
    for boundary, group in ((True, specs), (False, unwrapped)):
        for spec in group:
            if spec.doc is None:
                continue
            tags.add(spec.doc.tag)
            ops = paths.setdefault(openapi_path(spec.path), {})
            op = _operation(spec, spec.doc, boundary, secured)
            method = spec.method.lower()
            ops[method] = _merge(ops[method], op) if method in ops else op
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": __version__,
                 "description": "Tandem model server: KServe v2, TorchServe/SageMaker, TGI and OpenAI APIs."},
        "tags": [{"name": t} for t in sorted(tags)], "paths": paths}
    if secured:
        doc["components"] = {"securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}}}
    return doc
