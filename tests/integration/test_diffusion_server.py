"""The diffusion kind on real server processes: concurrency, protocols, bad input, cancellation, worker death."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import Server, diffusion_repo, pid_bound_to, start_server
from tests.parity import assert_same_image, psnr

TOO_LONG = "word " * 40  # the tiny tokenizer takes 16 tokens (characters)


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def invoke(server: Server, prompt: str, timeout: float = 120, **params: Any) -> httpx.Response:
    return httpx.post(server.url + "/invocations", json={"prompt": prompt, "parameters": params}, timeout=timeout)


def a1111(server: Server, **body: Any) -> httpx.Response:
    return httpx.post(server.url + "/sdapi/v1/txt2img", json=body, timeout=120)


def metric(server: Server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_sixteen_concurrent_requests_each_equal_their_alone_run(diffusion_server: Server) -> None:
    samplers = ["dpmpp_2m", "euler", "euler_a", "ddim"]
    reqs = [{"prompt": f"a shape {i}", "seed": 100 + i, "num_inference_steps": 4 + i % 5,
             "scheduler": samplers[i % 4], "width": 32 if i % 3 else 16, "height": 32 if i % 3 else 16}
            for i in range(16)]

    def run(r: dict[str, Any]) -> np.ndarray:
        p = {k: v for k, v in r.items() if k != "prompt"}
        resp = httpx.post(diffusion_server.url + "/predictions/t2i", json={"prompt": r["prompt"], "parameters": p},
                          timeout=120)
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"] == "image/png" and resp.headers["x-tandem-seed"] == str(r["seed"])
        return png(resp.content)

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, reqs))
    rows = [float(v) for v in
            [line.rsplit(" ", 1)[1] for line in httpx.get(diffusion_server.url + "/metrics").text.splitlines()
             if line.startswith("tandem_diffusion_unet_rows_sum")]]
    assert rows and rows[0] > 0
    # requests of 4-8 steps finish while others denoise: the stall meter saw decode-overlapped stretches
    assert metric(diffusion_server, "tandem_diffusion_vae_stall_iterations_count") + \
        metric(diffusion_server, "tandem_diffusion_vae_stall_unmeasured_total") >= 1
    for r, image in zip(reqs, together):
        assert_same_image(image, run(r), what=f"request {r} batched vs alone")
    assert psnr(together[1], together[2]) < 30  # distinct seeds: distinct images


def test_formats_by_accept_and_parameter(diffusion_server: Server) -> None:
    url = diffusion_server.url + "/predictions/t2i"
    body = {"prompt": "a red circle", "parameters": {"seed": 1}}
    jpeg = httpx.post(url, json=body, headers={"Accept": "image/jpeg"}, timeout=60)
    assert jpeg.headers["content-type"] == "image/jpeg" and jpeg.content[:2] == b"\xff\xd8"
    webp = httpx.post(url, json={**body, "parameters": {"seed": 1, "output_format": "webp"}}, timeout=60)
    assert webp.headers["content-type"] == "image/webp" and webp.content[8:12] == b"WEBP"
    many = httpx.post(url, json={"inputs": "a red circle", "parameters": {"seed": 1, "num_images_per_prompt": 2}},
                      headers={"Accept": "application/json"}, timeout=60)
    assert many.status_code == 200, many.text
    images = [png(base64.b64decode(b)) for b in many.json()["images"]]
    assert len(images) == 2 and images[0].shape == (32, 32, 3) and many.json()["seed"] == 1
    assert psnr(images[0], images[1]) < 30  # one generator, two different noises, as diffusers does
    assert_same_image(images[0], png(httpx.post(url, json=body, timeout=60).content),
                      what="first of n=2 equals n=1 with the same seed")


def test_invocations_and_predictions_share_paths_with_tensor_models(diffusion_server: Server) -> None:
    """/predictions/echo still reaches the tensor model; /invocations' default is the tensor model here."""
    echo = httpx.post(diffusion_server.url + "/predictions/echo", json={"x": [1, 2]}, timeout=30)
    assert echo.status_code == 200 and echo.json()["y"] == [2.0, 4.0]
    assert httpx.post(diffusion_server.url + "/predictions/nope", json={"prompt": "x"}).status_code == 404
    r = invoke(diffusion_server, "a red circle")
    assert r.status_code == 400 and "x" in r.json()["error"]  # the echo model's preprocess: it wants "x"
    spec = httpx.get(diffusion_server.url + "/openapi.json").json()["paths"]["/predictions/{model}"]["post"]
    assert "image/png" in spec["responses"]["200"]["content"] and "Text-to-image" in spec["summary"]


