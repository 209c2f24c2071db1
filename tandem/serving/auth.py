"""API keys on a front's routes: who may call what (README "Auth").

    access   "public"  health probes: no key
             "user"    the default: `--api-key` (or the admin key)
             "admin"   mutating routes (adapter load/unload, repository load/unload): `--admin-key`,
                       or the API key when no admin key is configured

A key is sent as `Authorization: Bearer KEY` (OpenAI's convention; the openai client does it) or
`x-api-key: KEY`, and compared in constant time. No key or a wrong one is 401 (with
`WWW-Authenticate: Bearer`), the API key on an admin route 403, each in the route's error shape
(`app.py` raises the errors inside its boundary). Keys never appear in messages or logs.
"""

from __future__ import annotations

import hmac

from starlette.requests import Request as HTTPRequest

from tandem.config import ServerConfig
from tandem.errors import Forbidden, Unauthorized
from tandem.serving.kinds import Access

__all__ = ["MISSING_KEY", "Auth"]

MISSING_KEY = "missing API key: send Authorization: Bearer <key> or x-api-key"
WRONG_KEY = ("invalid API key: send the key the server was started with (--api-key / TANDEM_API_KEY) as "
             "Authorization: Bearer <key> or x-api-key")
NEEDS_ADMIN = ("this route changes the server and needs the admin key (--admin-key / TANDEM_ADMIN_KEY); "
               "the API key is not enough")


def _presented(request: HTTPRequest) -> bytes | None:
    """The key a request carries, as the bytes on the wire (Starlette decodes headers as latin-1)."""
    headers = request.headers
    authorization = headers.get("authorization")
    if authorization is not None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip().encode("latin-1")
    key = headers.get("x-api-key")
    if key is not None and key.strip():
        return key.strip().encode("latin-1")
    return None


def _matches(given: bytes, key: bytes | None) -> bool:
    return key is not None and hmac.compare_digest(given, key)


class Auth:
    """The keys of one server; `check` raises what a request without the right one gets."""

    __slots__ = ("_admin", "_api")

    def __init__(self, api_key: str | None = None, admin_key: str | None = None) -> None:
        self._api = api_key.encode() if api_key else None
        self._admin = admin_key.encode() if admin_key else None

    @classmethod
    def from_server(cls, server: ServerConfig) -> Auth:
        return cls(server.api_key.get_secret_value() if server.api_key else None,
                   server.admin_key.get_secret_value() if server.admin_key else None)

    def __repr__(self) -> str:  # never the keys themselves
        return f"Auth(api_key={'set' if self._api else None}, admin_key={'set' if self._admin else None})"

    @property
    def enabled(self) -> bool:
        return self._api is not None or self._admin is not None

    def access_of(self, request: HTTPRequest) -> Access | None:
        """The most `request`'s key allows: "admin", "user", or None (it may call public routes only)."""
        for access in ("admin", "user"):
            try:
                self.check(request, access)  # type: ignore[arg-type]
            except (Unauthorized, Forbidden):
                continue
            return access  # type: ignore[return-value]
        return None

    def check(self, request: HTTPRequest, access: Access) -> None:
        """Return if `request` may call a route of `access`; else raise Unauthorized (401) or Forbidden (403)."""
        if access == "public" or not self.enabled:
            return
        if access == "user":
            if self._api is None:  # only an admin key configured: user routes are open
                return
            given = _presented(request)
            if given is None:
                raise Unauthorized(MISSING_KEY)
            ok_api, ok_admin = _matches(given, self._api), _matches(given, self._admin)
            if not (ok_api or ok_admin):
                raise Unauthorized(WRONG_KEY)
            return
        given = _presented(request)  # admin
        if given is None:
            raise Unauthorized(MISSING_KEY)
        if self._admin is None:  # no admin key: the API key guards admin routes too
            if not _matches(given, self._api):
                raise Unauthorized(WRONG_KEY)
            return
        ok_admin, ok_api = _matches(given, self._admin), _matches(given, self._api)
        if ok_admin:
            return
        raise Forbidden(NEEDS_ADMIN) if ok_api else Unauthorized(WRONG_KEY)
