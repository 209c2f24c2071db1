"""HTTP entry of a front process: every kind's routes behind one error boundary, health and metrics.

    core        GET /v2/health/live, /v2/health/ready, /ping (ready), /metrics (Prometheus)
    each kind   its `RouteSpec`s (tensor models: v2, /predictions, /invocations; LLMs: TGI, OpenAI)

Every route is wrapped once: a `TandemError` becomes the route's error shape (plain `{"error": ...}`
unless the kind says otherwise), anything else is logged and becomes a 500 in the same shape, and
requests, failures, latency and in-flight are recorded under a model label the server knows (never
one a client made up). 503s and 429s carry `Retry-After` (the error's, else 1 s). With API keys
configured (`auth.py`), every route is checked against its `RouteSpec.access` first (default "user",
so a route nobody marked is protected): 401 with `WWW-Authenticate: Bearer`, or 403, in its shape.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response
from starlette.routing import Route

from tandem.errors import InternalError, ModelNotFound, Overloaded, TandemError, Unauthorized
from tandem.serving.auth import Auth
from tandem.serving.bodies import json_response
from tandem.serving.kinds import FrontState, Handler, Kinds, RouteDoc, RouteSpec
from tandem.serving.metrics import metrics, render
from tandem.serving.openapi import json_body, obj, openapi_document, undocumented

__all__ = ["build_app"]

logger = logging.getLogger(__name__)
UNKNOWN = "_unknown"


def _error_response(route: RouteSpec, e: TandemError) -> Response:
    status, body = route.shape(e)
    headers = None
    if isinstance(e, Overloaded):
        headers = {"Retry-After": str(max(1, math.ceil(e.retry_after)))}
    elif isinstance(e, Unauthorized):
        headers = {"WWW-Authenticate": "Bearer"}
    return json_response(body, status, headers)


def _guard(auth: Auth, route: RouteSpec, handler: Handler) -> Handler:
    """Only the key check, in the route's error shape (routes outside the metrics boundary)."""
    if route.access == "public" or not auth.enabled:
        return handler

    async def guarded(request: HTTPRequest) -> Response:
        try:
            auth.check(request, route.access)
        except TandemError as e:
            return _error_response(route, e)
        return await handler(request)

    return guarded


def _wrap(state: FrontState, route: RouteSpec, auth: Auth | None = None) -> Handler:
    """Check the key, map errors to the route's shape, record metrics and in-flight."""
    m = metrics()
    check = auth.check if auth is not None and auth.enabled and route.access != "public" else None

    async def handler(request: HTTPRequest) -> Response:
        t0 = time.perf_counter()
        model = route.model_of(request) if route.model_of is not None else ""
        if model not in state.names:
            model = UNKNOWN  # never let clients mint metric labels (unbounded memory)
        m.in_flight.labels(model).inc()
        try:
            if check is not None:
                check(request, route.access)
            response = await route.handler(request)
        except TandemError as e:
            response = _error_response(route, e)
        except Exception as e:  # one boundary per process: log and answer 500, keep serving
            logger.exception("unhandled error on %s", request.url.path)
            response = _error_response(route, InternalError(f"{type(e).__name__}: {e}"))
        finally:
            m.in_flight.labels(model).dec()
        status = response.status_code
        if status in (429, 503) and "retry-after" not in response.headers:
            response.headers["Retry-After"] = "1"  # every backpressure answer tells clients when to retry
        m.requests.labels(model, route.endpoint, str(status)).inc()
        if status >= 400:
            m.failures.labels(model, str(status)).inc()
        m.latency.labels(model).observe(time.perf_counter() - t0)
        return response

    return handler


def _routes(state: FrontState, specs: list[RouteSpec], auth: Auth) -> list[Route]:
    """One Starlette route per (path, method); a path several kinds answer goes to the one that claims it."""
    groups: dict[tuple[str, str], list[RouteSpec]] = {}
    for s in specs:
        groups.setdefault((s.path, s.method), []).append(s)
    routes = []
    for (path, method), group in groups.items():
        fallbacks = [s for s in group if s.claims is None]
        if len(fallbacks) > 1:
            raise ValueError(f"{method} {path} is added by {len(fallbacks)} routes without `claims`; at most one "
                             "may be the fallback")
        if len(group) == 1:
            routes.append(Route(path, _wrap(state, group[0], auth), methods=[method]))
            continue
        claimed = [(s.claims, _wrap(state, s, auth)) for s in group if s.claims is not None]
        fallback = _wrap(state, fallbacks[0], auth) if fallbacks else claimed[-1][1]
        routes.append(Route(path, _dispatch(claimed, fallback), methods=[method]))
    return routes


