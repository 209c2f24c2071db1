"""The process behind ``tandem pipeline schedule``: cron schedules, watched folders and an HTTP trigger start runs.

A `Scheduler` loads pipeline files and, on each `Scheduler.tick`, starts the runs that are due through a `launch`
callable (by default `default_launch`: a detached ``python -m tandem.cli pipeline run ...``). Its state lives in
``HOME/scheduler-state.json``, written atomically; one scheduler at a time may use a home (a lock file).

Cron. Each (pipeline, cron, time zone) remembers the last fire time it dealt with. The state is written *before*
the run is launched, so a crash can lose a run but never double one. A schedule seen for the first time counts
from that moment (nothing in the past fires). A fire is launched if a tick sees it at most
``max(catch_up_s, 60 s)`` after its time; fires missed for longer (the scheduler was down, the machine slept) are
not replayed. So with the default ``catch_up_s=0`` a restart replays nothing; with ``catch_up_s=3600`` the most
recent fire missed in the last hour runs once. However many fires are due in one tick, at most one run starts.
Daylight-saving behaviour is `tandem.pipeline.cron`'s: never a doubled run, never a skipped one.

Concurrency. ``forbid`` (Argo's concurrencyPolicy: Forbid): while the previous run this scheduler launched for a
pipeline is still going (the launch returned a handle whose ``poll()`` is None), a cron fire is skipped with a
warning, a ready watched file waits for the run to end, and an HTTP trigger answers 409. ``allow`` runs them
side by side. Runs whose launch returned None are not tracked.

Watch. Every ``poll_s`` each folder is listed (relative folders are relative to the pipeline file). Files already
there when a folder is first watched are the baseline and never trigger; the baseline and every file that
triggered are persisted, so a restart triggers nothing old. A new file whose name matches the pattern (fnmatch)
triggers once its size and mtime are the same in two consecutive polls; hidden files and names ending in .tmp
or .part are ignored (write there and rename). A name that disappears is forgotten, so dropping the same name
again is a new file. The absolute path goes to the trigger's ``param``.

HTTP (`Scheduler.serve_http`, a key is required): ``GET /healthz`` (no key), ``GET /pipelines`` and
``POST /pipelines/NAME/runs`` with ``{"params": {...}}`` and ``Authorization: Bearer KEY`` or ``x-api-key: KEY``.
"""

from __future__ import annotations

import fcntl
import fnmatch
import hmac
import json
import logging
import os
import re
import secrets
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal, Protocol, cast
from urllib.parse import unquote, urlsplit

from tandem.pipeline.cron import CronSpec, next_fire, parse_cron, prev_fire, zone
from tandem.pipeline.spec import Pipeline, PipelineError, WatchTrigger, load_pipeline

logger = logging.getLogger(__name__)

__all__ = ["Launch", "LaunchedRun", "Pollable", "Scheduler", "default_launch", "new_run_id"]

STATE_FILE = "scheduler-state.json"
LOCK_FILE = "scheduler.lock"
LOG_DIR = "scheduler-logs"
MAX_BODY = 64 * 1024
_ON_TIME_S = 60.0         # a fire seen this late is still on time (a busy tick), not a missed one
_DRAIN_LIMIT = 1 << 20    # unread request bodies up to this are read before replying, so the client sees it
_IGNORED_SUFFIXES = (".tmp", ".part")


class Pollable(Protocol):
    """What a launch may return to be tracked for concurrency: ``poll()`` is None while the run goes on."""

    def poll(self) -> int | None: ...


# (pipeline file, params, trigger kind "cron" | "watch" | "http", run id) -> a handle to track, or None
Launch = Callable[[Path, dict[str, str], str, str], Pollable | None]


@dataclass(frozen=True)
class LaunchedRun:
    """A run the scheduler started; `scheduled` is the cron fire time, or the launch time for other triggers."""

    pipeline: str
    file: Path
    run_id: str
    trigger: str
    params: dict[str, str]
    scheduled: datetime


@dataclass
class _Entry:
    file: Path
    pipeline: Pipeline


@dataclass
class _Cron:
    pipeline: str
    key: str
    spec: CronSpec
    tz: tzinfo
    timezone: str


@dataclass
class _Watch:
    pipeline: str
    key: str
    folder: Path
    trigger: WatchTrigger
    pending: dict[str, tuple[int, int]] = field(default_factory=dict)   # name -> (size, mtime_ns) last poll
    missing_logged: bool = False


def _utcnow() -> datetime:
    return datetime.now(UTC)


