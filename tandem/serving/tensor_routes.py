"""HTTP routes of tensor models: KServe v2, TorchServe/DJL `/predictions` and SageMaker `/invocations`.

    KServe v2 / Open Inference Protocol    /v2, /v2/models/{m}[/versions/{v}][/ready | /infer]
                                           (JSON and Triton binary tensors)
    TorchServe / DJL                       POST /predictions/{m}[/{v}]   body goes to preprocess as is
    SageMaker hosting                      POST /invocations  (the default model)

`/predictions` and `/invocations` run the user's preprocess -> predict -> postprocess in this front;
v2 `infer` sends tensors straight to predict.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import orjson
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from tandem import __version__
from tandem.errors import InvalidInput, ModelNotFound, PayloadTooLarge
from tandem.model import V2_TO_NUMPY, Request
from tandem.serving.bodies import json_response, read_limited
from tandem.serving.kinds import FrontState, RouteDoc, RouteSpec, Schema
from tandem.serving.metrics import metrics
from tandem.serving.openapi import ANY_JSON, BINARY, json_body, obj
from tandem.serving.protocols import v2
from tandem.serving.rows import infer_request_level
from tandem.serving.tensor_client import TensorClient

__all__ = ["TensorRoutes", "check_inputs", "tensor_routes"]


def _version_key(v: str) -> tuple[int, Any]:
    return (0, int(v)) if v.isdigit() else (1, v)


def check_inputs(client: TensorClient, arrays: Any, *, batched: bool) -> tuple[dict[str, np.ndarray], int]:
    """Validate arrays against the input signature; returns [rows, ...] arrays and the length."""
    entry = client.entry
    if not isinstance(arrays, dict):
        raise TypeError(f"preprocess of {entry.key} must return a dict of numpy arrays")
    missing = [s.name for s in entry.inputs if s.name not in arrays]
    extra = sorted(set(arrays) - {s.name for s in entry.inputs})
    if missing or extra:
        raise InvalidInput(f"model {entry.key} expects inputs {[s.name for s in entry.inputs]}; "
                           f"missing {missing}, unexpected {extra}")
    out: dict[str, np.ndarray] = {}
    length = 0
    for spec in entry.inputs:
        arr = np.asarray(arrays[spec.name])
        problem = spec.check(arr, batched=batched)
        if problem:
            raise InvalidInput(problem)
        out[spec.name] = arr if batched else arr[None]
        var = [d for d, want in zip(out[spec.name].shape[1:], spec.shape) if want == -1]
        length = max(length, *var) if var else length
    rows = {a.shape[0] for a in out.values()}
    if len(rows) != 1:
        raise InvalidInput(f"inputs of {entry.key} disagree on the batch size: {sorted(rows)}")
    if next(iter(rows)) > entry.max_request_rows:
        raise PayloadTooLarge(f"{next(iter(rows))} rows in one request; {entry.key} takes at most "
                              f"{entry.max_request_rows} (max_request_rows in tandem.yaml)")
    return out, length


class TensorRoutes:
    """The tensor-model handlers of one front, each `HTTPRequest -> Response`."""

    def __init__(self, state: FrontState) -> None:
        self.state = state
        self.metrics = metrics()

    def versions(self, name: str) -> dict[str, TensorClient]:
        return {c.entry.config.version: c for c in self.state.of_kind("model") if c.name == name}

    def lookup(self, name: str, version: str | None) -> TensorClient:
        versions = self.versions(name)
        if not versions:
            served = sorted({c.name for c in self.state.of_kind("model")})
            raise ModelNotFound(f"unknown model {name!r}; served: {served}")
        if version is None:
            return versions[max(versions, key=_version_key)]
        if version not in versions:
            raise ModelNotFound(f"model {name!r} has no version {version!r}; versions: {sorted(versions)}")
        return versions[version]

    def client_of(self, r: HTTPRequest) -> TensorClient:
        return self.lookup(r.path_params["model"], r.path_params.get("version"))

    async def read_body(self, request: HTTPRequest, client: TensorClient) -> bytes:
        """The body, bounded; 503 before reading it when the model could not take the request now."""
        client.admit()
        return await read_limited(request, client.entry.config.max_request_bytes, client.key)

    # -- /predictions and /invocations: the user's preprocess -> predict -> postprocess ----------
    async def run_predictions(self, client: TensorClient, http: HTTPRequest) -> Response:
        body = await self.read_body(http, client)
        ctype = http.headers.get("content-type", "")
        req = Request(body=body, content_type=ctype, headers=dict(http.headers))
        if "json" in ctype or (not ctype and body[:1] in (b"{", b"[")):
            try:
                req.json = orjson.loads(body)
            except orjson.JSONDecodeError as e:
                raise InvalidInput(f"malformed JSON body: {e}") from None
        arrays = client.preprocess(req)
        batched, length = check_inputs(client, arrays, batched=False)
        outputs = await client.infer(batched, 1, length)
        t1 = time.perf_counter()
        response = client.model.postprocess({k: v[0] for k, v in outputs.items()}, req)
        self.metrics.postprocess_time.labels(client.name).observe(time.perf_counter() - t1)
        if isinstance(response, Response):
            return response
        if isinstance(response, bytes | bytearray):
            return Response(bytes(response), media_type="application/octet-stream")
        return json_response(response)

    async def predictions(self, r: HTTPRequest) -> Response:
        with self.client_of(r).use() as client:
            return await self.run_predictions(client, r)

    def default_model(self) -> str:
        """--default-model, else the first tensor model served."""
        if self.state.default_model:
            return self.state.default_model
        first = next(iter(self.state.of_kind("model")), None)
        if first is None:
            raise ModelNotFound("no default model configured (fix: serve a model, or pass --default-model)")
        return str(first.name)

    async def invocations(self, r: HTTPRequest) -> Response:
        with self.lookup(self.default_model(), None).use() as client:
            return await self.run_predictions(client, r)

    # -- KServe v2 ---------------------------------------------------------------------------------
    async def infer(self, r: HTTPRequest) -> Response:
        with self.client_of(r).use() as client:
            return await self.run_infer(client, r)

    async def run_infer(self, client: TensorClient, r: HTTPRequest) -> Response:
        body = await self.read_body(r, client)
        hlen = v2.parse_header_length(r.headers.get(v2.HEADER_LENGTH_HEADER))
        req = v2.parse_infer_request(body, hlen)
        if client.model.request_inputs and not {i.name for i in req.inputs} <= {s.name for s in client.entry.inputs}:
            return await infer_request_level(client, req)  # names of the request-level signature (rows.py)
        arrays, length = check_inputs(client, {i.name: i.array for i in req.inputs}, batched=True)
        rows = next(iter(arrays.values())).shape[0]
        known = {s.name for s in client.entry.outputs}
        for o in req.outputs or []:
            if o.name not in known:
                raise InvalidInput(f"model {client.key} has no output {o.name!r}; outputs: {sorted(known)}")
        outputs = await client.infer(arrays, rows, length)
        payload, headers = v2.encode_infer_response(
            client.name, client.entry.config.version, req.id, outputs, req.outputs, req.binary_outputs_default)
        return Response(payload, headers=headers)

    async def model_meta(self, r: HTTPRequest) -> Response:
        client = self.client_of(r)
        versions = sorted(self.versions(client.name), key=_version_key)
        return json_response(v2.model_metadata(client.name, versions, client.entry.platform,
                                               list(client.entry.inputs), list(client.entry.outputs),
                                               client.model.request_inputs, client.model.request_outputs))

    async def model_ready(self, r: HTTPRequest) -> Response:
        client = self.client_of(r)
        return json_response({"name": client.name, "ready": client.ready}, 200 if client.ready else 503)

    async def server_meta(self, r: HTTPRequest) -> Response:
        return json_response(v2.server_metadata(__version__))


def _path_model(r: HTTPRequest) -> str:
    return str(r.path_params.get("model", ""))


# -- OpenAPI schemas (the v2 spec's; inputs depend on the model, see GET /v2/models/{m}) -----------------------
_PARAMS: Schema = {"type": ["object", "null"]}
_TENSOR_DATA: Schema = {"type": "array", "description": "row-major, flat or nested (JSON tensors)"}
_V2_INPUT = obj({"name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                 "datatype": {"type": "string", "enum": list(V2_TO_NUMPY)}},
                {"parameters": _PARAMS, "data": _TENSOR_DATA})
_V2_REQUEST = obj({"inputs": {"type": "array", "items": _V2_INPUT}},
                  {"id": {"type": ["string", "null"]}, "parameters": _PARAMS,
                   "outputs": {"type": ["array", "null"], "items": obj({"name": {"type": "string"}},
                                                                        {"parameters": _PARAMS})}})
_V2_OUTPUT = obj({"name": {"type": "string"}, "datatype": {"type": "string"},
                  "shape": {"type": "array", "items": {"type": "integer"}}},
                 {"data": _TENSOR_DATA, "parameters": obj(optional={"binary_data_size": {"type": "integer"}})})
_V2_RESPONSE = obj({"model_name": {"type": "string"}, "outputs": {"type": "array", "items": _V2_OUTPUT}},
                   {"model_version": {"type": "string"}, "id": {"type": "string"}})
_TENSOR_META = obj({"name": {"type": "string"}, "datatype": {"type": "string"},
                    "shape": {"type": "array", "items": {"type": "integer"}}})
_MODEL_META = obj({"name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
                   "platform": {"type": "string"}, "inputs": {"type": "array", "items": _TENSOR_META},
                   "outputs": {"type": "array", "items": _TENSOR_META}})
_SERVER_META = obj({"name": {"type": "string"}, "version": {"type": "string"},
                    "extensions": {"type": "array", "items": {"type": "string"}}})
_MODEL_READY = json_body(obj({"name": {"type": "string"}, "ready": {"type": "boolean"}}))
_BINARY_HEADER = {v2.HEADER_LENGTH_HEADER: {"type": "integer", "minimum": 0}}
# The user's preprocess reads the body as is; postprocess may answer JSON or bytes.
_MODEL_BODY = {"application/json": ANY_JSON, "application/octet-stream": BINARY, "image/jpeg": BINARY,
               "image/png": BINARY}
_MODEL_REPLY = {200: {"application/json": ANY_JSON, "application/octet-stream": BINARY}}
_RUN_ERRORS = (400, 404, 413, 503, 504)


def _docs() -> dict[str, RouteDoc]:
    """Each tensor route's OpenAPI description, by endpoint label."""
    infer_desc = (f"JSON, or Triton's binary extension: with the {v2.HEADER_LENGTH_HEADER} header the body is "
                  "that many bytes of JSON then the raw tensors (binary_data_size); binary outputs likewise.")
    return {
        "v2_meta": RouteDoc("KServe v2 server metadata", "kserve-v2", responses={200: json_body(_SERVER_META)}),
        "v2_model": RouteDoc("KServe v2 model metadata: its tensors' names, datatypes and shapes", "kserve-v2",
                             responses={200: json_body(_MODEL_META)}, errors=(404,)),
        "v2_ready": RouteDoc("KServe v2 model readiness", "kserve-v2",
                             responses={200: _MODEL_READY, 503: _MODEL_READY}, errors=(404,)),
        "v2_infer": RouteDoc("KServe v2 inference: tensors straight to predict", "kserve-v2",
                             request={"application/json": _V2_REQUEST, "application/octet-stream": BINARY},
                             responses={200: {"application/json": _V2_RESPONSE, "application/octet-stream": BINARY}},
                             errors=_RUN_ERRORS, headers=_BINARY_HEADER, description=infer_desc),
        "predictions": RouteDoc("TorchServe/DJL prediction: the body goes to the model's preprocess as is",
                                "torchserve", request=_MODEL_BODY, responses=_MODEL_REPLY, errors=_RUN_ERRORS),
        "invocations": RouteDoc("SageMaker invocation of the default model (--default-model, else the first)",
                                "sagemaker", request=_MODEL_BODY, responses=_MODEL_REPLY, errors=_RUN_ERRORS),
    }


