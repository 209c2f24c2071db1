"""The local runner: a pipeline's DAG executed on this machine, independent steps in parallel.

Each step is a subprocess (a command, or ``python -m tandem.pipeline.call`` for a function step) with its cwd in
the pipeline's folder, its output going to ``HOME/runs/RUN/STEP.log``. Steps start as soon as their upstream
steps finish, while the machine's CPUs, GPUs and memory (``resources``) allow; a step asking more than the
machine has runs alone. Nothing is polled: finishing steps wake the scheduling loop through a queue.

Caching: a step's key hashes its definition, rendered parameters, the content hashes of its input artifacts,
the upstream values it reads and its code (a function's module file; every argv element that names a file in
the pipeline's folder; ``code:`` paths). Outputs are written to a scratch folder and renamed into
``HOME/artifacts/KEY`` only on success, so a step killed half-way leaves nothing that looks finished: after
kill -9 of the runner, running the pipeline again takes every completed step from the cache and runs the
interrupted one again (and removes the dead runner's scratch folders). `retry` re-runs only the failed steps of a run.

Failures are classified: ``code`` (non-zero exit, or a declared output not written), ``infra`` (killed by a
signal: SIGKILL from the OOM killer or an operator, or the runner died), ``timeout``; ``retry.on`` picks which
are retried, with exponential back-off.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tandem.pipeline._hashing import cache_key, content_hash
from tandem.pipeline.spec import ParamValue, Pipeline, PipelineError, Step, parse_condition, placeholders
from tandem.pipeline.store import Store
from tandem.serving._proc import pid_alive

__all__ = ["RunResult", "StepFailed", "StepResult", "default_home", "new_run_id", "retry_run", "run_pipeline",
           "sweep_scratch"]

logger = logging.getLogger(__name__)
_TAIL_BYTES = 4000
SCRATCH = ".tmp-"  # HOME/artifacts/.tmp-PID-KEY-RANDOM: a step's outputs until they are renamed to HOME/artifacts/KEY


class StepFailed(PipelineError):
    """A step failed after its retries; the message holds its log tail."""


@dataclass
class StepResult:
    """What one step of a run did."""

    name: str
    status: str = "pending"   # succeeded | cached | skipped | failed | not_run
    cached: bool = False
    attempts: int = 0
    seconds: float = 0.0
    results: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, Path] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)
    log: Path | None = None
    message: str = ""
    failure: str | None = None
    ready_at: float = 0.0   # time.monotonic() when its last upstream step's process ended
    started_at: float = 0.0   # when its process started (or its cache hit was found)
    ended_at: float = 0.0   # when its process's exit was seen (or its cache hit was found)


@dataclass
class RunResult:
    """A finished run: its status and every step's result."""

    run_id: str
    pipeline: str
    status: str
    steps: dict[str, StepResult]
    seconds: float

    def failed(self) -> list[StepResult]:
        """Steps that failed."""
        return [s for s in self.steps.values() if s.status == "failed"]


def default_home() -> Path:
    """``TANDEM_PIPELINE_HOME`` or ``./.tandem/pipelines``."""
    from tandem.envs import TANDEM_PIPELINE_HOME, env_str

    return Path(env_str(TANDEM_PIPELINE_HOME) or Path.cwd() / ".tandem" / "pipelines")


def new_run_id(pipeline: str) -> str:
    """``NAME-YYYYmmdd-HHMMSS-xxxx`` (UTC)."""
    return f"{pipeline}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:4]}"


def _machine() -> tuple[float, int]:
    """CPUs this process may use (affinity respected) and GPUs visible to it, without importing torch."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # not Linux
        cpus = os.cpu_count() or 1
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    else:
        gpus = len([p for p in Path("/dev").glob("nvidia[0-9]*")])
    return float(cpus), gpus


_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
          "Ti": 2**40}


def _quantity(memory: str | None) -> int:
    """A Kubernetes memory quantity ("512Mi", "8Gi", "1G") in bytes; 0 when not given."""
    if not memory:
        return 0
    number = memory.rstrip("kMGTi")
    return int(float(number) * _UNITS[memory[len(number):]])


def _memory_bytes() -> int:
    """This machine's memory (MemTotal), so steps' memory requests share it as CPUs are shared."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62   # unknown: memory does not limit parallelism