def test_a1111_batch_uses_consecutive_seeds(diffusion_server: Server) -> None:
    r = a1111(diffusion_server, prompt="a blue square", seed=40, batch_size=2, steps=5, sampler_name="Euler a",
              width=16, height=16)
    assert r.status_code == 200, r.text
    body = r.json()
    info = json.loads(body["info"])
    assert info["all_seeds"] == [40, 41] and info["sampler_name"] == "Euler a" and body["parameters"]["seed"] == 40
    second = a1111(diffusion_server, prompt="a blue square", seed=41, steps=5, sampler_name="Euler a", width=16,
                   height=16)
    assert_same_image(png(base64.b64decode(body["images"][1])), png(base64.b64decode(second.json()["images"][0])),
                      what="A1111 image 2 of a batch equals its seed alone")
    samplers = httpx.get(diffusion_server.url + "/sdapi/v1/samplers").json()
    assert {s["name"] for s in samplers} == {"DPM++ 2M", "Euler", "Euler a", "DDIM"}
    assert [m["title"] for m in httpx.get(diffusion_server.url + "/sdapi/v1/sd-models").json()] == ["t2i"]
    status = httpx.get(diffusion_server.url + "/tandem/v1/models").json()["models"]  # the console's source
    card = next(m for m in status if m["name"] == "t2i")["card"]
    assert (card["task"], card["sizes"], card["max_steps"], card["max_batch_rows"]) == (
        "text-to-image", ["32x32", "16x16"], 400, 16)
    assert card["samplers"] == ["dpmpp_2m", "euler", "euler_a", "ddim"]
    random_seed = json.loads(a1111(diffusion_server, prompt="x", steps=1).json()["info"])["seed"]
    assert isinstance(random_seed, int) and random_seed >= 0


BAD = [  # (route, body, field named in the error, words in the message)
    ("/invocations", {"prompt": "", "parameters": {}}, "prompt", "empty"),
    ("/invocations", {"prompt": TOO_LONG}, "prompt", "at most 16"),
    ("/invocations", {"prompt": "x", "parameters": {"num_inference_steps": 0}}, "num_inference_steps", "between"),
    ("/invocations", {"prompt": "x", "parameters": {"num_inference_steps": 401}}, "num_inference_steps", "400"),
    ("/invocations", {"prompt": "x", "parameters": {"width": 48, "height": 48}}, "width", "32x32, 16x16"),
    ("/invocations", {"prompt": "x", "parameters": {"num_images_per_prompt": 9}}, "num_images_per_prompt", "4"),
    ("/invocations", {"prompt": "x", "parameters": {"scheduler": "plms"}}, "scheduler", "dpmpp_2m"),
    ("/invocations", {"prompt": "x", "parameters": {"guidance_scale": 31}}, "guidance_scale", "30"),
    ("/invocations", {"prompt": "x", "parameters": {"strength": 1}}, "strength", "unsupported"),
    ("/invocations", {"prompt": "x", "parameters": {"num_images_per_prompt": 2}}, "num_images_per_prompt", "JSON"),
    ("/v1/images/generations", {"prompt": "x", "size": "1024x1024"}, "size", "32x32"),
    ("/v1/images/generations", {"prompt": "x", "n": 20}, "n", "between 1 and 4"),
    ("/v1/images/generations", {"prompt": "x", "response_format": "url"}, "response_format", "b64_json"),
    ("/v1/images/generations", {"prompt": "x", "sampler": "heun"}, "sampler", "samplers"),
    ("/v1/images/generations", {"prompt": 5}, "prompt", "string"),
    ("/v1/images/generations", {"prompt": "x", "guidance_scale": -1}, "guidance_scale", ">= 0"),
    ("/v1/images/generations", {"prompt": "x", "model": "nope"}, "model", "unknown"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "steps": 0}, "steps", "between"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "cfg_scale": 100}, "cfg_scale", "30"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "LMS"}, "sampler_name", "DPM++ 2M"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 5, "n_iter": 2}, "batch_size", "at most 4"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "enable_hr": True}, "enable_hr", "not supported"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "width": 512}, "width", "16x16"),
    ("/sdapi/v1/txt2img", {"prompt": ""}, "prompt", "empty"),
]


