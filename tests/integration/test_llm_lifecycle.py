"""LLM entries as real server processes: worker death mid-stream, start-up errors, config errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import TINY_LLM, Server, pid_bound_to, serve_fails, start_server


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "tiny-llm").symlink_to(TINY_LLM, target_is_directory=True)
    return repo


def _generate(server: Server, adapter: str, text: str = "hello=") -> httpx.Response:
    return httpx.post(server.url + "/generate", timeout=60,
                      json={"inputs": text, "parameters": {"max_new_tokens": 12, "adapter_id": adapter}})


def test_kill_9_llm_worker_with_requests_in_flight(tmp_path: Path) -> None:
    """Requests held by a worker that dies fail with a clear 500; the worker restarts with its adapters."""
    server = start_server(_repo(tmp_path), "--cpu-workers", "1")
    try:
        victim = pid_bound_to("task-0-0", server.pid)
        os.kill(victim, signal.SIGSTOP)  # freeze it so the requests are surely in flight when it dies
        answers: list[httpx.Response] = []

        def call(path: str) -> None:
            answers.append(httpx.post(server.url + path, timeout=60,
                                      json={"inputs": "abcdefgh=", "parameters": {"max_new_tokens": 8}}))

        threads = [threading.Thread(target=call, args=(p,)) for p in ("/generate", "/generate_stream", "/generate")]
        for t in threads:
            t.start()
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)
        for t in threads:
            t.join(60)
        assert [r.status_code for r in answers] == [500, 500, 500]
        assert all("died while running this request" in r.json()["error"] for r in answers)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            r = _generate(server, "reverse")
            if r.status_code == 200:
                break
            time.sleep(0.5)
        assert r.json()["generated_text"] == "olleh"  # restarted, adapters loaded again
        assert pid_bound_to("task-0-0", server.pid) != victim
        assert 'tandem_worker_restarts_total{model="tiny-llm:1",role="accel"} 1.0' in httpx.get(
            server.url + "/metrics").text
    finally:
        assert server.stop() == 0


def test_bad_adapter_at_start_names_it(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(TINY_LLM / "adapters" / "reverse", bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    err = serve_fails(None, "--llm", str(TINY_LLM / "base"), "--lora-adapters", f"dora={bad}")
    assert "adapter 'dora'" in err and "DoRA" in err


def test_llm_config_errors(tmp_path: Path) -> None:
    err = serve_fails(None, "--llm", str(TINY_LLM / "base"), "--lora-adapters", "oops")
    assert "name=path" in err
    folder = tmp_path / "repo" / "x"
    folder.mkdir(parents=True)
    (folder / "tandem.yaml").write_text("kind: llm\n")
    assert "llm:" in serve_fails(tmp_path / "repo")
    (folder / "tandem.yaml").write_text("kind: llm\nllm: {path: nowhere}\n")
    assert "config.json" in serve_fails(tmp_path / "repo")


def test_cli_llm_and_env_adapters(tmp_path: Path) -> None:
    adapters = f"rev={TINY_LLM / 'adapters' / 'reverse'}"
    server = start_server(None, "--llm", str(TINY_LLM / "base"), "--max-total-tokens", "64",
                          env={"LORA_ADAPTERS": adapters})
    try:
        assert _generate(server, "rev").json()["generated_text"] == "olleh"
        assert httpx.get(server.url + "/info").json()["model_id"] == "base"
        r = httpx.post(server.url + "/v1/load_lora_adapter", timeout=60,
                       json={"lora_name": "up", "lora_path": str(TINY_LLM / "adapters" / "upper")})
        assert r.status_code == 200, r.text  # inside the start-up adapters' parent folder
        r = httpx.post(server.url + "/v1/load_lora_adapter", timeout=60,
                       json={"lora_name": "x", "lora_path": str(TINY_LLM / "base")})
        assert r.status_code == 400 and "outside" in r.json()["error"]["message"]  # OpenAI-shaped error
        assert _generate(server, "up").json()["generated_text"] == "HELLO"
    finally:
        assert server.stop() == 0