class _Run:
    """The state of one run while the runner executes it (scheduling happens on one thread)."""

    def __init__(self, pipe: Pipeline, params: dict[str, ParamValue], home: Path, run_id: str, store: Store,
                 progress: Callable[[str], None], reuse: dict[str, StepResult]) -> None:
        self.pipe, self.params, self.home, self.run_id, self.store = pipe, params, home, run_id, store
        self.progress, self.reuse = progress, reuse
        self.workdir = Path(pipe.workdir or Path.cwd())
        self.steps = {s.name: s for s in pipe.steps}
        self.deps = {s.name: s.upstream() for s in pipe.steps}
        self.results = {n: StepResult(n) for n in self.steps}
        self.done: queue.Queue[str] = queue.Queue()
        self.stop = threading.Event()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        # threads kept warm: starting one per step cost ~8 ms of the step's start on a busy 2-CPU machine
        self.pool = ThreadPoolExecutor(max_workers=max(1, min(32, len(pipe.steps))), thread_name_prefix="step")
        self.cpus, self.gpus = _machine()
        self.memory = _memory_bytes()
        self.used_cpu, self.used_gpu, self.used_mem = 0.0, 0, 0
        (home / "runs" / run_id).mkdir(parents=True, exist_ok=True)

    # scheduling -------------------------------------------------------------------------------------------------
    def execute(self) -> None:
        running: set[str] = set()
        pending = list(self.pipe.order())
        while pending or running:
            for name in list(pending):
                state = self._readiness(name)
                if state == "wait" or (state == "run" and not self._fits(self.steps[name], running)):
                    continue
                pending.remove(name)
                if state == "blocked":
                    self._finish_without_running(name, "not_run", "an upstream step failed or did not run")
                elif state == "skip":
                    self._finish_without_running(name, "skipped", self._skip_reason(name))
                else:
                    self._take(self.steps[name], +1)
                    running.add(name)
                    self.pool.submit(self._run_step, name)
            if not running:
                continue
            finished = self.done.get()
            running.discard(finished)
            self._take(self.steps[finished], -1)

    def _readiness(self, name: str) -> str:
        res = self.results
        if any(res[d].status in ("failed", "not_run") for d in self.deps[name]):
            return "blocked"
        if not all(res[d].status in ("succeeded", "cached", "skipped") for d in self.deps[name]):
            return "wait"
        if res[name].ready_at == 0.0:
            res[name].ready_at = max((res[d].ended_at for d in self.deps[name]), default=time.monotonic())
        if any(res[d].status == "skipped" for d in self.deps[name]):
            return "skip"   # Argo omits what depends on an omitted task; so do we
        step = self.steps[name]
        if step.when and not parse_condition(step.when, name).holds(lambda t: self.render(step, t)):
            return "skip"
        return "run"

    def _fits(self, step: Step, running: set[str]) -> bool:
        if not running:
            return True   # a step asking more than the machine has runs alone
        gpu_ok = step.resources.gpu == 0 or self.used_gpu + step.resources.gpu <= self.gpus
        mem_ok = self.used_mem + min(_quantity(step.resources.memory), self.memory) <= self.memory
        return gpu_ok and mem_ok and self.used_cpu + min(step.resources.cpu, self.cpus) <= self.cpus + 1e-9

    def _skip_reason(self, name: str) -> str:
        skipped = [d for d in sorted(self.deps[name]) if self.results[d].status == "skipped"]
        if skipped:
            return f"upstream step {skipped[0]!r} was skipped"
        when = str(self.steps[name].when)
        return f"condition {when!r} is false ({self.render(self.steps[name], when)})"

    def _take(self, step: Step, sign: int) -> None:
        self.used_cpu += sign * min(step.resources.cpu, self.cpus)
        self.used_gpu += sign * step.resources.gpu
        self.used_mem += sign * min(_quantity(step.resources.memory), self.memory)

    def _finish_without_running(self, name: str, status: str, why: str) -> None:
        r = self.results[name]
        r.status, r.message, r.ended_at = status, why, time.monotonic()
        self.store.set_step(self.run_id, name, status=status, message=why, ready=time.time())
        self.progress(f"  {'-' if status == 'skipped' else 'x'} {name:<20} {status}: {why}")

    # one step ---------------------------------------------------------------------------------------------------
    def render(self, step: Step, text: str, paths: dict[str, dict[str, Path]] | None = None) -> str:
        """`text` with its placeholders replaced (paths: 'outputs'/'results' of this attempt)."""
        out = text
        for kind, name in placeholders(text):
            if kind == "params":
                value = str(self.params[name])
            elif kind == "inputs":
                src, _, art = step.inputs[name].partition(".")
                value = str(self.results[src].artifacts[art])
            elif kind == "steps":
                src, _, par = name.partition(".")
                value = self.results[src].results.get(par, "")
            else:
                if paths is None:
                    raise PipelineError(f"{{{kind}.{name}}} cannot be used here", step=step.name, field="when")
                value = str(paths[kind][name])
            out = out.replace(f"{{{kind}.{name}}}", value)
        return out

    def _key(self, step: Step) -> str:
        inputs = {local: self.results[ref.split(".", 1)[0]].hashes[ref.split(".", 1)[1]]
                  for local, ref in step.inputs.items()}
        upstream = {f"{k}.{n}": self.render(step, "{" + k + "." + n + "}")
                    for _, t in step.texts() for k, n in placeholders(t) if k in ("params", "steps")}
        for name, spec in self.pipe.params.items():
            if spec.type == "path" and f"params.{name}" in upstream:
                upstream[f"params.{name}#content"] = content_hash(self.workdir / str(self.params[name]))
        return cache_key(step, inputs, upstream, self.workdir)

    def _run_step(self, name: str) -> None:
        step, r = self.steps[name], self.results[name]
        try:
            if name in self.reuse:
                self._adopt(r, self.reuse[name], "reused from the retried run")
                return
            key = self._key(step)
            hit = self.store.cache_get(key) if step.cache else None
            if hit is not None:
                r.results = dict(hit.results)
                r.artifacts = {k: Path(p) for k, (p, _) in hit.artifacts.items()}
                r.hashes = {k: h for k, (_, h) in hit.artifacts.items()}
                r.status, r.cached = "cached", True
                r.started_at = r.ended_at = time.monotonic()
                self._record(r, key)
                self.progress(f"  = {name:<20} cached")
                return
            self._attempts(step, r, key)
        except Exception as exc:   # a bug or an unreadable input: the step fails, the run goes on
            logger.exception("step %s", name)
            r.status, r.failure, r.message = "failed", r.failure or "code", r.message or str(exc)
            self._record(r, None)
        finally:
            self.done.put(name)

    def _adopt(self, r: StepResult, old: StepResult, why: str) -> None:
        r.results, r.artifacts, r.hashes = dict(old.results), dict(old.artifacts), dict(old.hashes)
        r.status, r.cached, r.message = "cached", True, why
        r.started_at = r.ended_at = time.monotonic()
        self._record(r, None)
        self.progress(f"  = {r.name:<20} {why}")

    def _attempts(self, step: Step, r: StepResult, key: str) -> None:
        log = self.home / "runs" / self.run_id / f"{step.name}.log"
        r.log = log
        while True:
            r.attempts += 1
            scratch = self.home / "artifacts" / f"{SCRATCH}{os.getpid()}-{key[:16]}-{uuid.uuid4().hex[:8]}"
            paths = {"outputs": {a: scratch / "outputs" / a for a in step.outputs.artifacts},
                     "results": {p: scratch / "results" / p for p in step.outputs.params}}
            (scratch / "outputs").mkdir(parents=True)
            (scratch / "results").mkdir()
            self.store.set_step(self.run_id, step.name, status="running", attempts=r.attempts, cache_key=key,
                                started=time.time(), log=str(log))
            self.progress(f"  > {step.name:<20} running" + (f" (attempt {r.attempts})" if r.attempts > 1 else ""))
            t0 = time.monotonic()
            failure, message = self._spawn(step, r, paths, scratch, log)
            r.seconds = time.monotonic() - t0
            if failure is None:
                self._commit(step, r, key, scratch, paths)
                self.progress(f"  + {step.name:<20} succeeded in {r.seconds:.1f} s")
                return
            shutil.rmtree(scratch, ignore_errors=True)
            r.failure, r.message = failure, message
            if self.stop.is_set():   # the runner is stopping: the step did not fail, it was stopped
                r.status, r.message = "interrupted", "the runner was stopped while this step ran"
                self._record(r, key)
                return
            retry = step.retry
            if r.attempts > retry.limit or failure not in retry.on or self.stop.is_set():
                r.status = "failed"
                r.message = f"{message}\n--- last lines of {log} ---\n{_tail(log)}"
                self._record(r, key)
                self.progress(f"  x {step.name:<20} failed ({failure}): {message}")
                return
            delay = retry.delay(r.attempts)
            self.progress(f"  ! {step.name:<20} {failure} failure ({message}); retry in {delay:.1f} s")
            if self.stop.wait(delay):
                r.status = "failed"
                self._record(r, key)
                return

    def _argv(self, step: Step, paths: dict[str, dict[str, Path]], scratch: Path) -> list[str]:
        if step.command is not None:
            argv = [self.render(step, a, paths) for a in step.command]
            # `python` and `tandem` mean this runner's interpreter and Tandem (a venv need not be on PATH)
            if argv[0] in ("python", "python3"):
                argv[0] = sys.executable
            elif argv[0] == "tandem":
                argv[:1] = [sys.executable, "-m", "tandem.cli"]
            return argv
        argv = [sys.executable, "-m", "tandem.pipeline.call", str(step.function),
                "--results-dir", str(scratch / "results")]
        for k, v in step.args.items():
            argv += ["--arg", f"{k}={self.render(step, v, paths) if isinstance(v, str) else v}"]
        return argv

    def _spawn(self, step: Step, r: StepResult, paths: dict[str, dict[str, Path]], scratch: Path,
               log: Path) -> tuple[str | None, str]:
        argv = self._argv(step, paths, scratch)
        if shutil.which(argv[0], path=None if os.sep not in argv[0] else "") is None and not (
                self.workdir / argv[0]).is_file():
            return "code", f"cannot start {argv[0]!r}: no such program on PATH or in {self.workdir}"
        env = dict(os.environ)
        env.update({k: self.render(step, v, paths) for k, v in step.env.items()})
        env["PYTHONPATH"] = os.pathsep.join([str(self.workdir), *filter(None, [env.get("PYTHONPATH")])])
        env.update(TANDEM_PIPELINE_RUN=self.run_id, TANDEM_PIPELINE_STEP=step.name)
        with log.open("ab") as out:
            out.write(f"=== {datetime.now(UTC).isoformat()} attempt {r.attempts}: {argv}\n".encode())
            out.flush()
            try:
                proc = _popen(argv, cwd=self.workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, start_new_session=True)
                self.procs[step.name] = proc
                r.started_at = time.monotonic()
            except OSError as exc:
                r.ended_at = time.monotonic()
                return "code", f"cannot start {argv[0]!r}: {exc}"
            try:
                rc = proc.wait(timeout=step.timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                return "timeout", f"ran over its timeout of {step.timeout_s:g} s"
            finally:
                r.ended_at = time.monotonic()
                self.procs.pop(step.name, None)
        if rc != 0:
            return _classify(rc)
        missing = [f"outputs.{a}" for a, p in paths["outputs"].items() if not p.exists()]
        missing += [f"results.{p}" for p, f in paths["results"].items() if not f.exists()]
        if missing:
            return "code", f"exited 0 but did not write {', '.join(missing)}"
        return None, ""

    def _commit(self, step: Step, r: StepResult, key: str, scratch: Path, paths: dict[str, dict[str, Path]]) -> None:
        final = self.home / "artifacts" / key
        if final.exists():   # a concurrent or earlier identical run already produced it
            shutil.rmtree(final)
        os.replace(scratch, final)
        r.results = {p: (final / "results" / p).read_text().strip() for p in paths["results"]}
        r.artifacts = {a: final / "outputs" / a for a in paths["outputs"]}
        r.hashes = {a: content_hash(p) for a, p in r.artifacts.items()}
        r.status = "succeeded"
        if step.cache:
            self.store.cache_put(key, step.name, final, r.results,
                                 {a: (str(p), r.hashes[a]) for a, p in r.artifacts.items()})
        self._record(r, key)

    def _record(self, r: StepResult, key: str | None) -> None:
        self.store.set_step(self.run_id, r.name, status=r.status, cached=r.cached, attempts=r.attempts,
                            cache_key=key, ended=time.time(), failure=r.failure if r.status == "failed" else None,
                            message=r.message, log=str(r.log) if r.log else None,
                            log_tail=_tail(r.log) if r.log and r.status == "failed" else "")
        arts = {a: (str(p), r.hashes.get(a, ""), _size(p)) for a, p in r.artifacts.items()}
        self.store.record_outputs(self.run_id, r.name, r.results, arts)


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
# util-linux's setpriv sets the parent-death signal and execs the step: the Popen stays a vfork (0.4 ms); a
# Python preexec_fn forces a fork and costs ~7 ms per step start on 2 CPUs (measured), so it is the fallback.
_SETPRIV = shutil.which("setpriv")


def _die_with_runner() -> None:
    """In the child before exec: SIGTERM it when the runner dies (kill -9 included), so no step is orphaned."""
    if _LIBC is not None:
        _LIBC.prctl(1, int(signal.SIGTERM), 0, 0, 0)   # PR_SET_PDEATHSIG


def _popen(argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
    if _SETPRIV is not None:
        return subprocess.Popen([_SETPRIV, "--pdeathsig", "TERM", "--", *argv], **kwargs)  # type: ignore[call-overload, no-any-return]
    return subprocess.Popen(argv, preexec_fn=_die_with_runner, **kwargs)  # type: ignore[call-overload, no-any-return]  # noqa: PLW1509


def _classify(rc: int) -> tuple[str, str]:
    if rc < 0:
        sig = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        kind = "infra" if -rc in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP) else "code"
        return kind, f"killed by {sig}" + (" (out of memory or stopped from outside)" if kind == "infra" else "")
    if rc in (137, 143):   # a shell's report of SIGKILL / SIGTERM of its child
        return "infra", f"exit code {rc} (killed: out of memory or stopped from outside)"
    return "code", f"exit code {rc}"


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(log: Path | None) -> str:
    if log is None or not log.exists():
        return ""
    with log.open("rb") as f:
        f.seek(max(0, log.stat().st_size - _TAIL_BYTES))
        return f.read().decode(errors="replace")


def _size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0


def sweep_scratch(home: Path) -> list[Path]:
    """Remove the scratch folders of runners that died mid-step (kill -9 leaves them); a live runner's stay."""
    removed = []
    for folder in (home / "artifacts").glob(f"{SCRATCH}*"):
        pid = folder.name[len(SCRATCH):].split("-", 1)[0]
        if pid.isdigit() and pid_alive(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def run_pipeline(pipe: Pipeline, params: dict[str, object] | None = None, home: Path | None = None, *,
                 run_id: str | None = None, trigger: str = "manual", file: str | None = None,
                 progress: Callable[[str], None] | None = None,
                 reuse: dict[str, StepResult] | None = None) -> RunResult:
    """Run `pipe` here and return what every step did; the history goes to ``HOME/history.sqlite``."""
    pipe.validate_dag()
    values = pipe.resolve_params(params)
    for name, spec in pipe.params.items():
        where = Path(pipe.workdir or Path.cwd()) / str(values[name])
        if spec.type == "path" and not where.exists():
            raise PipelineError(f"path parameter {name!r}: {where} does not exist", field=f"params.{name}")
    home = Path(home or default_home()).resolve()
    store = Store(home)
    run_id = run_id or new_run_id(pipe.name)
    say = progress or (lambda line: None)
    try:
        store.mark_orphans()
        sweep_scratch(home)
        store.start_run(run_id, pipe.name, file, dict(values), trigger)
        run = _Run(pipe, values, home, run_id, store, say, reuse or {})
        t0 = time.monotonic()
        say(f"run {run_id} of pipeline {pipe.name!r} ({len(pipe.steps)} steps, history in {home})")
        try:
            run.execute()
        except BaseException:
            run.stop.set()
            for proc in list(run.procs.values()):
                _kill_group(proc)
            run.pool.shutdown(wait=True, cancel_futures=True)   # their last writes go in before the close
            store.end_run(run_id, "interrupted", "the runner was stopped (SIGINT/SIGTERM)")
            raise
        run.pool.shutdown(wait=True)
        status = "failed" if any(r.status == "failed" for r in run.results.values()) else "succeeded"
        store.end_run(run_id, status)
        return RunResult(run_id, pipe.name, status, run.results, time.monotonic() - t0)
    finally:
        store.close()


def retry_run(run_id: str, home: Path | None = None, progress: Callable[[str], None] | None = None) -> RunResult:
    """Run again the failed, interrupted and not-run steps of `run_id`; its succeeded steps are reused."""
    from tandem.pipeline.spec import load_pipeline

    home = Path(home or default_home()).resolve()
    store = Store(home)
    try:
        store.mark_orphans()
        old = store.run(run_id)
        if old is None:
            raise PipelineError(f"no run {run_id!r} in {home} (see `tandem pipeline list`)")
        if not old.file:
            raise PipelineError(f"run {old.id} was not started from a file; run its pipeline again instead")
        reuse: dict[str, StepResult] = {}
        for row in store.steps(old.id):
            if row.status in ("succeeded", "cached"):
                res, arts = store.outputs(old.id, row.name)
                reuse[row.name] = StepResult(row.name, results=res, artifacts={k: Path(p) for k, (p, _) in
                                                                                arts.items()},
                                             hashes={k: h for k, (_, h) in arts.items()})
    finally:
        store.close()
    pipe = load_pipeline(old.file)
    return run_pipeline(pipe, old.params, home, trigger=f"retry:{old.id}", file=old.file, progress=progress,
                        reuse=reuse)


def results_json(result: RunResult) -> str:
    """A run as JSON (for `--json` output and tests)."""
    return json.dumps({"run_id": result.run_id, "pipeline": result.pipeline, "status": result.status,
                       "seconds": round(result.seconds, 3),
                       "steps": {n: {"status": r.status, "attempts": r.attempts, "seconds": round(r.seconds, 3),
                                     "results": r.results, "artifacts": {k: str(v) for k, v in r.artifacts.items()},
                                     "failure": r.failure, "message": r.message}
                                 for n, r in result.steps.items()}}, indent=2)
