"""Argo submission over HTTP: Hera's `WorkflowsService` against a stand-in for the Argo server's create endpoints.

No Argo server is reachable from CI, so this stand-in answers the three create calls of Argo's REST API
(``POST /api/v1/workflows|cron-workflows|workflow-templates/{namespace}``) the way the server does: it checks the
bearer token, wants the body under its request key, fills ``metadata.name`` from ``generateName``, refuses a
name that exists with 409 and its gRPC-gateway error JSON. What reaches it must equal the exported manifest.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tandem.cli import app
from tandem.pipeline import argo
from tandem.pipeline.spec import PipelineError
from tests.conftest import free_port
from tests.http_stub import JSONHandler, serving
from tests.unit.test_pipeline_argo import KINDS, _write_pipeline, lora

TOKEN = "v2:abc.def"
ENDPOINTS = {"workflows": "workflow", "cron-workflows": "cronWorkflow", "workflow-templates": "template"}
KIND_OF = {"workflows": "Workflow", "cron-workflows": "CronWorkflow", "workflow-templates": "WorkflowTemplate"}


@dataclass
class StandIn:
    url: str
    prefix: str
    received: list[dict[str, Any]] = field(default_factory=list)
    stored: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)


def _handler(state: StandIn) -> type[JSONHandler]:
    class Handler(JSONHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.read_json()
            state.received.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            parts = self.path.removeprefix(state.prefix).strip("/").split("/")
            if parts[:2] != ["api", "v1"] or len(parts) != 4 or parts[2] not in ENDPOINTS:
                return self.send_json(404, {"code": 5, "message": "Not Found"})
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self.send_json(401, {"code": 16, "message": "token not valid. see https://argo-workflows."
                                                                 "readthedocs.io/en/latest/faq/"})
            resource, namespace = parts[2], parts[3]
            obj = body.get(ENDPOINTS[resource])
            if not isinstance(obj, dict) or obj.get("kind") != KIND_OF[resource]:
                return self.send_json(400, {"code": 3, "message": f"{ENDPOINTS[resource]} is required"})
            meta = obj.setdefault("metadata", {})
            if not meta.get("name"):
                meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
            key = (resource, namespace, meta["name"])
            if key in state.stored:
                return self.send_json(409, {"code": 6, "message": f'{resource}.argoproj.io "{meta["name"]}" '
                                                                "already exists"})
            meta["namespace"] = namespace
            state.stored[key] = obj
            return self.send_json(200, obj)

    return Handler


def _serve(prefix: str) -> Iterator[StandIn]:
    with serving(_handler(state := StandIn("", prefix))) as state.url:
        yield state


@pytest.fixture
def argo_server() -> Iterator[StandIn]:
    yield from _serve("")


@pytest.fixture
def proxied_argo_server() -> Iterator[StandIn]:
    """An Argo server behind a proxy at ``/argo/`` (``argo server --basehref /argo/``)."""
    yield from _serve("/argo")


@pytest.mark.parametrize("kind", KINDS)
def test_submit_sends_the_exported_manifest_and_returns_the_created_name(kind: str, argo_server: StandIn) -> None:
    manifest = argo.export(lora(), kind)  # type: ignore[arg-type]
    name = argo.submit(manifest, argo.server_url(argo_server.url), TOKEN, "ml")
    [req] = argo_server.received
    resource = {"workflow": "workflows", "cron": "cron-workflows", "template": "workflow-templates"}[kind]
    assert req["path"] == f"/api/v1/{resource}/ml" and req["auth"] == f"Bearer {TOKEN}"
    sent = req["body"][ENDPOINTS[resource]]
    # what Hera serialised is the manifest itself: nothing dropped, renamed or added but the server's fields
    expected = json.loads(json.dumps(manifest))
    for obj in (sent, expected):
        obj["metadata"].pop("namespace", None)
        if kind == "workflow":
            obj["metadata"].pop("name", None)
    assert sent == expected
    if kind == "workflow":
        assert name.startswith("lora-") and len(name) == len("lora-") + 5
    else:
        assert name == "lora"


def test_a_bearer_prefixed_token_is_sent_as_is(argo_server: StandIn) -> None:
    argo.submit(argo.export(lora()), argo.server_url(argo_server.url), f"Bearer {TOKEN}", "ml")
    assert argo_server.received[0]["auth"] == f"Bearer {TOKEN}"


def test_refusals_name_the_status_and_the_fix(argo_server: StandIn) -> None:
    host = argo.server_url(argo_server.url)
    with pytest.raises(PipelineError, match=r"401.*set ARGO_TOKEN"):
        argo.submit(argo.export(lora()), host, "wrong", "ml")
    argo.submit(argo.export(lora(), "template"), host, TOKEN, "ml")
    with pytest.raises(PipelineError, match=r'409.*"lora" already exists.*argo template delete'):
        argo.submit(argo.export(lora(), "template"), host, TOKEN, "ml")
    with pytest.raises(PipelineError, match=r"404.*ARGO_BASE_HREF"):
        argo.submit(argo.export(lora()), host + "elsewhere/", TOKEN, "ml")
    # a Workflow has a generateName, so submitting it twice makes two runs
    assert argo.submit(argo.export(lora()), host, TOKEN, "ml") != argo.submit(argo.export(lora()), host, TOKEN, "ml")


def test_an_unreachable_server_or_a_host_without_scheme_is_a_clear_error() -> None:
    closed = f"http://127.0.0.1:{free_port()}/"   # nothing listens there
    with pytest.raises(PipelineError, match=r"cannot reach the Argo server.*ARGO_SECURE"):
        argo.submit(argo.export(lora()), closed, TOKEN, "ml")
    with pytest.raises(PipelineError, match="http:// or https://"):
        argo.submit(argo.export(lora()), "argo.example:2746", TOKEN, "ml")


@pytest.mark.parametrize(("server", "secure", "base", "url"), [
    ("localhost:2746", True, "", "https://localhost:2746/"),
    ("localhost:2746", False, "", "http://localhost:2746/"),
    ("https://argo.example", False, "", "https://argo.example/"),
    ("argo.example:443", True, "/argo/", "https://argo.example:443/argo/"),
    ("https://argo.example/team/", True, "argo", "https://argo.example/team/argo/"),
])
def test_server_url_follows_the_argo_cli(server: str, secure: bool, base: str, url: str) -> None:
    assert argo.server_url(server, secure=secure, base_href=base) == url


def test_server_url_rejects_other_schemes() -> None:
    with pytest.raises(PipelineError, match="http or https"):
        argo.server_url("grpc://argo:2746")
    with pytest.raises(PipelineError, match="ARGO_SERVER is empty"):
        argo.server_url("  ")


def test_cli_submits_with_the_argo_cli_environment(tmp_path: Path, proxied_argo_server: StandIn,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """ARGO_SERVER as host:port, ARGO_SECURE=false, ARGO_BASE_HREF and ARGO_NAMESPACE, as `argo submit` reads them."""
    monkeypatch.setenv("ARGO_SERVER", proxied_argo_server.url.removeprefix("http://"))
    monkeypatch.setenv("ARGO_SECURE", "false")
    monkeypatch.setenv("ARGO_BASE_HREF", "/argo/")
    monkeypatch.setenv("ARGO_TOKEN", f"Bearer {TOKEN}")
    monkeypatch.setenv("ARGO_NAMESPACE", "team-a")
    result = CliRunner().invoke(app, ["pipeline", "export", str(_write_pipeline(tmp_path)), "--kind", "cron",
                                      "-o", str(tmp_path / "out.yaml"), "--submit"])
    assert result.exit_code == 0, result.output
    assert "submitted CronWorkflow nightly" in result.output
    [req] = proxied_argo_server.received
    assert req["path"] == "/argo/api/v1/cron-workflows/team-a"
    assert req["body"]["cronWorkflow"]["spec"]["schedules"] == ["30 2 * * *"]

    again = CliRunner().invoke(app, ["pipeline", "export", str(_write_pipeline(tmp_path)), "--kind", "cron",
                                     "-o", str(tmp_path / "out.yaml"), "--submit"])
    assert again.exit_code == 2 and "already exists" in again.output and "argo cron delete" in again.output
    assert "Traceback" not in again.output


def test_cli_submit_without_server_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ARGO_SERVER", raising=False)
    result = CliRunner().invoke(app, ["pipeline", "export", str(_write_pipeline(tmp_path)), "-o",
                                      str(tmp_path / "out.yaml"), "--submit"])
    assert result.exit_code == 2 and "ARGO_SERVER" in result.output and "host:port" in result.output
