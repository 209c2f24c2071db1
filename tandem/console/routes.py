"""Routes of the console: its page and assets, and who the caller is.

    GET /                        the console (index.html)
    GET /console/{file}          its assets: only files packaged under static/ (no other path is read)
    GET /tandem/v1/session       {"auth": keys configured?, "access": "admin" | "user" | null}

The page and assets are public: they hold no data (see the package docstring). Every response
carries a Content-Security-Policy that allows only this origin's scripts and styles, so model
output the page shows can never run as script even if a bug put it into markup.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from tandem.errors import ModelNotFound
from tandem.serving.auth import Auth
from tandem.serving.bodies import json_response
from tandem.serving.kinds import RouteDoc, RouteSpec
from tandem.serving.openapi import json_body, obj

__all__ = ["SECURITY_HEADERS", "console_routes", "static_files"]

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
          ".json": "application/json", ".txt": "text/plain; charset=utf-8"}
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                                "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@cache
def static_files() -> dict[str, tuple[bytes, str]]:
    """Every packaged asset: its path under static/ -> (bytes, content type). Read once."""
    root = resources.files("tandem.console") / "static"
    out: dict[str, tuple[bytes, str]] = {}

    def walk(node: Any, prefix: str) -> None:
        for child in node.iterdir():
            name = f"{prefix}{child.name}"
            if child.is_dir():
                walk(child, name + "/")
            elif (suffix := "." + child.name.rsplit(".", 1)[-1]) in _TYPES:
                out[name] = (child.read_bytes(), _TYPES[suffix])

    walk(root, "")
    return out


def _file(name: str) -> Response:
    found = static_files().get(name)
    if found is None:
        raise ModelNotFound(f"no console file {name!r}")
    body, ctype = found
    return Response(body, media_type=ctype, headers=SECURITY_HEADERS)


def console_routes(auth: Auth) -> list[RouteSpec]:
    """The console's routes for a server whose keys are `auth`."""

    async def index(r: HTTPRequest) -> Response:
        return _file("index.html")

    async def asset(r: HTTPRequest) -> Response:
        return _file(str(r.path_params["file"]))

    async def session(r: HTTPRequest) -> Response:
        return json_response({"auth": auth.enabled, "access": auth.access_of(r)})

    html = {200: {"text/html": {"type": "string"}}}
    return [
        RouteSpec("/", "GET", "console", index, access="public", doc=RouteDoc("The web console", "console",
                                                                              responses=html)),
        RouteSpec("/console/{file:path}", "GET", "console", asset, access="public", doc=RouteDoc(
            "A file of the console (scripts, styles)", "console", responses={200: {"*/*": {"type": "string"}}},
            errors=(404,))),
        RouteSpec("/tandem/v1/session", "GET", "session", session, access="public", doc=RouteDoc(
            "Whether the server checks keys, and what the key sent (if any) may call", "console",
            responses={200: json_body(obj({"auth": {"type": "boolean"},
                                           "access": {"enum": ["admin", "user", None]}}))})),
    ]