def new_run_id(pipeline: str, at: datetime) -> str:
    """``NAME-YYYYmmdd-HHMMSS-xxxx`` (UTC time, 4 random hex digits)."""
    return f"{pipeline}-{at.astimezone(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def default_launch(file: Path, params: dict[str, str], trigger: str, run_id: str, *,
                   home: Path) -> subprocess.Popen[bytes]:
    """Start ``tandem pipeline run`` for `file` detached (own session), output to HOME/scheduler-logs/RUN.log."""
    argv = [sys.executable, "-m", "tandem.cli", "pipeline", "run", str(file), "--home", str(home),
            "--run-id", run_id, "--trigger", trigger]
    for k, v in sorted(params.items()):
        argv += ["--param", f"{k}={v}"]
    logs = home / LOG_DIR
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{run_id}.log", "ab") as log:
        # a new session: a Ctrl-C or SIGTERM meant for the scheduler does not reach the runs it started
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    logger.info("started run %s (pid %d): %s", run_id, proc.pid, shlex.join(argv))
    return proc


class Scheduler:
    """Starts pipeline runs from cron schedules, watched folders and HTTP requests (see the module docstring).

    >>> s = Scheduler([Path("nightly.yaml")], Path("~/.tandem/pipelines").expanduser())  # doctest: +SKIP
    >>> s.serve_http(port=8770, key=os.environ["TANDEM_PIPELINE_KEY"])                    # doctest: +SKIP
    >>> s.run_forever(threading.Event())                                                   # doctest: +SKIP

    Tests drive `tick` with a fake `now` and a fake `launch`.
    """

    def __init__(self, files: Sequence[Path], home: Path, *, launch: Launch | None = None,
                 now: Callable[[], datetime] = _utcnow, poll_s: float = 2.0, catch_up_s: float = 0.0,
                 concurrency: Literal["forbid", "allow"] = "forbid") -> None:
        if poll_s <= 0:
            raise ValueError(f"poll_s must be > 0 seconds, got {poll_s}")
        if catch_up_s < 0:
            raise ValueError(f"catch_up_s must be >= 0 seconds (0 = never replay missed fires), got {catch_up_s}")
        if concurrency not in ("forbid", "allow"):
            raise ValueError(f"concurrency must be 'forbid' or 'allow', got {concurrency!r}")
        self.home, self.poll_s, self.catch_up_s, self.concurrency = home, poll_s, catch_up_s, concurrency
        self._pipes = _load_all(files)
        self._http: _Server | None = None
        self._http_thread: threading.Thread | None = None
        home.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_home(home)
        try:
            self._setup(launch, now)
        except BaseException:
            self.close()
            raise

    def _setup(self, launch: Launch | None, now: Callable[[], datetime]) -> None:
        home = self.home
        self._launch: Launch = launch or partial(default_launch, home=home)
        self._now = now
        self._mutex = threading.RLock()
        self._running: dict[str, list[Pollable]] = {}
        self._last, self._known = _load_state(home / STATE_FILE)
        self._crons = [_Cron(n, f"{n}|{s.cron}|{s.timezone}", parse_cron(s.cron), zone(s.timezone), s.timezone)
                       for n, e in self._pipes.items() for s in e.pipeline.schedules]
        self._watches = [_Watch(n, f"{n}|{_folder(e, w)}|{w.pattern}", _folder(e, w), w)
                         for n, e in self._pipes.items() for w in e.pipeline.watch]
        self._last_poll: datetime | None = None
        self._begin(now())

    def _begin(self, start: datetime) -> None:
        """New schedules count from `start`; folders watched for the first time get their baseline."""
        for c in self._crons:
            self._last.setdefault(c.key, start)
        for w in self._watches:
            if w.key not in self._known:
                self._known[w.key] = set(self._scan(w))
        self._save()
        logger.info("scheduling %d pipeline(s) (%s): %d cron schedule(s), %d watched folder(s)",
                    len(self._pipes), ", ".join(self._pipes), len(self._crons), len(self._watches))

    # -- the loop ---------------------------------------------------------------------------------------------

    def tick(self) -> list[LaunchedRun]:
        """One round: the cron fires that are due, then (every `poll_s`) the watched folders; what it started."""
        now = self._now()
        with self._mutex:
            for name in list(self._running):
                self._busy(name)   # reaps finished runs even when nothing new is launched
        runs = [r for c in self._crons if (r := self._tick_cron(c, now)) is not None]
        if self._last_poll is None or (now - self._last_poll).total_seconds() >= self.poll_s:
            self._last_poll = now
            for w in self._watches:
                runs += self._poll_watch(w, now)
        return runs

    def next_due(self) -> datetime | None:
        """The earliest next cron fire over all schedules (None without schedules)."""
        with self._mutex:
            dues = [next_fire(c.spec, c.tz, self._last[c.key]) for c in self._crons]
        return min(dues) if dues else None

    def run_forever(self, stop: threading.Event) -> None:
        """`tick` until `stop` is set, sleeping until the next cron fire or `poll_s`, whichever comes first."""
        while not stop.is_set():
            wait = self.poll_s
            try:
                self.tick()
                due = self.next_due()
                if due is not None:
                    wait = min(wait, (due - self._now()).total_seconds())
            except Exception:   # the loop's boundary: one bad round must not stop every schedule
                logger.exception("scheduler round failed; trying again in %s s", self.poll_s)
            stop.wait(max(wait, 0.01))

    def close(self) -> None:
        """Stop the HTTP trigger (if serving) and release the home's lock."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._http_thread is not None:
            self._http_thread.join(timeout=5)
            self._http_thread = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- triggers ---------------------------------------------------------------------------------------------

    def _tick_cron(self, c: _Cron, now: datetime) -> LaunchedRun | None:
        first = next_fire(c.spec, c.tz, self._last[c.key])
        if first > now:
            return None
        latest = prev_fire(c.spec, c.tz, now)
        with self._mutex:   # recorded before launching: a crash may lose this run, never double it
            self._last[c.key] = latest
            self._save()
        late = (now - latest).total_seconds()
        if late > max(self.catch_up_s, _ON_TIME_S):
            logger.warning("pipeline %s: cron %r fire at %s is %.0f s past; missed fires are not replayed "
                           "(catch_up_s=%s)", c.pipeline, c.spec.expr, latest.isoformat(), late, self.catch_up_s)
            return None
        if first < latest:
            logger.warning("pipeline %s: cron %r missed fires from %s; running only the one at %s",
                           c.pipeline, c.spec.expr, first.isoformat(), latest.isoformat())
        try:
            run = self._start(c.pipeline, {}, "cron", latest)
        except (PipelineError, OSError):
            logger.exception("pipeline %s: cron fire at %s could not start", c.pipeline, latest.isoformat())
            return None
        if run is None:
            logger.warning("pipeline %s: cron fire at %s skipped: the previous run is still going "
                           "(concurrency=forbid)", c.pipeline, latest.isoformat())
        return run

    def _poll_watch(self, w: _Watch, now: datetime) -> list[LaunchedRun]:
        seen = self._scan(w)
        runs: list[LaunchedRun] = []
        with self._mutex:
            known = self._known[w.key]
            changed = bool(known - seen.keys())
            known.intersection_update(seen)   # a name that went away is forgotten: dropping it again is a new file
            w.pending = {n: obs for n, obs in w.pending.items() if n in seen}
            for name in sorted(seen.keys() - known):
                if w.pending.get(name) != seen[name]:   # new, or still being written
                    w.pending[name] = seen[name]
                    continue
                if self.concurrency == "forbid" and self._busy(w.pipeline):
                    continue   # ready, but waits for the running one to end
                known.add(name)
                w.pending.pop(name)
                self._save()
                run = self._start_watch(w, name, now)
                if run is not None:
                    runs.append(run)
            if changed:
                self._save()
        return runs

    def _start_watch(self, w: _Watch, name: str, now: datetime) -> LaunchedRun | None:
        params = {w.trigger.param: str(w.folder / name)} if w.trigger.param else {}
        try:
            run = self._start(w.pipeline, params, "watch", now)
        except (PipelineError, OSError):
            logger.exception("pipeline %s: new file %s could not start a run", w.pipeline, w.folder / name)
            return None
        if run is None:   # not reached under the mutex; kept so a file is never consumed without a run
            self._known[w.key].discard(name)
            self._save()
        return run

    def _scan(self, w: _Watch) -> dict[str, tuple[int, int]]:
        """Matching files in the watched folder: name -> (size, mtime_ns)."""
        try:
            entries = list(os.scandir(w.folder))
        except OSError as exc:
            if not w.missing_logged:
                logger.warning("pipeline %s: cannot list watched folder %s (%s); treating it as empty",
                               w.pipeline, w.folder, exc)
                w.missing_logged = True
            return {}
        w.missing_logged = False
        out: dict[str, tuple[int, int]] = {}
        for e in entries:
            if e.name.startswith(".") or e.name.endswith(_IGNORED_SUFFIXES):
                continue
            if not fnmatch.fnmatch(e.name, w.trigger.pattern):
                continue
            try:
                if e.is_file():
                    st = e.stat()
                    out[e.name] = (st.st_size, st.st_mtime_ns)
            except OSError:   # removed between listing and stat
                continue
        return out

    def _start(self, pipeline: str, params: dict[str, str], trigger: str,
               scheduled: datetime) -> LaunchedRun | None:
        """Launch a run; None if concurrency is forbid and one is still going. PipelineError for bad params."""
        entry = self._pipes[pipeline]
        entry.pipeline.resolve_params(dict(params))
        with self._mutex:
            if self.concurrency == "forbid" and self._busy(pipeline):
                return None
            run_id = new_run_id(pipeline, self._now())
            handle = self._launch(entry.file, params, trigger, run_id)
            if handle is not None:
                self._running.setdefault(pipeline, []).append(handle)
        logger.info("pipeline %s: launched run %s (trigger %s, params %s)", pipeline, run_id, trigger, params)
        return LaunchedRun(pipeline, entry.file, run_id, trigger, dict(params), scheduled)

    def _busy(self, pipeline: str) -> bool:
        alive = [h for h in self._running.get(pipeline, []) if h.poll() is None]
        if alive:
            self._running[pipeline] = alive
        else:
            self._running.pop(pipeline, None)
        return bool(alive)

    def _save(self) -> None:
        data = {"version": 1, "schedules": {k: v.isoformat() for k, v in sorted(self._last.items())},
                "watch": {k: sorted(v) for k, v in sorted(self._known.items())}}
        _write_atomic(self.home / STATE_FILE, json.dumps(data, indent=1))

    # -- HTTP -------------------------------------------------------------------------------------------------

    def serve_http(self, host: str = "127.0.0.1", port: int = 0, key: str | None = None) -> int:
        """Serve the HTTP trigger in a background thread; returns the bound port (`port` 0 picks a free one)."""
        if not key:
            raise ValueError("the HTTP trigger needs an API key: set TANDEM_PIPELINE_KEY or pass --key-file")
        if self._http is not None:
            raise RuntimeError("the HTTP trigger is already being served")
        server = _Server((host, port), self, key)
        self._http = server
        self._http_thread = threading.Thread(target=partial(server.serve_forever, poll_interval=0.1),
                                             name="tandem-pipeline-http", daemon=True)
        self._http_thread.start()
        bound = int(server.server_address[1])
        logger.info("pipeline trigger listening on http://%s:%d", host, bound)
        return bound

    def describe(self) -> list[dict[str, Any]]:
        """Pipelines with their schedules (next fire, ISO in the schedule's zone), watch folders, running state."""
        now = self._now()
        out = []
        for name, e in self._pipes.items():
            schedules = [{"cron": c.spec.expr, "timezone": c.timezone,
                          "next_fire": next_fire(c.spec, c.tz, now).astimezone(c.tz).isoformat()}
                         for c in self._crons if c.pipeline == name]
            watch = [{"folder": str(w.folder), "pattern": w.trigger.pattern, "param": w.trigger.param}
                     for w in self._watches if w.pipeline == name]
            with self._mutex:
                running = self._busy(name)
            out.append({"name": name, "file": str(e.file), "params": sorted(e.pipeline.params),
                        "schedules": schedules, "watch": watch, "running": running})
        return out

    def http_run(self, name: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """Answer ``POST /pipelines/NAME/runs`` (already authorized): status code and JSON payload."""
        if name not in self._pipes:
            return 404, {"error": f"no pipeline {name!r}; known pipelines: {', '.join(sorted(self._pipes))}"}
        try:
            params = _body_params(body)
            run = self._start(name, params, "http", self._now())
        except (ValueError, PipelineError) as exc:   # PipelineError is a ValueError: bad or unknown params
            return 400, {"error": str(exc)}
        except OSError:
            logger.exception("pipeline %s: HTTP trigger could not start a run", name)
            return 500, {"error": "the run could not be started; see the scheduler's log"}
        if run is None:
            return 409, {"error": f"pipeline {name!r} has a run still going (concurrency: forbid); "
                                  "try again when it ends"}
        return 202, {"run_id": run.run_id, "pipeline": name}


def _body_params(body: bytes) -> dict[str, str]:
    """The ``params`` of a JSON body as strings (the runner coerces them); ValueError says what is wrong."""
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise ValueError(f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or set(data) - {"params"}:
        raise ValueError('the body must be a JSON object like {"params": {"NAME": "VALUE"}}')
    params = data.get("params") or {}
    if not isinstance(params, dict):
        raise ValueError('"params" must be an object of NAME: VALUE')
    out: dict[str, str] = {}
    for k, v in params.items():
        if isinstance(v, bool):
            out[k] = "true" if v else "false"
        elif isinstance(v, str | int | float):
            out[k] = str(v)
        else:
            raise ValueError(f"parameter {k!r} must be a string, number or boolean, got {type(v).__name__}")
    return out


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], scheduler: Scheduler, key: str) -> None:
        if ":" in address[0]:   # an IPv6 literal such as ::1
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.scheduler, self.key = scheduler, key.encode()


class _Handler(BaseHTTPRequestHandler):
    server_version = "tandem-pipeline"
    timeout = 10.0   # a silent client does not hold a thread for ever

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    @property
    def _sched(self) -> Scheduler:
        return cast(_Server, self.server).scheduler

    def do_GET(self) -> None:
        path = urlsplit(self.path).path.rstrip("/")
        if path == "/healthz":
            self._reply(200, {"status": "ok"})
        elif self._authorized():
            if path == "/pipelines":
                self._reply(200, {"pipelines": self._sched.describe()})
            else:
                self._reply(404, {"error": f"no route GET {path}; routes: GET /healthz, GET /pipelines, "
                                           "POST /pipelines/NAME/runs"})

    def do_POST(self) -> None:
        if not self._authorized():
            return
        m = re.fullmatch(r"/pipelines/([^/]+)/runs/?", urlsplit(self.path).path)
        if m is None:
            self._discard_body()
            self._reply(404, {"error": "no such route; POST /pipelines/NAME/runs starts a run"})
            return
        body = self._body()
        if body is not None:
            self._reply(*self._sched.http_run(unquote(m.group(1)), body))

    def _authorized(self) -> bool:
        given = self.headers.get("x-api-key") or ""
        auth = self.headers.get("Authorization") or ""
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        # header text is latin-1 decoded; encoding it back gives the bytes the client sent
        if given and hmac.compare_digest(given.encode("latin-1", "replace"), cast(_Server, self.server).key):
            return True
        self._discard_body()
        self._reply(401, {"error": "missing or wrong API key; send 'Authorization: Bearer KEY' or 'x-api-key: KEY'"},
                    {"WWW-Authenticate": "Bearer"})
        return False

    def _length(self) -> int:
        try:
            return max(0, int(self.headers.get("Content-Length") or 0))
        except ValueError:
            return 0

    def _body(self) -> bytes | None:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self._reply(411, {"error": "send the body with a Content-Length header"})
            return None
        length = self._length()
        if length > MAX_BODY:
            self._discard_body()
            self._reply(413, {"error": f"the body is {length} bytes; the limit is {MAX_BODY}"})
            return None
        return self.rfile.read(length)

    def _discard_body(self) -> None:
        """Read an unwanted body (bounded) so closing the socket does not reset it before the client reads."""
        left = min(self._length(), _DRAIN_LIMIT)
        while left > 0:
            chunk = self.rfile.read(min(left, 65536))
            if not chunk:
                break
            left -= len(chunk)

    def _reply(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


# -- files ------------------------------------------------------------------------------------------------------

def _load_all(files: Sequence[Path]) -> dict[str, _Entry]:
    out: dict[str, _Entry] = {}
    for f in files:
        path = Path(f).expanduser().resolve()
        pipe = load_pipeline(path)
        if pipe.name in out:
            raise PipelineError(f"pipeline {pipe.name!r} is defined by both {out[pipe.name].file} and {path}; "
                                "pipeline names must be unique")
        out[pipe.name] = _Entry(path, pipe)
    if not out:
        raise ValueError("give at least one pipeline file to schedule")
    return out


def _folder(e: _Entry, w: WatchTrigger) -> Path:
    """The watched folder, relative ones taken from the pipeline file's folder."""
    folder = Path(w.folder).expanduser()
    return (folder if folder.is_absolute() else e.file.parent / folder).resolve()


def _lock_home(home: Path) -> int:
    """Hold an exclusive lock on HOME/scheduler.lock: two schedulers on one home would double every run."""
    fd = os.open(home / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(f"another scheduler is already running with home {home}; stop it or use another "
                           "--home") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _load_state(path: Path) -> tuple[dict[str, datetime], dict[str, set[str]]]:
    try:
        raw = json.loads(path.read_text())
        last = {str(k): datetime.fromisoformat(v) for k, v in raw.get("schedules", {}).items()}
        known = {str(k): {str(n) for n in v} for k, v in raw.get("watch", {}).items()}
    except FileNotFoundError:
        return {}, {}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        logger.warning("ignoring unreadable %s (%s): schedules count from now, watched folders get a new "
                       "baseline", path, exc)
        return {}, {}
    return {k: v if v.tzinfo else v.replace(tzinfo=UTC) for k, v in last.items()}, known


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
