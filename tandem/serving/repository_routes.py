"""Triton's model-repository extension over HTTP, so tritonclient's repository calls work unmodified.

    POST /v2/repository/index                      [{"name", "version", "state", "reason"}]
    POST /v2/repository/models/{model}/load        (re)load every version of the model: roll-over
    POST /v2/repository/models/{model}/unload      retire every version of the model
    GET  /tandem/v1/models                         Tandem's own: the index plus each served version's
                                                   kind, replicas (device, pid, memory) and card

The supervisor does the work (`live_repo.py`); a load answers once the new version serves.
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from tandem.errors import Conflict, InvalidInput
from tandem.serving.bodies import json_object, json_response, read_limited
from tandem.serving.kinds import FrontState, RepoControl, RouteDoc, RouteSpec
from tandem.serving.messages import ModelStatus
from tandem.serving.openapi import json_body, obj

__all__ = ["repository_routes"]

_MAX_BODY = 64 * 1024


async def _options(r: HTTPRequest) -> dict[str, Any]:
    """Triton's optional body: `{"parameters": {...}}`; Tandem reads no parameter, but checks the shape."""
    body = await read_limited(r, _MAX_BODY, "repository requests")
    if not body.strip():
        return {}
    data = json_object(body)
    params = data.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidInput("parameters must be an object")
    unknown = sorted(set(params) - {"unload_dependents"})
    if unknown:
        raise InvalidInput(f"repository parameters {unknown} are not supported (fix: send no parameters)")
    return data


_OPTIONS = json_body(obj(optional={"parameters": {"type": "object",
                                                  "properties": {"unload_dependents": {"type": "boolean"}},
                                                  "additionalProperties": False}}))
_DONE = {200: json_body(obj(extra=False))}
_DOCS = {
    "index": RouteDoc("Triton repository index: every model version and its state", "repository",
                      request=_OPTIONS, body_required=False, errors=(400, 409, 413, 503, 504),
                      responses={200: json_body({"type": "array", "items": obj(
                          {"name": {"type": "string"}, "version": {"type": "string"},
                           "state": {"type": "string"}, "reason": {"type": "string"}})})}),
    "load": RouteDoc("Triton repository load: (re)load every version of the model (roll-over)", "repository",
                     request=_OPTIONS, body_required=False, responses=_DONE, errors=(400, 404, 409, 413, 503, 504)),
    "unload": RouteDoc("Triton repository unload: retire every version of the model", "repository",
                       request=_OPTIONS, body_required=False, responses=_DONE, errors=(400, 404, 409, 413, 503, 504)),
}


_REPLICA = obj({"replica": {"type": "integer"}, "device": {"type": "string"}, "pid": {"type": "integer"},
                "ready": {"type": "boolean"}, "restarts": {"type": "integer"}, "rss_bytes": {"type": "integer"}})
_STATUS = obj({"name": {"type": "string"}, "version": {"type": "string"}, "kind": {"type": "string"},
               "state": {"enum": ["READY", "UNAVAILABLE"]}, "reason": {"type": "string"},
               "instances": {"type": "integer"}, "memory_limit": {"type": "integer"},
               "card": {"type": "object"}, "replicas": {"type": "array", "items": _REPLICA}})
_DOCS["status"] = RouteDoc("Every model version with its kind, replicas, memory and card (what a console shows)",
                           "repository", responses={200: json_body(obj({"models": {"type": "array",
                                                                                    "items": _STATUS}}))},
                           errors=(409, 503, 504))


def status_json(models: list[ModelStatus]) -> dict[str, Any]:
    """`GET /tandem/v1/models`'s body."""
    return {"models": [{f: getattr(m, f) for f in m.__struct_fields__ if f != "replicas"}
                       | {"replicas": [msgspec.structs.asdict(r) for r in m.replicas]} for m in models]}


def repository_routes(state: FrontState) -> list[RouteSpec]:
    """The three repository routes; `load`/`unload` mutate (admin) and answer once done."""

    def control() -> RepoControl:
        if state.repository is None:
            raise Conflict("the model repository is not connected yet; retry shortly")
        return state.repository

    async def index(r: HTTPRequest) -> Response:
        await _options(r)
        models = await control().repo_op("index")
        return json_response([{"name": m.name, "version": m.version, "state": m.state, "reason": m.reason}
                              for m in models])

    async def load(r: HTTPRequest) -> Response:
        await _options(r)
        await control().repo_op("load", r.path_params["model"])
        return json_response({})

    async def unload(r: HTTPRequest) -> Response:
        await _options(r)
        await control().repo_op("unload", r.path_params["model"])
        return json_response({})

    async def status(r: HTTPRequest) -> Response:
        return json_response(status_json(await control().repo_op("status")))

    def model_of(r: HTTPRequest) -> str:
        return str(r.path_params.get("model", ""))

    return [RouteSpec("/v2/repository/index", "POST", "repository_index", index, doc=_DOCS["index"]),
            RouteSpec("/v2/repository/models/{model}/load", "POST", "repository_load", load, model_of=model_of,
                      access="admin", doc=_DOCS["load"]),
            RouteSpec("/v2/repository/models/{model}/unload", "POST", "repository_unload", unload,
                      model_of=model_of, access="admin", doc=_DOCS["unload"]),
            RouteSpec("/tandem/v1/models", "GET", "repository_status", status, doc=_DOCS["status"])]
