"""The lora pipeline against a live `tandem serve`: parts ``cached`` and ``deploy`` of benchmarks/pipeline.py.

    cached   the first (uncached) run's seconds, then fully cached re-runs through the CLI
             (`python -m tandem.cli pipeline run examples/pipelines/lora.py ...`), wall time with Python's start
             (goal < 2 s): the data, training and evaluation come from the cache and the deploy step finds the
             same adapter already live (``reloaded: false``)
    deploy   a load generator on the served base model (threads in a closed loop) before, during and after the
             deploy step's hot load of a fresh adapter name: p50/p99 and failures of each phase

The server is tiny-llm with two shipped adapters (as tests/e2e/test_pipeline_examples.py), `--cpu-workers 1`, an
admin key, and a publish folder among its entry's llm.adapter_dirs.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks._proc import spawn_group, stop, tail

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
LORA = ROOT / "examples" / "pipelines" / "lora.py"
ADMIN_KEY = "bench-pipeline-admin-key"
CACHED_RUNS = 3
QUIET_S = 3.0   # seconds of load before and after the deploy


@dataclass
class _Server:
    url: str
    proc: subprocess.Popen[bytes]
    publish: Path


def _entry(root: Path) -> Path:
    """examples/pipelines/swapcase.py's repository: tiny-llm whose runtime loads may read root/published."""
    sys.path.insert(0, str(LORA.parent))
    import swapcase  # type: ignore[import-not-found]

    repo, _ = swapcase.serving_repo(root)
    return Path(repo)


@contextmanager
def _server(root: Path, timeout_s: float = 240.0) -> Iterator[_Server]:
    """`tandem serve` on _entry's repository; waits for its ready line, stops its process group at the end."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = root / "server.log"
    repo = _entry(root)
    proc = spawn_group([sys.executable, "-m", "tandem.cli", "serve", str(repo), "--port", str(port),
                        "--cpu-workers", "1", "--admin-key", ADMIN_KEY, "--log-level", "warning"],
                       log, dict(os.environ), ROOT)
    try:
        deadline = time.monotonic() + timeout_s
        while "tandem ready on " not in (log.read_text(errors="replace") if log.exists() else ""):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start:\n" + tail(log))
            time.sleep(0.1)
        yield _Server(f"http://127.0.0.1:{port}", proc, root / "published")
    finally:
        stop(proc)


def _env() -> dict[str, str]:
    """Steps start `tandem` and `python`: this interpreter's; the admin key in the variable deploy reads."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "TANDEM_ADMIN_KEY": ADMIN_KEY}


def _params(srv: _Server, **extra: str) -> dict[str, object]:
    return {"server": srv.url, "adapter_dir": str(srv.publish), **extra}


def _run_in_process(srv: _Server, home: Path, **extra: str) -> Any:
    """The lora pipeline in this process (the steps' clocks share ours); raises when it did not succeed."""
    from tandem.pipeline.runner import run_pipeline
    from tandem.pipeline.spec import load_pipeline

    os.environ.update(_env())
    result = run_pipeline(load_pipeline(LORA), _params(srv, **extra), home)
    if result.status != "succeeded":
        raise RuntimeError("the lora run failed: " + "; ".join(f"{r.name}: {r.message}" for r in result.failed()))
    return result


def _first_run(srv: _Server, home: Path) -> dict[str, Any]:
    """The uncached run: seconds in all and per step, and the gate's accuracy."""
    t0 = time.perf_counter()
    result = _run_in_process(srv, home)
    return {"seconds": round(time.perf_counter() - t0, 2),
            "steps_s": {n: round(r.seconds, 2) for n, r in result.steps.items()},
            "accuracy": float(result.steps["evaluate"].results["accuracy"])}


def _cached_runs(srv: _Server, home: Path) -> dict[str, Any]:
    """Fully cached re-runs through the CLI: wall seconds each (Python start included) and the step statuses."""
    argv = [sys.executable, "-m", "tandem.cli", "pipeline", "run", str(LORA), "--home", str(home), "--json"]
    for k, v in _params(srv).items():
        argv += ["-p", f"{k}={v}"]
    walls: list[float] = []
    last: dict[str, Any] = {}
    for _ in range(CACHED_RUNS):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
        walls.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise RuntimeError(f"the cached run failed ({proc.returncode}):\n{proc.stdout[-2000:]}"
                               f"{proc.stderr[-2000:]}")
        start = 0 if proc.stdout.startswith("{") else proc.stdout.index("\n{") + 1   # after the progress lines
        last = json.JSONDecoder().raw_decode(proc.stdout, start)[0]
    steps = last["steps"]
    return {"wall_s": [round(w, 2) for w in walls], "best_wall_s": round(min(walls), 2), "goal_s": 2.0,
            "runner_s": last["seconds"], "statuses": {n: s["status"] for n, s in steps.items()},
            "deploy_reloaded": steps["deploy"]["results"].get("reloaded"),
            "steps_s": {n: s["seconds"] for n, s in steps.items() if s["status"] != "cached"}}


@dataclass
class _Load:
    """Closed-loop threads asking the base model; each request logged as (start, end, ok)."""

    url: str
    threads: int = 2
    log: list[tuple[float, float, bool]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> _Load:
        for _ in range(self.threads):
            self._workers.append(threading.Thread(target=self._run, daemon=True))
            self._workers[-1].start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(60)

    def _run(self) -> None:
        import httpx

        body = {"model": "tiny-llm", "prompt": "hello=", "max_tokens": 6, "temperature": 0}
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    ok = client.post("/v1/completions", json=body).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.log.append((t0, time.monotonic(), ok))

    def phase(self, start: float, end: float) -> dict[str, Any]:
        """p50/p99 (ms), count and failures of the requests that started in [start, end)."""
        rows = [(t1 - t0, ok) for t0, t1, ok in self.log if start <= t0 < end]
        lat = sorted(d * 1e3 for d, _ in rows)
        if not lat:
            return {"requests": 0}
        return {"requests": len(rows), "failed": sum(1 for _, ok in rows if not ok),
                "p50_ms": round(statistics.median(lat), 1),
                "p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1), "max_ms": round(lat[-1], 1)}


def _deploy_under_load(srv: _Server, home: Path) -> dict[str, Any]:
    """The pipeline with a fresh adapter name (all cached but deploy and smoke) under load on the base model."""
    with _Load(srv.url) as load:
        time.sleep(QUIET_S)
        result = _run_in_process(srv, home, adapter_name=f"swapcase-{int(time.time())}")
        time.sleep(QUIET_S)
        end = time.monotonic()
    deploy = result.steps["deploy"]
    first = load.log[0][0] if load.log else deploy.started_at
    return {"before": load.phase(first, deploy.started_at), "during": load.phase(deploy.started_at, deploy.ended_at),
            "after": load.phase(deploy.ended_at, end), "deploy_step_s": round(deploy.seconds, 2),
            "server_load_ms": deploy.results.get("load_ms"), "reloaded": deploy.results.get("reloaded"),
            "load_threads": load.threads}


def part_cached_and_deploy(parts: set[str]) -> dict[str, Any]:
    """Start a server, run the lora pipeline once, then the `cached` and/or `deploy` parts; their results."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tandem-bench-pipeline-") as tmp, _server(Path(tmp)) as srv:
        home = Path(tmp) / "home"
        first = _first_run(srv, home)
        logger.info("first lora run: %.1f s", first["seconds"])
        if "cached" in parts:
            out["cached"] = {"first_run": first, **_cached_runs(srv, home)}
        if "deploy" in parts:
            out["deploy"] = _deploy_under_load(srv, home)
    return out