@pytest.fixture(scope="module")
def t2i_default(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A server whose /invocations default is the diffusion model (it is the only model)."""
    server = start_server(diffusion_repo(tmp_path_factory.mktemp("t2i-only")))
    yield server
    server.stop()


@pytest.mark.parametrize("route,body,field,words", BAD, ids=[f"{b[0]}-{b[2]}" for b in BAD])
def test_bad_input_names_the_field(t2i_default: Server, route: str, body: dict[str, Any], field: str,
                                   words: str) -> None:
    r = httpx.post(t2i_default.url + route, json=body, timeout=30)
    want = 422 if route.startswith("/sdapi") else 404 if field == "model" else 400
    assert r.status_code == want, r.text
    data = r.json()
    message = data["error"]["message"] if "error" in data and isinstance(data["error"], dict) else (
        data.get("detail") or data["error"])
    named = data["error"]["param"] if route.startswith("/v1") else data.get("field", message)
    assert field in named and words in message, data


def test_server_keeps_serving_after_bad_input(t2i_default: Server) -> None:
    for route, body, _, _ in BAD[:5]:
        httpx.post(t2i_default.url + route, json=body, timeout=30)
    assert httpx.post(t2i_default.url + "/invocations", content=b"{not json", timeout=30).status_code == 400
    ok = invoke(t2i_default, "a red circle", seed=3)
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"


def test_a_disconnected_client_frees_its_rows(t2i_default: Server) -> None:
    """Streaming and waiting clients that go away are cancelled in the worker at its next iteration."""
    before = metric(t2i_default, "tandem_diffusion_cancelled_total")
    with httpx.stream("POST", t2i_default.url + "/v1/images/generations", timeout=60,
                      json={"prompt": "slow", "steps": 400, "stream": True, "progress": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:") and '"step":2' in line:
                break  # leave after two steps
    with pytest.raises(httpx.ReadTimeout):
        invoke(t2i_default, "slow too", timeout=1.5, num_inference_steps=400)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and metric(t2i_default, "tandem_diffusion_cancelled_total") < before + 2:
        time.sleep(0.2)
    assert metric(t2i_default, "tandem_diffusion_cancelled_total") == before + 2
    assert metric(t2i_default, "tandem_diffusion_active") == 0


def test_kill_9_of_the_unet_worker_fails_only_its_requests(tmp_path: Path) -> None:
    server = start_server(diffusion_repo(tmp_path, with_echo=True))
    try:
        victim = pid_bound_to("task-1-0", server.pid)  # entries in name order: echo is 0, t2i is 1
        os.kill(victim, signal.SIGSTOP)  # frozen: the requests surely are in flight when it dies
        results: list[httpx.Response] = []

        def send(seed: int) -> None:
            body = {"prompt": "x", "parameters": {"seed": seed}}
            results.append(httpx.post(server.url + "/predictions/t2i", json=body, timeout=60))

        threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        echo = httpx.post(server.url + "/predictions/echo", json={"x": [1]}, timeout=30)
        assert echo.status_code == 200  # the other model is unaffected
        os.kill(victim, signal.SIGKILL)
        for t in threads:
            t.join(60)
        assert [r.status_code for r in results] == [500] * 3
        assert all("died" in r.json()["error"] for r in results)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            r = invoke_model(server, "t2i")
            if r.status_code == 200:
                break
            time.sleep(0.5)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    finally:
        server.stop()


def test_requests_longer_than_timeout_s_live_on_heartbeats(tmp_path: Path) -> None:
    """Unstreamed requests hear only their first step and heartbeats; those must keep the front's timeout_s."""
    server = start_server(diffusion_repo(tmp_path, timeout_s=0.4))
    try:
        r = invoke(server, "long", num_inference_steps=100)
        assert r.status_code == 200, r.text
        timings = dict(kv.split("=") for kv in r.headers["x-tandem-timings"].split(";"))
        assert float(timings["denoise"]) > 400  # ms: longer than timeout_s, so heartbeats carried it
        r = a1111(server, prompt="long", steps=50, batch_size=2)
        assert r.status_code == 200 and len(r.json()["images"]) == 2, r.text
    finally:
        server.stop()


def invoke_model(server: Server, name: str) -> httpx.Response:
    return httpx.post(server.url + f"/predictions/{name}", json={"prompt": "x"}, timeout=60)


def test_live_load_and_unload_of_a_diffusion_entry(tmp_path: Path) -> None:
    """The repository API loads a text-to-image model into a running server and unloads it again."""
    repo = diffusion_repo(tmp_path, with_echo=True)
    parked = tmp_path / "parked"
    (repo / "t2i").rename(parked)
    server = start_server(repo)
    try:
        with server.client(timeout=120) as c:
            assert c.post("/predictions/t2i", json={"prompt": "x"}).status_code == 404
            parked.rename(repo / "t2i")
            r = c.post("/v2/repository/models/t2i/load")
            assert r.status_code == 200, r.text
            made = c.post("/predictions/t2i", json={"prompt": "x", "parameters": {"seed": 2}})
            assert made.status_code == 200 and made.headers["content-type"] == "image/png"
            assert c.post("/v2/repository/models/t2i/unload").status_code == 200
            assert c.post("/predictions/t2i", json={"prompt": "x"}).status_code == 404
            assert c.post("/predictions/echo", json={"x": [1]}).status_code == 200
    finally:
        assert server.stop() == 0
