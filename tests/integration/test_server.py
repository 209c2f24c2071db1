"""Real `tandem serve` processes on loopback, real HTTP: routing, protocols, errors, metrics."""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import numpy as np
import pytest

from tests.conftest import Server


def test_predictions_roundtrip_runs_pre_and_post_outside_the_accelerator(fixture_server: Server) -> None:
    with fixture_server.client() as c:
        r = c.post("/predictions/echo", json={"x": [1, 2, 3.5]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["y"] == [2.0, 4.0, 7.0]
    assert body["total"] == 6.5
    # preprocess/postprocess ran in a front process, predict in a different (accelerator) process
    assert body["front_pid"] != body["worker_pid"]


def test_versions_are_routed(fixture_server: Server) -> None:
    with fixture_server.client() as c:
        v1 = c.post("/predictions/slow/1", json={"x": [1]})
        v2 = c.post("/predictions/slow/2", json={"x": [1]})
        latest = c.post("/v2/models/slow/versions/2/infer", json={
            "inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [3]}]})
    assert v1.status_code == v2.status_code == latest.status_code == 200
    assert v1.json()["worker_pid"] != v2.json()["worker_pid"]


def test_v2_metadata_and_health(fixture_server: Server) -> None:
    with fixture_server.client() as c:
        assert c.get("/v2").json()["name"] == "tandem"
        assert c.get("/v2/health/live").status_code == 200
        assert c.get("/v2/health/ready").status_code == 200
        meta = c.get("/v2/models/echo").json()
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, -1]}]
        assert sorted(c.get("/v2/models/slow").json()["versions"]) == ["1", "2", "3"]
        assert c.get("/v2/models/echo/versions/1").status_code == 200
        assert c.get("/v2/models/echo/ready").json() == {"name": "echo", "ready": True}
        assert c.get("/v2/models/echo/versions/1/ready").status_code == 200
        assert c.get("/ping").status_code == 200


def test_v2_infer_json_batch_of_rows(fixture_server: Server) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    with fixture_server.client() as c:
        r = c.post("/v2/models/echo/infer", json={
            "id": "abc", "inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x.ravel().tolist()}],
            "outputs": [{"name": "total"}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "abc" and body["model_name"] == "echo"
    assert [o["name"] for o in body["outputs"]] == ["total"]
    assert body["outputs"][0]["data"] == x.sum(axis=1).tolist()


def test_sagemaker_invocations_go_to_the_default_model(fixture_server: Server) -> None:
    with fixture_server.client() as c:
        r = c.post("/invocations", json={"x": [5]})
    assert r.status_code == 200 and r.json()["y"] == [10.0]


@pytest.mark.parametrize("method,path,kwargs,status,needle", [
    ("POST", "/predictions/echo", {"content": b"{not json", "headers": {"content-type": "application/json"}},
     400, "malformed JSON"),
    ("POST", "/predictions/echo", {"json": {"y": 1}}, 400, "expected JSON"),
    ("POST", "/predictions/echo", {"json": {"x": [[1, 2], [3, 4]]}}, 400, "1-D"),
    ("POST", "/predictions/echo", {"json": {"x": list(range(100))}}, 400, "shape"),
    ("POST", "/predictions/nope", {"json": {"x": [1]}}, 404, "unknown model 'nope'"),
    ("POST", "/predictions/slow/9", {"json": {"x": [1]}}, 404, "no version '9'"),
    ("GET", "/v2/models/nope", {}, 404, "unknown model"),
    ("POST", "/predictions/echo", {"content": b"x" * 70000, "headers": {"content-type": "application/json"}},
     413, "limit"),
    ("POST", "/v2/models/echo/infer", {"json": {"inputs": [
        {"name": "x", "shape": [1, 2], "datatype": "INT32", "data": [1, 2]}]}}, 400, "dtype INT32, expected FP32"),
    ("POST", "/v2/models/echo/infer", {"json": {"inputs": [
        {"name": "x", "shape": [1, 2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}]}}, 400, "shape"),
    ("POST", "/v2/models/echo/infer", {"json": {"inputs": [
        {"name": "z", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}}, 400, "missing ['x']"),
    ("POST", "/v2/models/echo/infer", {"json": {"inputs": [
        {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2]}]}}, 400, "x"),
    ("POST", "/v2/models/echo/infer", {"json": {"inputs": [
        {"name": "x", "shape": [9, 2], "datatype": "FP32", "data": [0] * 18}]}}, 413, "max_request_rows"),
    ("POST", "/v2/models/echo/infer", {"json": {"inputs": [
        {"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1]}], "outputs": [{"name": "w"}]}},
     400, "no output 'w'"),
    ("GET", "/no/such/route", {}, 404, "no route"),
    ("GET", "/predictions/echo", {}, 405, "not allowed"),
])
def test_bad_input_gets_a_json_error_and_the_server_keeps_serving(
        fixture_server: Server, method: str, path: str, kwargs: dict, status: int, needle: str) -> None:
    with fixture_server.client() as c:
        r = c.request(method, path, **kwargs)
        assert r.status_code == status, r.text
        assert needle in r.json()["error"]
        ok = c.post("/predictions/echo", json={"x": [1]})
    assert ok.status_code == 200


def test_timeout_is_504_and_frees_the_slot(fixture_server: Server) -> None:
    with fixture_server.client() as c:
        r = c.post("/predictions/slow/3", json={"x": [1]})
        assert r.status_code == 504
        assert "did not answer" in r.json()["error"]
        assert c.post("/predictions/echo", json={"x": [1]}).status_code == 200


def test_full_queue_answers_503_not_unbounded_memory(fixture_server: Server) -> None:
    # slow:1 runs batches of 2 taking 0.5 s; each front holds at most 4 of its requests.
    def call(_: int) -> httpx.Response:
        with fixture_server.client() as c:
            return c.post("/predictions/slow/1", json={"x": [1]})

    with cf.ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(call, range(24)))
    statuses = [r.status_code for r in responses]
    assert 503 in statuses, statuses
    assert set(statuses) <= {200, 503, 504}, statuses
    rejected = next(r for r in responses if r.status_code == 503)
    assert "queue of model slow:1 is full" in rejected.json()["error"]
    assert rejected.headers["retry-after"].isdigit()  # an integer a client can wait on
    with fixture_server.client() as c:  # nothing stuck afterwards
        assert c.post("/predictions/echo", json={"x": [1]}).status_code == 200


def test_metrics_aggregate_all_processes(fixture_server: Server) -> None:
    with fixture_server.client() as c:
        for _ in range(3):
            c.post("/predictions/echo", json={"x": [1, 2]})
        text = c.get("/metrics").text
    for name in ["tandem_requests_total", "tandem_request_failures_total", "tandem_request_latency_seconds_bucket",
                 "tandem_queue_seconds_bucket", "tandem_preprocess_seconds_bucket", "tandem_predict_seconds_bucket",
                 "tandem_postprocess_seconds_bucket", "tandem_batch_size_bucket", "tandem_in_flight"]:
        assert name in text, name
    # predict-side samples come from the accelerator process, request counts from fronts
    assert 'tandem_batch_size_count{model="echo"}' in text
    assert 'tandem_requests_total{endpoint="predictions",model="echo",status="200"}' in text


def test_unknown_model_names_do_not_create_metric_labels(fixture_server: Server) -> None:
    with fixture_server.client() as c:
        for i in range(3):
            assert c.post(f"/predictions/made-up-{i}", json={"x": [1]}).status_code == 404
        text = c.get("/metrics").text
    assert "made-up" not in text
    assert 'model="_unknown"' in text