def tensor_routes(state: FrontState) -> list[RouteSpec]:
    """The routes tensor models answer."""
    h = TensorRoutes(state)
    docs = _docs()

    def default_model(r: HTTPRequest) -> str:
        try:
            return h.default_model()
        except ModelNotFound:
            return ""

    v2m, v2v = "/v2/models/{model}", "/v2/models/{model}/versions/{version}"
    spec = [
        ("/v2", h.server_meta, "GET", "v2_meta", None),
        (v2m, h.model_meta, "GET", "v2_model", _path_model),
        (v2v, h.model_meta, "GET", "v2_model", _path_model),
        (v2m + "/ready", h.model_ready, "GET", "v2_ready", _path_model),
        (v2v + "/ready", h.model_ready, "GET", "v2_ready", _path_model),
        (v2m + "/infer", h.infer, "POST", "v2_infer", _path_model),
        (v2v + "/infer", h.infer, "POST", "v2_infer", _path_model),
        ("/predictions/{model}", h.predictions, "POST", "predictions", _path_model),
        ("/predictions/{model}/{version}", h.predictions, "POST", "predictions", _path_model),
        ("/invocations", h.invocations, "POST", "invocations", default_model),
    ]
    return [RouteSpec(path, method, endpoint, fn, model_of=label, doc=docs.get(endpoint))
            for path, fn, method, endpoint, label in spec]
