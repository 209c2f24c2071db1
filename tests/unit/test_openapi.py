"""GET /openapi.json: every route of the app is documented, and the document is valid OpenAPI 3.1."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.routing import Route
from starlette.testclient import TestClient

from tandem.kinds import builtin_kinds
from tandem.serving.app import build_app, core_routes, route_specs
from tandem.serving.kinds import FrontState, RouteSpec
from tandem.serving.openapi import openapi_document, openapi_path, undocumented


def _document() -> tuple[list[Route], dict[str, Any]]:
    app = build_app(FrontState(), builtin_kinds())
    with TestClient(app) as client:
        r = client.get("/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    return [rt for rt in app.routes if isinstance(rt, Route)], r.json()


def test_every_route_of_the_app_has_a_doc() -> None:
    routes, doc = _document()
    assert doc["openapi"].startswith("3.1")
    assert len(routes) > 20
    missing = [f"{m} {rt.path}" for rt in routes for m in sorted(rt.methods or ()) if m != "HEAD"
               and m.lower() not in doc["paths"].get(openapi_path(rt.path), {})]
    assert missing == []
    specs = route_specs(FrontState(), builtin_kinds())
    assert undocumented(specs) == []


def test_core_areas_are_covered() -> None:
    _, doc = _document()
    for path in ("/v2/models/{model}/infer", "/predictions/{model}", "/invocations", "/generate", "/v1/completions",
                 "/v1/chat/completions", "/v1/load_lora_adapter", "/v2/health/ready", "/metrics", "/openapi.json"):
        assert path in doc["paths"], path
    infer = doc["paths"]["/v2/models/{model}/infer"]["post"]
    assert set(infer["requestBody"]["content"]) == {"application/json", "application/octet-stream"}
    assert {p["name"] for p in infer["parameters"]} == {"model", "Inference-Header-Content-Length"}
    image = doc["paths"]["/predictions/{model}"]["post"]["requestBody"]["content"]
    assert image["image/jpeg"]["schema"]["format"] == "binary"


def test_error_shapes_are_the_routes_own() -> None:
    _, doc = _document()

    def error_props(path: str, method: str, status: str) -> set[str]:
        schema = doc["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]
        return set(schema["properties"])

    assert error_props("/v2/models/{model}/infer", "post", "400") == {"error"}
    assert error_props("/generate", "post", "422") == {"error", "error_type"}
    assert error_props("/v1/completions", "post", "400") == {"error"}
    oa = doc["paths"]["/v1/completions"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]
    assert set(oa["properties"]["error"]["properties"]) == {"message", "type", "param", "code"}
    # every route behind the error boundary declares its 500
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if path != "/metrics":
                assert "500" in op["responses"], (method, path)


def test_a_route_without_doc_is_reported() -> None:
    async def handler(r: Any) -> Any:
        raise NotImplementedError

    specs = [*core_routes(FrontState()), RouteSpec("/new/{thing:path}", "POST", "new", handler)]
    assert undocumented(specs) == ["POST /new/{thing:path}"]
    assert "/new/{thing}" not in openapi_document(specs)["paths"]


def test_the_document_is_valid_openapi_and_json_schema() -> None:
    schemathesis = pytest.importorskip("schemathesis")
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    _, doc = _document()
    schema = schemathesis.openapi.from_dict(doc)
    operations = [op.ok() for op in schema.get_all_operations()]
    assert len(operations) == sum(len(ops) for ops in doc["paths"].values())

    def walk(op: dict[str, Any]) -> list[dict[str, Any]]:
        found = [p["schema"] for p in op.get("parameters", [])]
        for content in [op.get("requestBody", {}).get("content", {}),
                        *(r.get("content", {}) for r in op["responses"].values())]:
            found += [c["schema"] for c in content.values()]
        return found

    for ops in doc["paths"].values():
        for op in ops.values():
            for s in walk(op):
                jsonschema_rs.meta.validate(s)  # raises on an invalid JSON Schema


def test_with_api_keys_protected_routes_declare_401_and_admin_403() -> None:
    specs = route_specs(FrontState(), builtin_kinds())
    doc = openapi_document(specs, secured=True)
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    for spec in specs:
        op = doc["paths"][openapi_path(spec.path)][spec.method.lower()]
        if spec.access == "public":
            assert "401" not in op["responses"] and "security" not in op, spec.path
        else:
            assert "401" in op["responses"] and op["security"], spec.path
            assert ("403" in op["responses"]) == (spec.access == "admin") or "403" in (spec.doc.errors if spec.doc
                                                                                      else ()), spec.path
    assert "401" not in openapi_document(specs)["paths"]["/generate"]["post"]["responses"]


def test_an_unmatched_model_path_answers_in_the_apis_error_shape() -> None:
    app = build_app(FrontState(), builtin_kinds())
    with TestClient(app) as client:
        r = client.get("/v1/models/a%0Ab")  # `{model:path}` does not match a newline
        assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = client.get("/no/such/route")
        assert r.status_code == 404 and set(r.json()) == {"error"}