def _dispatch(claimed: list[tuple[Any, Handler]], fallback: Handler) -> Handler:
    async def handler(request: HTTPRequest) -> Response:
        for claims, h in claimed:
            if claims(request):
                return await h(request)
        return await fallback(request)

    return handler


def core_routes(state: FrontState) -> list[RouteSpec]:
    """Health that spans every kind."""

    async def ready(r: HTTPRequest) -> Response:
        ok = all(c.ready for c in state.clients.values())
        return json_response({"ready": ok}, 200 if ok else 503)

    async def live(r: HTTPRequest) -> Response:
        return json_response({"live": True})

    ready_body = json_body(obj({"ready": {"type": "boolean"}}))
    ready_doc = RouteDoc("Ready: every model has a live replica (503 until then)", "health",
                         responses={200: ready_body, 503: ready_body})
    return [RouteSpec("/v2/health/live", "GET", "live", live, access="public", doc=RouteDoc(
                "Liveness of this server", "health", responses={200: json_body(obj({"live": {"const": True}}))})),
            RouteSpec("/v2/health/ready", "GET", "ready", ready, access="public", doc=ready_doc),
            RouteSpec("/ping", "GET", "ping", ready, access="public", doc=RouteDoc(
                "SageMaker health check (same as /v2/health/ready)", "sagemaker",
                responses={200: ready_body, 503: ready_body}))]


async def _metrics(r: HTTPRequest) -> Response:
    body, ctype = render()
    return Response(body, media_type=ctype)


def _not_found_for(specs: list[RouteSpec]) -> Callable[[HTTPRequest, Exception], Awaitable[Response]]:
    """404 for an unmatched path; under a parameterised route (a model id its pattern cannot match,
    e.g. one with a newline) in that route's error shape, else in the plain one."""
    prefixes = sorted(((s.path.split("{", 1)[0], s) for s in specs if "{" in s.path), key=lambda p: -len(p[0]))

    async def not_found(request: HTTPRequest, exc: Exception) -> Response:
        message = f"no route {request.method} {request.url.path}"
        route = next((s for prefix, s in prefixes if request.url.path.startswith(prefix)), None)
        if route is None:
            return json_response({"error": message}, 404)
        return _error_response(route, ModelNotFound(message))

    return not_found


async def _bad_method(request: HTTPRequest, exc: Exception) -> Response:
    return json_response({"error": f"method {request.method} not allowed on {request.url.path}"}, 405)


def route_specs(state: FrontState, kinds: Kinds) -> list[RouteSpec]:
    """Every route of a front: the core's, then each kind's in registration order."""
    from tandem.serving.repository_routes import repository_routes

    specs = core_routes(state) + repository_routes(state)
    for kind in kinds.values():
        specs += kind.routes(state)
    return specs


def build_app(state: FrontState, kinds: Kinds, lifespan: Any = None, auth: Auth | None = None) -> Starlette:
    """The Starlette application of one front process; `auth` holds the API keys (none: no checks)."""
    from tandem.console.routes import console_routes

    auth = auth or Auth()
    specs = route_specs(state, kinds) + console_routes(auth)
    document: dict[str, Any] = {}

    async def openapi(r: HTTPRequest) -> Response:
        return json_response(document)

    specs.append(RouteSpec("/openapi.json", "GET", "openapi", openapi, doc=RouteDoc(
        "This OpenAPI 3.1 document", "meta", responses={200: json_body(obj({"openapi": {"type": "string"},
                                                                            "paths": {"type": "object"}}))})))
    unwrapped = [RouteSpec("/metrics", "GET", "metrics", _metrics, doc=RouteDoc(
        "Prometheus metrics aggregated across every process", "meta",
        responses={200: {"text/plain": {"type": "string"}}}))]
    document.update(openapi_document(specs, unwrapped, secured=auth.enabled))
    if missing := undocumented([*specs, *unwrapped]):
        logger.warning("routes missing from /openapi.json (no RouteSpec.doc): %s", ", ".join(missing))
    routes = _routes(state, specs, auth)
    routes += [Route(s.path, _guard(auth, s, s.handler), methods=[s.method]) for s in unwrapped]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.add_exception_handler(404, _not_found_for(specs))
    app.add_exception_handler(405, _bad_method)
    return app
