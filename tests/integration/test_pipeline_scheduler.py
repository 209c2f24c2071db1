"""The pipeline scheduler: cron fires on a fake clock, persisted state, concurrency, watched folders, HTTP."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import yaml

from tandem.pipeline import scheduler as sched_mod
from tandem.pipeline.scheduler import LaunchedRun, Scheduler, default_launch, new_run_id
from tandem.pipeline.spec import PipelineError
from tests.conftest import free_port

NY = "America/New_York"


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


class Clock:
    """A settable clock for `Scheduler(now=...)`."""

    def __init__(self, start: str) -> None:
        self.t = utc(start)

    def __call__(self) -> datetime:
        return self.t

    def advance(self, **delta: float) -> None:
        self.t += timedelta(**delta)


@dataclass
class Proc:
    """A fake run handle: running until `done` is set."""

    done: bool = False

    def poll(self) -> int | None:
        return 0 if self.done else None


@dataclass
class Launcher:
    """A fake launch that records its calls; `track` makes it return a handle the scheduler follows."""

    track: bool = False
    calls: list[tuple[Path, dict[str, str], str, str]] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)

    def __call__(self, file: Path, params: dict[str, str], trigger: str, run_id: str) -> Proc | None:
        self.calls.append((file, params, trigger, run_id))
        if not self.track:
            return None
        self.procs.append(Proc())
        return self.procs[-1]


def write_pipeline(folder: Path, name: str = "p", schedules: list[dict[str, str]] | None = None,
                   watch: list[dict[str, str]] | None = None, params: dict[str, Any] | None = None) -> Path:
    data: dict[str, Any] = {"name": name, "steps": [{"name": "a", "command": ["echo", "hi"]}],
                            "params": params if params is not None else {"file": {"type": "str", "default": ""}}}
    if schedules:
        data["schedules"] = schedules
    if watch:
        data["watch"] = watch
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def run_clock(s: Scheduler, clock: Clock, until: str, step_min: float) -> list[LaunchedRun]:
    runs: list[LaunchedRun] = []
    while clock.t < utc(until):
        clock.advance(minutes=step_min)
        runs += s.tick()
    return runs


def stamps(runs: list[LaunchedRun]) -> list[str]:
    return [r.scheduled.strftime("%m-%d %H:%M") for r in runs]


# -- cron ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("cron", "start", "until", "expected"), [
    # spring forward: 02:30 does not exist on 03-08, so that day runs at 03:00 EDT (07:00Z)
    ("30 2 * * *", "2026-03-06 12:00", "2026-03-10 12:00", ["03-07 07:30", "03-08 07:00", "03-09 06:30",
                                                            "03-10 06:30"]),
    # fall back: 01:30 happens twice on 11-01, it runs once (EDT)
    ("30 1 * * *", "2026-10-30 12:00", "2026-11-02 12:00", ["10-31 05:30", "11-01 05:30", "11-02 06:30"]),
])
def test_cron_fires_across_dst_once_a_day(tmp_path: Path, home: Path, cron: str, start: str, until: str,
                                          expected: list[str]) -> None:
    clock, launch = Clock(start), Launcher()
    file = write_pipeline(tmp_path, schedules=[{"cron": cron, "timezone": NY}])
    with Scheduler([file], home, launch=launch, now=clock) as s:
        runs = run_clock(s, clock, until, step_min=10)
    assert stamps(runs) == expected
    assert [c[2] for c in launch.calls] == ["cron"] * len(expected)
    assert all(c[0] == file.resolve() and c[1] == {} for c in launch.calls)
    assert all(re.fullmatch(r"p-\d{8}-\d{6}-[0-9a-f]{4}", c[3]) for c in launch.calls)


def test_state_survives_a_restart(tmp_path: Path, home: Path) -> None:
    clock, launch = Clock("2026-06-01 07:00"), Launcher()
    file = write_pipeline(tmp_path, schedules=[{"cron": "30 7 * * *", "timezone": "UTC"}])
    with Scheduler([file], home, launch=launch, now=clock) as s:
        assert s.next_due() == utc("2026-06-01 07:30")
        clock.advance(minutes=30)
        assert stamps(s.tick()) == ["06-01 07:30"]
    state = json.loads((home / "scheduler-state.json").read_text())
    assert state["schedules"] == {"p|30 7 * * *|UTC": "2026-06-01T07:30:00+00:00"}
    clock.advance(seconds=20)
    with Scheduler([file], home, launch=launch, now=clock) as s:   # a restart right after: no re-fire
        assert s.tick() == []
        assert stamps(run_clock(s, clock, "2026-06-02 08:00", step_min=15)) == ["06-02 07:30"]
    assert len(launch.calls) == 2


def test_a_restart_within_a_minute_of_a_fire_still_runs_it(tmp_path: Path, home: Path) -> None:
    clock, launch = Clock("2026-06-01 07:29"), Launcher()
    file = write_pipeline(tmp_path, schedules=[{"cron": "30 7 * * *", "timezone": "UTC"}])
    Scheduler([file], home, launch=launch, now=clock).close()
    clock.advance(minutes=1, seconds=30)   # down over 07:30, back at 07:30:30
    with Scheduler([file], home, launch=launch, now=clock) as s:
        assert stamps(s.tick()) == ["06-01 07:30"]


def test_missed_fires_are_not_replayed_unless_catch_up(tmp_path: Path, home: Path) -> None:
    clock, launch = Clock("2026-06-01 00:00"), Launcher()
    file = write_pipeline(tmp_path, schedules=[{"cron": "0 * * * *", "timezone": "UTC"}])
    Scheduler([file], home, launch=launch, now=clock).close()
    clock.advance(hours=5, minutes=10)   # down for five fires
    with Scheduler([file], home, launch=launch, now=clock) as s:
        assert s.tick() == []
        assert s.next_due() == utc("2026-06-01 06:00")
    clock.advance(hours=3)   # down again over 06:00, 07:00, 08:00; catch up the latest within an hour
    with Scheduler([file], home, launch=launch, now=clock, catch_up_s=3600) as s:
        assert stamps(s.tick()) == ["06-01 08:00"]
        assert s.tick() == []
    assert len(launch.calls) == 1


def test_a_new_schedule_does_not_fire_for_the_past(tmp_path: Path, home: Path) -> None:
    clock, launch = Clock("2026-06-01 07:31"), Launcher()
    file = write_pipeline(tmp_path, schedules=[{"cron": "30 7 * * *", "timezone": "UTC"}])
    with Scheduler([file], home, launch=launch, now=clock, catch_up_s=86400) as s:
        assert s.tick() == []
        assert s.next_due() == utc("2026-06-02 07:30")


def test_forbid_skips_a_fire_while_the_last_run_goes_on(tmp_path: Path, home: Path) -> None:
    clock, launch = Clock("2026-06-01 10:00"), Launcher(track=True)
    file = write_pipeline(tmp_path, schedules=[{"cron": "*/15 * * * *", "timezone": "UTC"}])
    with Scheduler([file], home, launch=launch, now=clock) as s:
        clock.advance(minutes=15)
        assert stamps(s.tick()) == ["06-01 10:15"]
        clock.advance(minutes=15)
        assert s.tick() == []                       # 10:30 skipped: 10:15 is still running
        assert s.next_due() == utc("2026-06-01 10:45")
        launch.procs[0].done = True
        clock.advance(minutes=15)
        assert stamps(s.tick()) == ["06-01 10:45"]


def test_allow_runs_side_by_side(tmp_path: Path, home: Path) -> None:
    clock, launch = Clock("2026-06-01 10:00"), Launcher(track=True)
    file = write_pipeline(tmp_path, schedules=[{"cron": "*/15 * * * *", "timezone": "UTC"}])
    with Scheduler([file], home, launch=launch, now=clock, concurrency="allow") as s:
        assert stamps(run_clock(s, clock, "2026-06-01 10:30", step_min=15)) == ["06-01 10:15", "06-01 10:30"]


def test_a_cron_pipeline_with_a_required_param_logs_and_skips(tmp_path: Path, home: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    clock, launch = Clock("2026-06-01 10:00"), Launcher()
    file = write_pipeline(tmp_path, schedules=[{"cron": "*/15 * * * *", "timezone": "UTC"}],
                          params={"data": {"type": "path"}})
    with Scheduler([file], home, launch=launch, now=clock) as s:
        clock.advance(minutes=15)
        assert s.tick() == []
    assert launch.calls == [] and "parameter 'data' has no default" in caplog.text


def test_one_scheduler_per_home_and_unique_names(tmp_path: Path, home: Path) -> None:
    file = write_pipeline(tmp_path)
    with Scheduler([file], home, launch=Launcher()):
        with pytest.raises(RuntimeError, match="another scheduler is already running"):
            Scheduler([file], home, launch=Launcher())
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(PipelineError, match="pipeline 'p' is defined by both"):
        Scheduler([file, write_pipeline(other)], tmp_path / "home2", launch=Launcher())


# -- watched folders ----------------------------------------------------------------------------------------------

@pytest.fixture
def inbox(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "inbox"
    folder.mkdir()
    (folder / "old.csv").write_text("a,b\n")
    yield folder


def watch_scheduler(tmp_path: Path, home: Path, launch: Launcher, clock: Clock, **kw: Any) -> Scheduler:
    file = write_pipeline(tmp_path, watch=[{"folder": "inbox", "pattern": "*.csv", "param": "file"}])
    return Scheduler([file], home, launch=launch, now=clock, poll_s=2, **kw)


def polls(s: Scheduler, clock: Clock, n: int) -> list[LaunchedRun]:
    runs: list[LaunchedRun] = []
    for _ in range(n):
        clock.advance(seconds=2)
        runs += s.tick()
    return runs


def test_watch_new_file_triggers_once_with_its_path(tmp_path: Path, home: Path, inbox: Path) -> None:
    clock, launch = Clock("2026-06-01 10:00"), Launcher()
    with watch_scheduler(tmp_path, home, launch, clock) as s:
        assert polls(s, clock, 3) == []                                 # the baseline never triggers
        for name in (".hidden.csv", "b.csv.part", "c.csv.tmp", "notes.txt"):
            (inbox / name).write_text("x")
        (inbox / "sub.csv").mkdir()
        (inbox / "new.csv").write_text("1,2\n")
        assert s.tick() == []                                          # no poll before poll_s has passed
        assert polls(s, clock, 1) == []                                # first seen: might be half-written
        runs = polls(s, clock, 1)
        assert [(r.trigger, r.params) for r in runs] == [("watch", {"file": str((inbox / "new.csv").resolve())})]
        assert polls(s, clock, 3) == []
    assert len(launch.calls) == 1


def test_watch_waits_for_a_half_written_file(tmp_path: Path, home: Path, inbox: Path) -> None:
    clock, launch = Clock("2026-06-01 10:00"), Launcher()
    with watch_scheduler(tmp_path, home, launch, clock) as s:
        with open(inbox / "big.csv", "w") as f:
            f.write("a" * 10)
            f.flush()
            assert polls(s, clock, 1) == []
            f.write("b" * 10)
            f.flush()
            assert polls(s, clock, 1) == []                            # it grew: still being written
        assert [r.params["file"] for r in polls(s, clock, 1)] == [str((inbox / "big.csv").resolve())]


def test_watch_restart_does_not_retrigger_and_new_files_still_do(tmp_path: Path, home: Path,
                                                                 inbox: Path) -> None:
    clock, launch = Clock("2026-06-01 10:00"), Launcher()
    with watch_scheduler(tmp_path, home, launch, clock) as s:
        (inbox / "new.csv").write_text("1")
        assert len(polls(s, clock, 2)) == 1
    (inbox / "later.csv").write_text("2")   # dropped while the scheduler is down
    with watch_scheduler(tmp_path, home, launch, clock) as s:
        runs = polls(s, clock, 4)
    assert [Path(r.params["file"]).name for r in runs] == ["later.csv"]   # not old.csv, not new.csv again
    assert len(launch.calls) == 2


def test_watch_a_file_dropped_again_is_new(tmp_path: Path, home: Path, inbox: Path) -> None:
    clock, launch = Clock("2026-06-01 10:00"), Launcher()
    with watch_scheduler(tmp_path, home, launch, clock) as s:
        (inbox / "old.csv").unlink()
        assert polls(s, clock, 2) == []
        (inbox / "old.csv").write_text("fresh")
        assert [Path(r.params["file"]).name for r in polls(s, clock, 2)] == ["old.csv"]


def test_watch_waits_while_forbidden(tmp_path: Path, home: Path, inbox: Path) -> None:
    clock, launch = Clock("2026-06-01 10:00"), Launcher(track=True)
    with watch_scheduler(tmp_path, home, launch, clock) as s:
        (inbox / "a.csv").write_text("1")
        (inbox / "b.csv").write_text("2")
        assert [Path(r.params["file"]).name for r in polls(s, clock, 2)] == ["a.csv"]
        assert polls(s, clock, 3) == []                                # b.csv waits for a.csv's run
        launch.procs[0].done = True
        assert [Path(r.params["file"]).name for r in polls(s, clock, 1)] == ["b.csv"]


# -- HTTP ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def http(tmp_path: Path, home: Path) -> Iterator[tuple[httpx.Client, Launcher, Scheduler]]:
    clock, launch = Clock("2026-01-15 12:00"), Launcher(track=True)
    files = [write_pipeline(tmp_path, schedules=[{"cron": "30 2 * * *", "timezone": NY}],
                            params={"file": {"type": "str", "default": ""}, "epochs": {"type": "int", "default": 1}}),
             write_pipeline(tmp_path, name="q")]
    s = Scheduler(files, home, launch=launch, now=clock)
    port = s.serve_http(port=free_port(), key="s3cret")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        yield client, launch, s
    s.close()


KEY = {"Authorization": "Bearer s3cret"}


def test_http_trigger(http: tuple[httpx.Client, Launcher, Scheduler]) -> None:
    client, launch, _ = http
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.post("/pipelines/p/runs", json={"params": {"epochs": 3, "file": "/data/x.csv"}}, headers=KEY)
    assert r.status_code == 202, r.text
    assert r.json()["pipeline"] == "p" and re.fullmatch(r"p-20260115-120000-[0-9a-f]{4}", r.json()["run_id"])
    assert launch.calls[-1][1:3] == ({"epochs": "3", "file": "/data/x.csv"}, "http")
    assert launch.calls[-1][3] == r.json()["run_id"]
    # forbid: p is still running
    r = client.post("/pipelines/p/runs", headers={"x-api-key": "s3cret"})
    assert r.status_code == 409 and "still going" in r.json()["error"]
    launch.procs[-1].done = True
    assert client.post("/pipelines/p/runs", headers={"x-api-key": "s3cret"}).status_code == 202
    assert launch.calls[-1][1] == {}


def test_http_lists_pipelines(http: tuple[httpx.Client, Launcher, Scheduler]) -> None:
    client, _, _ = http
    assert client.get("/pipelines").status_code == 401
    body = client.get("/pipelines", headers=KEY).json()
    p, q = body["pipelines"]
    assert p["name"] == "p" and q["name"] == "q"
    assert p["schedules"] == [{"cron": "30 2 * * *", "timezone": NY, "next_fire": "2026-01-16T02:30:00-05:00"}]
    assert p["params"] == ["epochs", "file"] and p["watch"] == [] and p["running"] is False


def test_http_errors(http: tuple[httpx.Client, Launcher, Scheduler]) -> None:
    client, launch, _ = http
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": "s3cre"}, {"Authorization": "s3cret"}):
        r = client.post("/pipelines/p/runs", json={}, headers=headers)
        assert r.status_code == 401 and "API key" in r.json()["error"], headers
    r = client.post("/pipelines/nope/runs", headers=KEY)
    assert r.status_code == 404 and "known pipelines: p, q" in r.json()["error"]
    r = client.post("/pipelines/p/runs", content=b"{not json", headers=KEY)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = client.post("/pipelines/p/runs", json=[1], headers=KEY)
    assert r.status_code == 400
    r = client.post("/pipelines/p/runs", json={"params": {"lr": 0.1}}, headers=KEY)
    assert r.status_code == 400 and "unknown parameter(s) ['lr']" in r.json()["error"]
    r = client.post("/pipelines/p/runs", json={"params": {"epochs": "many"}}, headers=KEY)
    assert r.status_code == 400 and "parameter 'epochs' must be int" in r.json()["error"]
    r = client.post("/pipelines/p/runs", json={"params": {"file": ["a"]}}, headers=KEY)
    assert r.status_code == 400
    r = client.post("/pipelines/p/runs", content=b"x" * (64 * 1024 + 1), headers=KEY)
    assert r.status_code == 413 and "limit is 65536" in r.json()["error"]
    assert client.get("/elsewhere", headers=KEY).status_code == 404
    assert launch.calls == []


def test_http_needs_a_key(tmp_path: Path, home: Path) -> None:
    with Scheduler([write_pipeline(tmp_path)], home, launch=Launcher()) as s:
        for key in (None, ""):
            with pytest.raises(ValueError, match="set TANDEM_PIPELINE_KEY or pass --key-file"):
                s.serve_http(key=key)


# -- the default launch -------------------------------------------------------------------------------------------

class FakePopen:
    seen: list[tuple[list[str], dict[str, Any]]] = []

    def __init__(self, argv: list[str], **kw: Any) -> None:
        FakePopen.seen.append((argv, {**kw, "stdout": getattr(kw.get("stdout"), "name", None)}))
        self.pid = 4242

    def poll(self) -> int | None:
        return None


def test_default_launch_argv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    FakePopen.seen = []
    home, file = tmp_path / "home", tmp_path / "p.yaml"
    proc = default_launch(file, {"b": "2", "a": "x=y"}, "cron", "p-20260101-000000-abcd", home=home)
    assert isinstance(proc, FakePopen)
    argv, kw = FakePopen.seen[0]
    assert argv == [sys.executable, "-m", "tandem.cli", "pipeline", "run", str(file), "--home", str(home),
                    "--run-id", "p-20260101-000000-abcd", "--trigger", "cron", "--param", "a=x=y",
                    "--param", "b=2"]
    assert kw["stdout"] == str(home / "scheduler-logs" / "p-20260101-000000-abcd.log")
    assert kw["stderr"] == subprocess.STDOUT and kw["start_new_session"] is True
    assert os.path.isfile(home / "scheduler-logs" / "p-20260101-000000-abcd.log")


def test_scheduler_uses_default_launch_with_its_home(tmp_path: Path, home: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    FakePopen.seen = []
    clock = Clock("2026-06-01 10:00")
    file = write_pipeline(tmp_path, schedules=[{"cron": "*/15 * * * *", "timezone": "UTC"}])
    with Scheduler([file], home, now=clock) as s:
        clock.advance(minutes=15)
        (run,) = s.tick()
        clock.advance(minutes=15)
        assert s.tick() == []   # the fake process never ends: forbid skips 10:30
    argv = FakePopen.seen[0][0]
    assert argv[5:12] == [str(file.resolve()), "--home", str(home), "--run-id", run.run_id, "--trigger", "cron"]
    assert len(FakePopen.seen) == 1 and sched_mod.LOG_DIR == "scheduler-logs"


def test_run_id_is_name_utc_time_and_hex() -> None:
    berlin = datetime(2026, 3, 8, 8, 0, 5, tzinfo=ZoneInfo("Europe/Berlin"))
    assert re.fullmatch(r"nightly-20260308-070005-[0-9a-f]{4}", new_run_id("nightly", berlin))


def test_run_forever_ticks_until_stopped(tmp_path: Path, home: Path) -> None:
    clock, stop = Clock("2026-06-01 10:14"), threading.Event()
    calls: list[str] = []

    def launch(file: Path, params: dict[str, str], trigger: str, run_id: str) -> None:
        calls.append(run_id)
        stop.set()

    file = write_pipeline(tmp_path, schedules=[{"cron": "*/15 * * * *", "timezone": "UTC"}])
    with Scheduler([file], home, launch=launch, now=clock, poll_s=0.01) as s:
        clock.advance(minutes=1)
        worker = threading.Thread(target=s.run_forever, args=(stop,), daemon=True)
        worker.start()
        worker.join(timeout=30)
        assert not worker.is_alive() and len(calls) == 1
