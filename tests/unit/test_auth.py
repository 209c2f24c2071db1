"""API keys and the bind-address rule (no server process: the app in-process, the config, the CLI)."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response
from starlette.testclient import TestClient

from tandem.config import ServerConfig, is_loopback
from tandem.errors import ConfigError, Overloaded
from tandem.llm.http.common import openai_error, tgi_error
from tandem.serving import app as app_module
from tandem.serving.app import build_app
from tandem.serving.auth import MISSING_KEY, Auth
from tandem.serving.bodies import json_response
from tandem.serving.kinds import FrontState, RouteSpec

KEY, ADMIN = "user-key-0123456789", "admin-key-0123456789"


class _Kind:
    """A kind whose routes cover every access level and error shape, plus backpressure answers."""

    name = "fake"

    def routes(self, state: FrontState) -> list[RouteSpec]:
        async def ok(r: HTTPRequest) -> Response:
            return json_response({"ok": True})

        async def overloaded(r: HTTPRequest) -> Response:
            raise Overloaded("queue full", retry_after=2.5)

        async def plain_503(r: HTTPRequest) -> Response:
            return json_response({"ready": False}, 503)

        return [RouteSpec("/user", "POST", "user", ok), RouteSpec("/admin", "POST", "admin", ok, access="admin"),
                RouteSpec("/public", "GET", "public", ok, access="public"),
                RouteSpec("/v1/thing", "POST", "oa", ok, shape=openai_error),
                RouteSpec("/tgi", "POST", "tgi", ok, shape=tgi_error),
                RouteSpec("/busy", "POST", "busy", overloaded, access="public"),
                RouteSpec("/not-ready", "GET", "nr", plain_503, access="public")]


def _client(auth: Auth) -> TestClient:
    return TestClient(build_app(FrontState(), {"fake": _Kind()}, auth=auth))  # type: ignore[dict-item]


@pytest.fixture(scope="module")
def client() -> TestClient:
    return _client(Auth(KEY, ADMIN))


def test_no_key_is_401_naming_the_headers(client: TestClient) -> None:
    r = client.post("/user")
    assert r.status_code == 401
    assert r.json() == {"error": MISSING_KEY}
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {KEY}"}, {"authorization": f"bearer {KEY}"},
                                     {"x-api-key": KEY}, {"Authorization": f"Bearer {ADMIN}"}])
def test_either_header_with_a_valid_key_passes(client: TestClient, headers: dict[str, str]) -> None:
    assert client.post("/user", headers=headers).status_code == 200


@pytest.mark.parametrize("headers", [{"Authorization": "Bearer " + "x" * len(KEY)}, {"x-api-key": KEY[:-1]},
                                     {"Authorization": f"Basic {KEY}"}, {"x-api-key": ""}])
def test_wrong_keys_are_401_and_never_echoed(client: TestClient, headers: dict[str, str]) -> None:
    r = client.post("/user", headers=headers)
    assert r.status_code == 401, headers
    assert KEY not in r.text and ADMIN not in r.text


def test_admin_routes_need_the_admin_key(client: TestClient) -> None:
    assert client.post("/admin").status_code == 401
    forbidden = client.post("/admin", headers={"x-api-key": KEY})
    assert forbidden.status_code == 403 and "admin key" in forbidden.json()["error"]
    assert client.post("/admin", headers={"x-api-key": "nope"}).status_code == 401
    assert client.post("/admin", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200


def test_without_an_admin_key_admin_routes_take_the_api_key() -> None:
    c = _client(Auth(KEY, None))
    assert c.post("/admin", headers={"x-api-key": KEY}).status_code == 200
    assert c.post("/admin").status_code == 401


def test_only_an_admin_key_guards_only_admin_routes() -> None:
    c = _client(Auth(None, ADMIN))
    assert c.post("/user").status_code == 200
    assert c.post("/admin").status_code == 401
    assert c.post("/admin", headers={"x-api-key": ADMIN}).status_code == 200


def test_public_routes_metrics_and_shapes(client: TestClient) -> None:
    assert client.get("/public").status_code == 200
    assert client.get("/metrics").status_code == 401  # Prometheus sends the key as a bearer token
    assert client.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    oa = client.post("/v1/thing")
    assert oa.status_code == 401 and oa.json()["error"]["type"] == "authentication_error"
    assert oa.json()["error"]["message"] == MISSING_KEY
    tgi = client.post("/tgi")
    assert tgi.status_code == 401 and tgi.json() == {"error": MISSING_KEY, "error_type": "unauthorized"}


def test_every_route_but_health_is_protected_by_default() -> None:
    """Any route a kind or the core adds (OpenAPI, repository, embeddings ...) needs the key unless public."""
    from tandem.console.routes import console_routes
    from tandem.kinds import builtin_kinds

    specs = app_module.route_specs(FrontState(), builtin_kinds()) + console_routes(Auth(KEY))
    public = sorted(s.path for s in specs if s.access == "public")
    # health probes, and the console's page, assets and who-am-I (they hold no data)
    assert public == ["/", "/console/{file:path}", "/health", "/ping", "/tandem/v1/session", "/v2/health/live",
                      "/v2/health/ready"]
    public_routes = {(s.path, s.method) for s in specs if s.access == "public"}
    admin = {s.path for s in specs if s.access == "admin"}
    assert {"/v1/load_lora_adapter", "/v1/unload_lora_adapter"} <= admin
    app = build_app(FrontState(), builtin_kinds(), auth=Auth(KEY))
    with TestClient(app) as c:
        for route in app.routes:
            path = getattr(route, "path", "")
            methods = sorted(getattr(route, "methods", None) or {"GET"})
            url = path.replace("{model:path}", "m").replace("{model}", "m").replace("{version}", "1")
            url = url.replace("{file:path}", "js/app.js")
            method = "POST" if "POST" in methods else "GET"
            r = c.request(method, url)
            if (path, method) in public_routes:
                assert r.status_code != 401, path
            else:
                assert r.status_code == 401, (path, r.status_code)


def test_auth_off_by_default() -> None:
    c = _client(Auth())
    assert c.post("/user").status_code == 200 and c.post("/admin").status_code == 200
    assert c.get("/metrics").status_code == 200


def test_503_always_carries_an_integer_retry_after(client: TestClient) -> None:
    r = client.post("/busy")
    assert r.status_code == 503 and r.headers["retry-after"] == "3"  # 2.5 s rounded up, an integer
    nr = client.get("/not-ready")
    assert nr.status_code == 503 and nr.headers["retry-after"] == "1"


# -- configuration --------------------------------------------------------------------------------
@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True),
                                           ("localhost", True), ("0.0.0.0", False), ("::", False), ("", False),
                                           ("10.1.2.3", False), ("192.168.0.7", False)])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3"])
def test_non_loopback_bind_needs_a_key_or_insecure(host: str) -> None:
    with pytest.raises(ConfigError, match="--api-key") as err:
        ServerConfig(host=host)
    assert "--insecure" in str(err.value)
    assert ServerConfig(host=host, api_key=KEY).api_key is not None  # type: ignore[arg-type]
    assert ServerConfig(host=host, insecure=True).insecure
    with pytest.raises(ConfigError):
        ServerConfig(host=host, admin_key=ADMIN)  # type: ignore[arg-type]  # the admin key alone guards too little


def test_keys_never_show_in_repr_and_survive_pickling() -> None:
    server = ServerConfig(api_key=KEY, admin_key=ADMIN)  # type: ignore[arg-type]
    assert KEY not in repr(server) and ADMIN not in repr(server) and KEY not in str(server)
    again = pickle.loads(pickle.dumps(server))  # spawn pickles it to the fronts
    assert again.api_key is not None and again.api_key.get_secret_value() == KEY
    assert KEY not in repr(Auth.from_server(server))
    assert ServerConfig(api_key="").api_key is None  # type: ignore[arg-type]  # TANDEM_API_KEY= means none


def test_cli_refuses_a_public_bind_without_a_key() -> None:
    proc = subprocess.run([sys.executable, "-m", "tandem.cli", "serve", "--host", "0.0.0.0", "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--api-key" in proc.stderr and "--insecure" in proc.stderr
