"""Process lifecycle: worker crashes under load, SIGTERM drain, shared-memory clean-up, start errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import FIXTURE_REPO, Server, echo_repo, free_port, serve_fails, shm_segments, start_server


def _segments_of(server: Server) -> list[str]:
    return shm_segments(f"tandem-{server.pid}-")


def _wait_ready(server: Server, path: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with server.client() as c:
        while time.monotonic() < deadline:
            if c.get(path).status_code == 200:
                return
            time.sleep(0.1)
    raise AssertionError(f"{path} not ready after {timeout} s")


def test_kill_9_accelerator_worker_under_load() -> None:
    server = start_server(FIXTURE_REPO)
    try:
        assert _segments_of(server), "arenas should exist while serving"
        with server.client() as c:
            victim = c.post("/predictions/slow/2", json={"x": [1]}).json()["worker_pid"]
        statuses: list[int] = []
        errors: list[str] = []
        stop = threading.Event()

        def load() -> None:
            with server.client() as c:
                while not stop.is_set():
                    r = c.post("/predictions/slow/2", json={"x": [1, 2]})
                    statuses.append(r.status_code)
                    if r.status_code != 200:
                        errors.append(r.json()["error"])

        threads = [threading.Thread(target=load) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(30)
        # the requests the dead worker held failed with a clear 5xx; the others kept working
        assert statuses.count(200) > 10
        assert any("died while running this request" in e for e in errors), errors
        assert all(s in (200, 500, 503) for s in statuses), set(statuses)
        _wait_ready(server, "/v2/models/slow/versions/2/ready")
        with server.client() as c:
            after = c.post("/predictions/slow/2", json={"x": [3]})
            assert after.status_code == 200
            assert after.json()["worker_pid"] != victim
            assert c.post("/predictions/echo", json={"x": [1]}).status_code == 200
            metrics = c.get("/metrics").text
        assert 'tandem_worker_restarts_total{model="slow:2",role="accel"} 1.0' in metrics
    finally:
        code = server.stop()
    assert code == 0
    assert _segments_of(server) == []


def test_kill_9_front_process_is_restarted() -> None:
    server = start_server(FIXTURE_REPO, "--cpu-workers", "1")
    try:
        with server.client() as c:
            front = c.post("/predictions/echo", json={"x": [1]}).json()["front_pid"]
        os.kill(front, signal.SIGKILL)
        deadline = time.monotonic() + 60
        body = None
        while time.monotonic() < deadline:
            try:
                with server.client() as c:
                    r = c.post("/predictions/echo", json={"x": [2]})
                if r.status_code == 200:
                    body = r.json()
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert body is not None and body["front_pid"] != front
    finally:
        assert server.stop() == 0
    assert _segments_of(server) == []


def test_sigterm_drains_in_flight_requests() -> None:
    server = start_server(FIXTURE_REPO)
    results: list[httpx.Response] = []

    def slow_call() -> None:
        with server.client() as c:
            results.append(c.post("/predictions/slow/1", json={"x": [1]}))

    threads = [threading.Thread(target=slow_call) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.2)  # both requests are in flight (each batch takes 0.5 s)
    code = server.stop(signal.SIGTERM)
    for t in threads:
        t.join(10)
    assert code == 0
    assert [r.status_code for r in results] == [200, 200]
    assert _segments_of(server) == []
    with pytest.raises(httpx.TransportError):  # no longer accepting
        httpx.get(server.url + "/v2/health/live", timeout=2)


def test_sigint_also_shuts_down_cleanly() -> None:
    server = start_server(FIXTURE_REPO)
    assert server.stop(signal.SIGINT) == 0
    assert _segments_of(server) == []


def test_invalid_config_names_file_field_and_fix(tmp_path: Path) -> None:
    repo = echo_repo(tmp_path, "batching: {max_batch_size: 0}\nqueue_sise: 3\n")
    err = " ".join(serve_fails(repo).split())
    assert "tandem.yaml" in err
    assert "batching.max_batch_size" in err and "greater than or equal to 1" in err
    assert "queue_sise" in err and "check its spelling" in err


def test_model_over_memory_limit_fails_at_start(tmp_path: Path) -> None:
    repo = echo_repo(tmp_path, "device: cpu\nmemory_limit: 1MiB\n")
    err = " ".join(serve_fails(repo).split())
    assert "memory_limit" in err and "1 MiB" in err


def test_broken_model_py_is_reported(tmp_path: Path) -> None:
    repo = echo_repo(tmp_path, "device: cpu\n")
    (repo / "echo" / "model.py").write_text("import nonexistent_module_xyz\n")
    err = serve_fails(repo)
    assert "model.py" in err and "nonexistent_module_xyz" in err


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it has exited all the same
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pids: list[int], timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_sigterm_during_start_up_leaves_nothing_behind() -> None:
    port = str(free_port())
    proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "serve", str(FIXTURE_REPO), "--port", port],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(_children(proc.pid)) < 3:  # workers are starting
        time.sleep(0.05)
    kids = _children(proc.pid)
    assert kids, "workers should be starting"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "interrupted during start-up" in out
    assert _wait_gone(kids) == []
    assert shm_segments(f"tandem-{proc.pid}-") == []


def test_workers_exit_when_the_supervisor_is_killed() -> None:
    server = start_server(FIXTURE_REPO, "--cpu-workers", "1")
    with server.client() as c:
        body = c.post("/predictions/echo", json={"x": [1]}).json()
    children = [body["worker_pid"], body["front_pid"]]
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait(10)
    assert _wait_gone(children) == [], "no process may outlive its supervisor"
    leaked = shm_segments(f"tandem-{server.pid}-")
    assert leaked  # kill -9 leaves the arenas; the next server start sweeps them
    again = start_server(FIXTURE_REPO)
    try:
        assert shm_segments(f"tandem-{server.pid}-") == []
    finally:
        assert again.stop() == 0
