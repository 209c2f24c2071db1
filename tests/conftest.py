"""Shared fixtures: real `tandem serve` processes on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_REPO = ROOT / "tests" / "fixtures" / "repo"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Exported artefacts (a diffusion UNet for onnxruntime) go to a folder of this test run, not ~/.cache.
os.environ.setdefault("TANDEM_CACHE_DIR", tempfile.mkdtemp(prefix="tandem-test-cache-"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shm_segments(prefix: str = "tandem-") -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(prefix + "*"))


@dataclass
class Server:
    """A running `tandem serve` subprocess."""

    proc: subprocess.Popen[str]
    url: str
    log: list[str]

    def client(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    @property
    def pid(self) -> int:
        return self.proc.pid


def _ppid(pid: str) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def pid_bound_to(suffix: str, parent: int) -> int:
    """The pid of the child of `parent` that bound the unix socket whose path ends with `suffix`."""
    inodes = {line.split()[6] for line in Path("/proc/net/unix").read_text().splitlines()[1:]
              if len(line.split()) > 7 and line.split()[7].endswith(suffix)}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if _ppid(pid) != parent:
                continue
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return int(pid)
    raise AssertionError(f"no process bound {suffix}")


def echo_repo(tmp_path: Path, yaml_text: str, name: str = "echo") -> Path:
    """A one-model repository: the echo fixture model with the given tandem.yaml."""
    folder = tmp_path / "repo" / name
    folder.mkdir(parents=True)
    (folder / "model.py").write_text((FIXTURE_REPO / "echo" / "model.py").read_text())
    (folder / "tandem.yaml").write_text(yaml_text)
    return tmp_path / "repo"


def serve_fails(repo: Path | None, *args: str, timeout: float = 300.0) -> str:
    """Run `tandem serve` expecting a start-up error (exit 2); returns its stderr."""
    where = [str(repo)] if repo else []
    proc = subprocess.run([sys.executable, "-m", "tandem.cli", "serve", *where, "--port", "0", *args],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    return proc.stderr


def _drain(proc: subprocess.Popen[str], log: list[str]) -> None:
    """Keep reading the server's output so a full pipe never blocks it."""
    assert proc.stdout is not None
    for line in proc.stdout:
        log.append(line)


def start_server(repo: Path | None, *args: str, env: dict[str, str] | None = None,
                 timeout: float = 240.0) -> Server:
    """Start `tandem serve` and wait for its ready line; fail with its output if it dies."""
    port = free_port()
    cmd = [sys.executable, "-m", "tandem.cli", "serve", *( [str(repo)] if repo else []),
           "--port", str(port), "--log-level", "warning", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    log: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line:
            log.append(line)
            if line.startswith("tandem ready on "):
                os.set_blocking(proc.stdout.fileno(), True)
                threading.Thread(target=_drain, args=(proc, log), daemon=True).start()
                return Server(proc, line.split("tandem ready on ", 1)[1].strip(), log)
            continue
        if proc.poll() is not None:
            raise RuntimeError("server exited during start:\n" + "".join(log))
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("server not ready in time:\n" + "".join(log))


@pytest.fixture(scope="session")
def fixture_server() -> Iterator[Server]:
    """One server on the tiny test repository, shared by non-destructive tests."""
    server = start_server(FIXTURE_REPO, "--cpu-workers", "2")
    yield server
    server.stop()


TINY_LLM = ROOT / "tandem" / "default_repo" / "tiny-llm"


@pytest.fixture(scope="session")
def llm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server on the built-in tiny-llm entry alone (base model 'tiny-llm' + 4 adapters)."""
    repo = tmp_path_factory.mktemp("llm-repo")
    (repo / "tiny-llm").symlink_to(TINY_LLM, target_is_directory=True)
    server = start_server(repo, "--cpu-workers", "2")
    yield server
    server.stop()


def diffusion_repo(root: Path, yaml_extra: str = "", name: str = "t2i", with_echo: bool = False,
                   timeout_s: float = 60) -> Path:
    """A repository with a random-weight tiny Stable Diffusion entry (32x32 and 16x16), and the echo model."""
    from tandem.diffusion.testing import make_random_pipeline

    folder = root / "repo" / name
    make_random_pipeline(folder / "pipeline")
    (folder / "tandem.yaml").write_text(f"name: {name}\nkind: diffusion\ntimeout_s: {timeout_s}\ndiffusion:\n"
                                        f"  sizes: ['32x32', '16x16']\n  default_steps: 6\n  max_steps: 400\n"
                                        f"  max_batch_rows: 16\n{yaml_extra}")
    if with_echo:
        echo = root / "repo" / "echo"
        echo.mkdir()
        (echo / "model.py").write_text((FIXTURE_REPO / "echo" / "model.py").read_text())
        (echo / "tandem.yaml").write_text((FIXTURE_REPO / "echo" / "tandem.yaml").read_text())
    return root / "repo"


@pytest.fixture(scope="session")
def diffusion_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server with the tiny random diffusion entry `t2i` beside the echo tensor model."""
    server = start_server(diffusion_repo(tmp_path_factory.mktemp("t2i"), with_echo=True))
    yield server
    server.stop()


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


_TIERS = ("unit", "integration", "e2e", "browser")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its tier (its folder: `-m unit`, `-m "not e2e"`); GPU tests need CUDA."""
    cuda = _has_cuda()
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        tier = next((t for t in _TIERS if f"/tests/{t}/" in str(item.path)), None)
        if tier is not None:
            item.add_marker(getattr(pytest.mark, tier))
        if "gpu" in item.keywords and not cuda:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_sigchld() -> Iterator[None]:
    """torch's DataLoader installs a process-wide SIGCHLD handler the first time it starts workers; in the one
    pytest process it outlives the test and then runs (into C++ state of loaders long gone) whenever any later
    child exits, e.g. a server stopped at session end: the suite's exit segfault. Each test gets back the
    handler it started with."""
    before = signal.getsignal(signal.SIGCHLD)
    yield
    if signal.getsignal(signal.SIGCHLD) is not before:
        signal.signal(signal.SIGCHLD, before)
