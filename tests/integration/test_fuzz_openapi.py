"""Property-based fuzzing of every route against /openapi.json (schemathesis), on a real server.

One `tandem serve` with the echo test model, the built-in tiny-llm (4 adapters) and a random-weight
tiny text-to-image entry. For each
operation of the document, schemathesis generates valid and invalid requests (bodies, path
parameters, headers, Triton binary bodies) and checks: no 5xx, the status is one the operation
declares, the content type is a declared one and the body matches its declared schema. After
the run the server must still answer.

Bounded for the normal suite (`TANDEM_FUZZ_EXAMPLES`, default 6 per operation and mode, fixed seed);
raise it, set `TANDEM_FUZZ_SEED` and `TANDEM_FUZZ_COVERAGE=1` (boundary values, every type per field)
for a longer hunt:

    TANDEM_FUZZ_EXAMPLES=200 TANDEM_FUZZ_SEED=$RANDOM TANDEM_FUZZ_COVERAGE=1 \
        .venv/bin/python -m pytest -m fuzz tests/integration/test_fuzz_openapi.py
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import TINY_LLM, Server, diffusion_repo, echo_repo, start_server

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(600)]

EXAMPLES = int(os.environ.get("TANDEM_FUZZ_EXAMPLES", "6"))
SEED = int(os.environ.get("TANDEM_FUZZ_SEED", "20261201"))
COVERAGE = os.environ.get("TANDEM_FUZZ_COVERAGE") == "1"  # schemathesis's boundary-value phase too (slower)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
ECHO_YAML = """name: echo
version: "1"
instances: 1
device: cpu
threads: 1
batching: {max_batch_size: 8, max_batch_delay_ms: 2}
timeout_s: 10
queue_size: 16
max_request_bytes: 65536
"""


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repo = echo_repo(tmp_path_factory.mktemp("fuzz"), ECHO_YAML)
    (repo / "tiny-llm").symlink_to(TINY_LLM, target_is_directory=True)
    diffusion_repo(repo.parent, "  max_images: 2\n", name="t2i")  # random tiny weights, 32x32 and 16x16
    server = start_server(repo, "--cpu-workers", "1")
    yield server
    code = server.stop()
    assert code == 0, "".join(server.log[-50:])


def _document() -> dict[str, Any]:
    """The document the server serves, built in-process so the tests exist at collection."""
    from starlette.testclient import TestClient

    from tandem.kinds import builtin_kinds
    from tandem.serving.app import build_app
    from tandem.serving.kinds import FrontState

    with TestClient(build_app(FrontState(), builtin_kinds())) as client:
        return dict(client.get("/openapi.json").json())


DOCUMENT = _document()
schema = schemathesis.openapi.from_dict(DOCUMENT, config=schemathesis.Config.from_dict({
    "seed": SEED,
    "request-timeout": 60,
    "phases": {"coverage": {"enabled": COVERAGE}, "stateful": {"enabled": False}},
    "generation": {"max-examples": EXAMPLES, "mode": "all"},
}))


@schema.parametrize()
def test_no_server_error_and_every_answer_matches_the_document(case: Any, fuzz_server: Server) -> None:
    case.call_and_validate(base_url=fuzz_server.url, checks=CHECKS)


def test_server_keeps_serving_after_the_fuzzing(fuzz_server: Server) -> None:
    with fuzz_server.client() as c:
        assert c.get("/v2/health/ready").json() == {"ready": True}
        r = c.post("/v1/completions", json={"model": "tiny-llm", "prompt": "hello=", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        infer = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
        r = c.post("/v2/models/echo/infer", json=infer)
        if r.status_code == 404:  # the fuzzer may have unloaded it through the repository API
            assert c.post("/v2/repository/models/echo/load").status_code == 200
            r = c.post("/v2/models/echo/infer", json=infer)
        assert r.status_code == 200, r.text
    assert not [line for line in fuzz_server.log if "Traceback" in line], "".join(fuzz_server.log[-80:])


def test_the_fuzzed_document_is_the_served_one(fuzz_server: Server) -> None:
    with fuzz_server.client() as c:
        assert c.get("/openapi.json").json() == DOCUMENT
