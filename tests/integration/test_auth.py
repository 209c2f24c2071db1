"""`tandem serve --api-key / --admin-key` for real: tensor, TGI and OpenAI routes, and unmodified clients."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from tests.conftest import FIXTURE_REPO, TINY_LLM, Server, start_server

KEY = "tandem-test-user-key-5f1c9a"
ADMIN = "tandem-test-admin-key-77b2e4"
WRONG = "x" * len(KEY)  # same length: the comparison must still fail
ECHO_YAML = (FIXTURE_REPO / "echo" / "tandem.yaml").read_text()
INFER = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
TGI = {"inputs": "hello=", "parameters": {"max_new_tokens": 8}}
COMPLETION = {"model": "tiny-llm", "prompt": "hello=", "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """echo + tiny-llm; the API key from TANDEM_API_KEY, the admin key from the flag."""
    repo = tmp_path_factory.mktemp("auth-repo")
    (repo / "echo").mkdir()
    (repo / "echo" / "model.py").write_text((FIXTURE_REPO / "echo" / "model.py").read_text())
    (repo / "echo" / "tandem.yaml").write_text(ECHO_YAML)
    (repo / "tiny-llm").symlink_to(TINY_LLM, target_is_directory=True)
    srv = start_server(repo, "--cpu-workers", "1", "--admin-key", ADMIN, env={"TANDEM_API_KEY": KEY})
    yield srv
    srv.stop()
    log = "".join(srv.log)
    assert KEY not in log and ADMIN not in log  # never logged


ROUTES = [("POST", "/v2/models/echo/infer", INFER), ("POST", "/predictions/echo", {"x": [1, 2]}),
          ("POST", "/invocations", {"x": [1]}), ("GET", "/v2/models/echo", None), ("GET", "/v2", None),
          ("POST", "/v1/completions", COMPLETION), ("GET", "/v1/models", None),
          ("POST", "/generate", TGI), ("GET", "/info", None), ("GET", "/metrics", None),
          ("GET", "/tandem/v1/models", None)]


@pytest.mark.parametrize("method,path,body", ROUTES)
def test_every_route_needs_the_key(server: Server, method: str, path: str, body: dict | None) -> None:
    with server.client() as c:
        missing = c.request(method, path, json=body)
        assert missing.status_code == 401, missing.text
        assert missing.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer" in missing.text and "x-api-key" in missing.text
        wrong = c.request(method, path, json=body, headers={"Authorization": f"Bearer {WRONG}"})
        assert wrong.status_code == 401 and KEY not in wrong.text
        bearer = c.request(method, path, json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert bearer.status_code == 200, bearer.text
        header = c.request(method, path, json=body, headers={"x-api-key": KEY})
        assert header.status_code == 200, header.text


def test_errors_come_in_each_api_shape(server: Server) -> None:
    with server.client() as c:
        oa = c.post("/v1/completions", json=COMPLETION).json()
        assert oa["error"]["type"] == "authentication_error" and "x-api-key" in oa["error"]["message"]
        tgi = c.post("/generate", json=TGI).json()
        assert tgi["error_type"] == "unauthorized" and "x-api-key" in tgi["error"]
        assert "x-api-key" in c.post("/predictions/echo", json={"x": [1]}).json()["error"]


@pytest.mark.parametrize("path", ["/v2/health/live", "/v2/health/ready", "/ping", "/health"])
def test_health_needs_no_key(server: Server, path: str) -> None:
    with server.client() as c:
        assert c.get(path).status_code == 200


def test_the_console_shell_is_public_and_its_data_is_not(server: Server) -> None:
    """The page and its scripts hold no data (no key needed); what they show comes from keyed routes."""
    with server.client() as c:
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        script = c.get("/console/js/app.js")
        assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
        for path in ("/console/../tandem.yaml", "/console/%2e%2e/routes.py", "/console/js/../../routes.py",
                     "/console/__init__.py", "/console/", "/console/js/nope.js"):
            r = c.get(path)
            assert r.status_code == 404 and "error" in r.json(), path  # only packaged assets, never a path
        assert c.get("/tandem/v1/models").status_code == 401
        assert c.get("/tandem/v1/session").json() == {"auth": True, "access": None}
        assert c.get("/tandem/v1/session", headers={"Authorization": f"Bearer {WRONG}"}).json()["access"] is None
        assert c.get("/tandem/v1/session", headers={"Authorization": f"Bearer {KEY}"}).json()["access"] == "user"
        assert c.get("/tandem/v1/session", headers={"x-api-key": ADMIN}).json()["access"] == "admin"
        models = c.get("/tandem/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["models"]
        llm = next(m for m in models if m["name"] == "tiny-llm")
        assert llm["kind"] == "llm" and llm["card"]["adapters"] == ["increment", "reverse", "sort", "upper"]


def test_adapter_load_needs_the_admin_key(server: Server) -> None:
    load = {"lora_name": "rev2", "lora_path": "reverse"}
    with server.client() as c:
        assert c.post("/v1/load_lora_adapter", json=load).status_code == 401
        user = c.post("/v1/load_lora_adapter", json=load, headers={"Authorization": f"Bearer {KEY}"})
        assert user.status_code == 403, user.text
        assert user.json()["error"]["type"] == "permission_error" and "admin key" in user.json()["error"]["message"]
        admin = {"Authorization": f"Bearer {ADMIN}"}
        r = c.post("/v1/load_lora_adapter", json=load, headers=admin)
        assert r.status_code == 200, r.text
        out = c.post("/v1/completions", json={**COMPLETION, "model": "rev2"}, headers={"x-api-key": KEY})
        assert out.status_code == 200 and out.json()["choices"][0]["text"] == "olleh"
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "rev2"},
                      headers={"x-api-key": KEY}).status_code == 403
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "rev2"}, headers=admin).status_code == 200


def test_unmodified_openai_client(server: Server) -> None:
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60) as oa:
        out = oa.completions.create(model="tiny-llm", prompt="hello=", max_tokens=12, temperature=0)
        assert out.choices[0].text == "hello"
    with openai.OpenAI(base_url=server.url + "/v1", api_key=WRONG, max_retries=0, timeout=60) as oa:
        with pytest.raises(openai.AuthenticationError) as info:
            oa.completions.create(model="tiny-llm", prompt="hello=", max_tokens=12, temperature=0)
        assert "x-api-key" in str(info.value)
        with pytest.raises(openai.AuthenticationError):
            oa.models.list()


def test_tritonclient_with_headers(server: Server) -> None:
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    x = triton.InferInput("x", [1, 3], "FP32")
    x.set_data_from_numpy(np.array([[1, 2, 3]], dtype=np.float32), binary_data=True)
    out = client.infer("echo", [x], headers={"Authorization": f"Bearer {KEY}"})
    assert out.as_numpy("total").ravel().tolist() == [6.0]
    assert client.is_server_live()  # health: no key
    with pytest.raises(InferenceServerException, match="API key"):
        client.infer("echo", [x])


def test_keys_are_not_in_the_environment_of_model_processes(server: Server) -> None:
    import psutil

    children = psutil.Process(server.pid).children(recursive=True)
    assert children
    for child in children:  # fronts and workers run user code: keys reach them only inside ServerConfig
        env = " ".join(child.environ().values())
        assert KEY not in env and ADMIN not in env


def test_no_key_needed_on_loopback_by_default(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "echo").mkdir(parents=True)
    (repo / "echo" / "model.py").write_text((FIXTURE_REPO / "echo" / "model.py").read_text())
    (repo / "echo" / "tandem.yaml").write_text(ECHO_YAML)
    srv = start_server(repo, "--cpu-workers", "1")
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert c.post("/predictions/echo", json={"x": [1]}).status_code == 200
    finally:
        srv.stop()
