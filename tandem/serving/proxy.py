"""HTTP entry of a front process: routes, model lookup, pre/post-processing, errors, metrics.

Endpoints (every error is JSON `{"error": ...}` with the status of its `TandemError`):

    KServe v2 / Open Inference Protocol    /v2, /v2/health/{live,ready}, /v2/models/{m}[/versions/{v}]
                                           [/ready | /infer]  (JSON and Triton binary tensors)
    TorchServe / DJL                       POST /predictions/{m}[/{v}]   body goes to preprocess as is
    SageMaker hosting                      GET /ping, POST /invocations  (the default model)
    TGI (LLM entries)                      POST /generate, /generate_stream, /; GET /info, /health
    OpenAI (LLM entries)                   POST /v1/completions, /v1/chat/completions,
                                           /v1/load_lora_adapter, /v1/unload_lora_adapter; GET /v1/models
    Prometheus                             GET /metrics
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response
from starlette.routing import Route

from tandem import __version__
from tandem.errors import InvalidInput, ModelNotFound, PayloadTooLarge, TandemError
from tandem.model import Model, Request
from tandem.serving.bodies import json_response, read_limited
from tandem.serving.dispatch import Dispatcher, ModelState
from tandem.serving.metrics import metrics, render
from tandem.serving.protocols import v2
from tandem.serving.protocols.llm_common import LLMDirectory, error_kind, openai_error, tgi_error
from tandem.serving.protocols.openai import openai_routes
from tandem.serving.protocols.tgi import tgi_routes

__all__ = ["Front", "build_app"]

logger = logging.getLogger(__name__)
Handler = Callable[[HTTPRequest], Awaitable[Response]]


_json = json_response


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


def _version_key(v: str) -> tuple[int, Any]:
    return (0, int(v)) if v.isdigit() else (1, v)


class Front:
    """Everything a front process needs to answer requests: models, their Python objects, dispatch."""

    def __init__(self, models: dict[str, Model], default_model: str | None) -> None:
        self.objects = models  # key -> user Model (setup_cpu done)
        self.default_model = default_model
        self.by_name: dict[str, dict[str, ModelState]] = {}
        self.llms = LLMDirectory()
        self.metrics = metrics()

    def attach(self, dispatcher: Dispatcher) -> None:
        """Connect to the replicas (inside the running event loop, at server start)."""
        self.dispatcher = dispatcher
        for state in dispatcher.models.values():
            self.by_name.setdefault(state.entry.config.name, {})[state.entry.config.version] = state
        self.default_model = self.default_model or next(iter(self.by_name), None)
        self.llms.set_clients(list(dispatcher.llms.values()))

    def lookup(self, name: str, version: str | None) -> ModelState:
        versions = self.by_name.get(name)
        if versions is None:
            raise ModelNotFound(f"unknown model {name!r}; served: {sorted(self.by_name)}")
        if version is None:
            return versions[max(versions, key=_version_key)]
        if version not in versions:
            raise ModelNotFound(f"model {name!r} has no version {version!r}; versions: {sorted(versions)}")
        return versions[version]

    async def read_body(self, request: HTTPRequest, state: ModelState) -> bytes:
        return await read_limited(request, state.entry.config.max_request_bytes, state.entry.key)

    # -- /predictions and /invocations: the user's preprocess -> predict -> postprocess ----------
    async def predictions(self, state: ModelState, http: HTTPRequest) -> Response:
        body = await self.read_body(http, state)
        ctype = http.headers.get("content-type", "")
        req = Request(body=body, content_type=ctype, headers=dict(http.headers))
        if "json" in ctype or (not ctype and body[:1] in (b"{", b"[")):
            try:
                req.json = orjson.loads(body)
            except orjson.JSONDecodeError as e:
                raise InvalidInput(f"malformed JSON body: {e}") from None
        model = self.objects[state.entry.key]
        name = state.entry.config.name
        t0 = time.perf_counter()
        state.preprocessing += 1
        try:
            arrays = model.preprocess(req)
        finally:
            state.preprocessing -= 1
        self.metrics.preprocess_time.labels(name).observe(time.perf_counter() - t0)
        batched, length = self.check_inputs(state, arrays, batched=False)
        outputs = await self.dispatcher.infer(state, batched, 1, length)
        t1 = time.perf_counter()
        response = model.postprocess({k: v[0] for k, v in outputs.items()}, req)
        self.metrics.postprocess_time.labels(name).observe(time.perf_counter() - t1)
        if isinstance(response, Response):
            return response
        if isinstance(response, bytes | bytearray):
            return Response(bytes(response), media_type="application/octet-stream")
        return _json(response)

    def check_inputs(self, state: ModelState, arrays: Any, *,
                     batched: bool) -> tuple[dict[str, np.ndarray], int]:
        """Validate arrays against the input signature; returns [rows, ...] arrays and the length."""
        entry = state.entry
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

    # -- KServe v2 ---------------------------------------------------------------------------------
    async def v2_infer(self, state: ModelState, http: HTTPRequest) -> Response:
        body = await self.read_body(http, state)
        hlen = v2.parse_header_length(http.headers.get(v2.HEADER_LENGTH_HEADER))
        req = v2.parse_infer_request(body, hlen)
        arrays, length = self.check_inputs(state, {i.name: i.array for i in req.inputs}, batched=True)
        rows = next(iter(arrays.values())).shape[0]
        outputs = await self.dispatcher.infer(state, arrays, rows, length)
        known = {s.name for s in state.entry.outputs}
        for r in req.outputs or []:
            if r.name not in known:
                raise InvalidInput(f"model {state.entry.key} has no output {r.name!r}; outputs: {sorted(known)}")
        payload, headers = v2.encode_infer_response(
            state.entry.config.name, state.entry.config.version, req.id, outputs, req.outputs,
            req.binary_outputs_default)
        return Response(payload, headers=headers)

    def v2_metadata(self, state: ModelState) -> dict[str, Any]:
        versions = sorted(self.by_name[state.entry.config.name], key=_version_key)
        return v2.model_metadata(state.entry.config.name, versions, state.entry.platform,
                                 list(state.entry.inputs), list(state.entry.outputs))


def _route(front: Front, endpoint: str, fn: Callable[[HTTPRequest], Awaitable[Response]]) -> Handler:
    """Wrap a handler: map TandemErrors to JSON statuses, record metrics and in-flight."""
    m = front.metrics

    llm_api = endpoint.startswith(("tgi_", "openai_"))
    shape = openai_error if endpoint.startswith("openai_") else tgi_error

    async def handler(request: HTTPRequest) -> Response:
        t0 = time.perf_counter()
        if llm_api:
            model = front.llms.clients[0].name if front.llms.clients else "_unknown"
        else:
            model = request.path_params.get("model", front.default_model or "")
            if model not in front.by_name:
                model = "_unknown"  # never let clients mint metric labels (unbounded memory)
        m.in_flight.labels(model).inc()
        try:
            response = await fn(request)
        except TandemError as e:
            response = _json(shape(e.status, str(e), error_kind(e)), e.status) if llm_api else _error(e.status, str(e))
        except Exception as e:  # one boundary per process: log and answer 500, keep serving
            logger.exception("unhandled error on %s", request.url.path)
            response = _error(500, f"{type(e).__name__}: {e}")
        finally:
            m.in_flight.labels(model).dec()
        status = response.status_code
        m.requests.labels(model, endpoint, str(status)).inc()
        if status >= 400:
            m.failures.labels(model, str(status)).inc()
        m.latency.labels(model).observe(time.perf_counter() - t0)
        return response

    return handler


class _Handlers:
    """The route handlers of one front, each `HTTPRequest -> Response`."""

    def __init__(self, front: Front) -> None:
        self.front = front

    def state_of(self, r: HTTPRequest) -> ModelState:
        return self.front.lookup(r.path_params["model"], r.path_params.get("version"))

    async def predictions(self, r: HTTPRequest) -> Response:
        return await self.front.predictions(self.state_of(r), r)

    async def invocations(self, r: HTTPRequest) -> Response:
        if self.front.default_model is None:
            raise ModelNotFound("no default model configured")
        return await self.front.predictions(self.front.lookup(self.front.default_model, None), r)

    async def infer(self, r: HTTPRequest) -> Response:
        return await self.front.v2_infer(self.state_of(r), r)

    async def model_meta(self, r: HTTPRequest) -> Response:
        return _json(self.front.v2_metadata(self.state_of(r)))

    async def model_ready(self, r: HTTPRequest) -> Response:
        state = self.state_of(r)
        return _json({"name": state.entry.config.name, "ready": state.ready}, 200 if state.ready else 503)

    async def server_ready(self, r: HTTPRequest) -> Response:
        ok = self.front.dispatcher.all_ready()
        return _json({"ready": ok}, 200 if ok else 503)

    async def live(self, r: HTTPRequest) -> Response:
        return _json({"live": True})

    async def server_meta(self, r: HTTPRequest) -> Response:
        return _json(v2.server_metadata(__version__))

    async def metrics(self, r: HTTPRequest) -> Response:
        body, ctype = render()
        return Response(body, media_type=ctype)


async def _not_found(request: HTTPRequest, exc: Exception) -> Response:
    return _error(404, f"no route {request.method} {request.url.path}")


async def _bad_method(request: HTTPRequest, exc: Exception) -> Response:
    return _error(405, f"method {request.method} not allowed on {request.url.path}")


def build_app(front: Front, lifespan: Any = None) -> Starlette:
    """The Starlette application of one front process."""
    h = _Handlers(front)
    v2m, v2v = "/v2/models/{model}", "/v2/models/{model}/versions/{version}"
    table: list[tuple[str, Handler, str, str]] = [
        ("/v2", h.server_meta, "GET", "v2_meta"),
        ("/v2/health/live", h.live, "GET", "live"),
        ("/v2/health/ready", h.server_ready, "GET", "ready"),
        (v2m, h.model_meta, "GET", "v2_model"),
        (v2v, h.model_meta, "GET", "v2_model"),
        (v2m + "/ready", h.model_ready, "GET", "v2_ready"),
        (v2v + "/ready", h.model_ready, "GET", "v2_ready"),
        (v2m + "/infer", h.infer, "POST", "v2_infer"),
        (v2v + "/infer", h.infer, "POST", "v2_infer"),
        ("/predictions/{model}", h.predictions, "POST", "predictions"),
        ("/predictions/{model}/{version}", h.predictions, "POST", "predictions"),
        ("/ping", h.server_ready, "GET", "ping"),
        ("/invocations", h.invocations, "POST", "invocations"),
    ]
    table += tgi_routes(front.llms) + openai_routes(front.llms)
    routes = [Route(path, _route(front, name, fn), methods=[method]) for path, fn, method, name in table]
    routes.append(Route("/metrics", h.metrics, methods=["GET"]))
    app = Starlette(routes=routes, lifespan=lifespan)
    app.add_exception_handler(404, _not_found)
    app.add_exception_handler(405, _bad_method)
    return app
