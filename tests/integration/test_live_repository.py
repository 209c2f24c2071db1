"""The live model repository: Triton's index / load / unload, roll-over without failed requests, poll mode."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import FIXTURE_REPO, Server, shm_segments, start_server

ECHO_YAML = """name: echo
version: "{version}"
device: cpu
threads: 1
batching: {{max_batch_size: 8, max_batch_delay_ms: 2}}
timeout_s: 20
queue_size: 32
params: {{scale_tag: {tag}}}
"""


def _repo(tmp_path: Path, tag: int = 1, version: str = "1") -> Path:
    folder = tmp_path / "repo" / "echo"
    folder.mkdir(parents=True)
    shutil.copy(FIXTURE_REPO / "echo" / "model.py", folder / "model.py")
    (folder / "tandem.yaml").write_text(ECHO_YAML.format(version=version, tag=tag))
    return tmp_path / "repo"


def _add_second(repo: Path) -> None:
    folder = repo / "second"
    folder.mkdir()
    shutil.copy(FIXTURE_REPO / "echo" / "model.py", folder / "model.py")
    (folder / "tandem.yaml").write_text("device: cpu\nthreads: 1\ntimeout_s: 20\n")


@pytest.fixture
def live(tmp_path: Path) -> tuple[Server, Path]:
    repo = _repo(tmp_path)
    server = start_server(repo, "--cpu-workers", "2")
    yield server, repo
    server.stop()


def _index(c: httpx.Client) -> dict[tuple[str, str], dict]:
    r = c.post("/v2/repository/index")
    assert r.status_code == 200, r.text
    return {(m["name"], m["version"]): m for m in r.json()}


def test_index_load_and_unload_with_tritonclient(live: tuple[Server, Path]) -> None:
    import tritonclient.http as triton

    server, repo = live
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    names = {(m["name"], m["state"]) for m in client.get_model_repository_index()}
    assert names == {("echo", "READY")}
    _add_second(repo)
    assert ("second", "UNAVAILABLE") in {(m["name"], m["state"]) for m in client.get_model_repository_index()}
    client.load_model("second")
    assert client.is_model_ready("second")
    with server.client() as c:
        assert c.post("/predictions/second", json={"x": [1, 2]}).json()["y"] == [2, 4]
    client.unload_model("second")
    assert not {m["name"] for m in client.get_model_repository_index() if m["state"] == "READY"} - {"echo"}
    with server.client() as c:
        assert c.post("/predictions/second", json={"x": [1]}).status_code == 404
        assert c.post("/predictions/echo", json={"x": [1]}).status_code == 200


def test_a_model_that_fails_to_load_leaves_the_others_serving(live: tuple[Server, Path]) -> None:
    server, repo = live
    bad = repo / "broken"
    bad.mkdir()
    (bad / "model.py").write_text("raise RuntimeError('boom at import')\n")
    with server.client() as c:
        r = c.post("/v2/repository/models/broken/load")
        assert r.status_code == 400 and "boom at import" in r.json()["error"]
        entry = _index(c)[("broken", "1")]
        assert entry["state"] == "UNAVAILABLE" and "boom" in entry["reason"]
        r = c.post("/v2/repository/models/nothing-here/load")
        assert r.status_code == 404 and "nothing-here" in r.json()["error"]
        r = c.post("/v2/repository/models/echo/unload", content=b"[1]")
        assert r.status_code == 400  # a body must be an object; nothing happened
        assert c.post("/predictions/echo", json={"x": [3]}).json()["y"] == [6]
    # setup failing in the worker (not at import) also only stops the new processes
    (bad / "model.py").write_text((FIXTURE_REPO / "echo" / "model.py").read_text().replace(
        "self.delay = float", "raise RuntimeError('no device for you'); self.delay = float"))
    with server.client(timeout=120) as c:
        r = c.post("/v2/repository/models/broken/load")
        assert r.status_code == 400 and "no device for you" in r.json()["error"]
        assert c.post("/predictions/echo", json={"x": [3]}).json()["y"] == [6]


def test_roll_over_under_concurrency_fails_no_request(live: tuple[Server, Path]) -> None:
    """A reload while 16 clients keep sending: every request succeeds, and the new replica takes over."""
    server, repo = live
    segments_before = len(shm_segments())
    with server.client() as c:
        old_pid = c.post("/predictions/echo", json={"x": [1]}).json()["worker_pid"]
    failures: list[str] = []
    pids: list[int] = []
    stop = threading.Event()

    def hammer() -> None:
        with server.client(timeout=60) as c:
            while not stop.is_set():
                r = c.post("/predictions/echo", json={"x": [1, 2, 3]})
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text}")
                else:
                    pids.append(r.json()["worker_pid"])

    threads = [threading.Thread(target=hammer) for _ in range(16)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        (repo / "echo" / "tandem.yaml").write_text(ECHO_YAML.format(version="1", tag=2))
        with server.client(timeout=300) as c:
            r = c.post("/v2/repository/models/echo/load")
            assert r.status_code == 200, r.text
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert failures == []
    assert len(pids) > 50 and pids[-1] != old_pid  # the new replica serves now
    with server.client() as c:
        new_pids = {c.post("/predictions/echo", json={"x": [1]}).json()["worker_pid"] for _ in range(5)}
    assert old_pid not in new_pids
    assert len(shm_segments()) == segments_before  # the old arenas are gone, the new ones replaced them


def test_a_new_version_rolls_over_and_the_old_one_goes(live: tuple[Server, Path]) -> None:
    server, repo = live
    (repo / "echo" / "tandem.yaml").unlink()  # the model folder now holds version folders: only 2
    (repo / "echo" / "2").mkdir()
    (repo / "echo" / "2" / "tandem.yaml").write_text(ECHO_YAML.format(version="2", tag=2))
    with server.client(timeout=300) as c:
        assert c.post("/v2/repository/models/echo/load").status_code == 200
        assert c.get("/v2/models/echo").json()["versions"] == ["2"]
        assert c.post("/predictions/echo/1", json={"x": [1]}).status_code == 404
        assert c.post("/predictions/echo/2", json={"x": [1]}).json()["y"] == [2]
        status = c.get("/tandem/v1/models").json()["models"]  # what the console's models page shows
        echo = next(m for m in status if m["name"] == "echo")
        assert (echo["version"], echo["kind"], echo["state"], echo["instances"]) == ("2", "model", "READY", 1)
        assert echo["card"]["inputs"][0]["name"] == "x" and echo["card"]["task"] == ""
        [replica] = echo["replicas"]
        assert replica["device"] == "cpu" and replica["ready"] and replica["rss_bytes"] > 10 * 2**20
        assert Path(f"/proc/{replica['pid']}").exists()  # the new version's live worker
        assert c.post("/v2/repository/models/echo/unload").status_code == 200
        gone = next(m for m in c.get("/tandem/v1/models").json()["models"] if m["name"] == "echo")
        assert (gone["state"], gone["replicas"], gone["reason"]) == ("UNAVAILABLE", [], "unloaded")


def test_model_control_none_refuses_changes(tmp_path: Path) -> None:
    server = start_server(_repo(tmp_path), "--cpu-workers", "1", "--model-control", "none")
    try:
        with server.client() as c:
            r = c.post("/v2/repository/models/echo/unload")
            assert r.status_code == 409 and "--model-control" in r.json()["error"]
            assert _index(c)[("echo", "1")]["state"] == "READY"
    finally:
        server.stop()


def test_poll_mode_picks_up_new_and_removed_models(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    server = start_server(repo, "--cpu-workers", "1", "--model-control", "poll")
    try:
        _add_second(repo)
        with server.client() as c:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and c.get("/v2/models/second/ready").status_code != 200:
                time.sleep(0.5)
            assert c.post("/predictions/second", json={"x": [2]}).json()["y"] == [4]
            shutil.rmtree(repo / "second")
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and c.get("/v2/models/second/ready").status_code != 404:
                time.sleep(0.5)
            assert c.get("/v2/models/second/ready").status_code == 404
            assert c.post("/predictions/echo", json={"x": [2]}).json()["y"] == [4]
    finally:
        server.stop()


def test_an_empty_repository_starts_and_takes_models_at_run_time(tmp_path: Path) -> None:
    """A pipeline's first roll-out needs a server over a folder with nothing in it yet (Triton's explicit mode)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    cmd = [sys.executable, "-m", "tandem.cli", "serve", str(repo), "--model-control", "none", "--port", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)   # nothing to serve, nothing to add
    assert proc.returncode == 2 and "--model-control explicit|poll" in " ".join((proc.stdout + proc.stderr).split())
    server = start_server(repo, "--cpu-workers", "1")
    try:
        with server.client() as c:
            assert _index(c) == {} and c.get("/v2/health/ready").status_code == 200
            _add_second(repo)
            assert c.post("/v2/repository/models/second/load").status_code == 200
            assert c.post("/predictions/second", json={"x": [3]}).json()["y"] == [6]
    finally:
        server.stop()
