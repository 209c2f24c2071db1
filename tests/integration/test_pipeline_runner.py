"""The local runner on real subprocesses: parallel steps, artifacts, caching, conditions, failures by kind,
retries, timeouts, kill -9 of the runner and the history CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tandem.pipeline.runner import retry_run, run_pipeline
from tandem.pipeline.spec import PipelineError, from_dict, load_pipeline
from tandem.pipeline.store import Store
from tandem.serving._proc import pid_alive

TANDEM = [sys.executable, "-m", "tandem.cli", "pipeline"]


def _pipe(tmp_path: Path, raw: dict[str, object]) -> Path:
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(raw))
    return f


DIAMOND = {
    "name": "diamond",
    "params": {"word": {"type": "str", "default": "hello"}, "min": {"type": "int", "default": 3}},
    "steps": [
        {"name": "make", "command": ["sh", "-c", "mkdir {outputs.data} && echo {params.word} > {outputs.data}/w"],
         "outputs": {"artifacts": ["data"]}},
        {"name": "count", "command": ["sh", "-c", "tr -d '\\n' < {inputs.d}/w | wc -c > {results.n}"],
         "inputs": {"d": "make.data"}, "outputs": {"params": ["n"]}},
        {"name": "upper", "command": ["sh", "-c", "tr a-z A-Z < {inputs.d}/w > {outputs.up}"],
         "inputs": {"d": "make.data"}, "outputs": {"artifacts": ["up"]}},
        {"name": "gate", "command": ["sh", "-c", "echo n={steps.count.n} > {outputs.note}"],
         "when": "{steps.count.n} >= {params.min}", "outputs": {"artifacts": ["note"]}},
        {"name": "after-gate", "command": ["true"], "after": ["gate"]},
    ],
}


def test_diamond_runs_caches_and_reruns_only_what_changed(tmp_path: Path) -> None:
    home, pipe = tmp_path / "home", load_pipeline(_pipe(tmp_path, DIAMOND))
    first = run_pipeline(pipe, None, home)
    assert first.status == "succeeded"
    assert {n: r.status for n, r in first.steps.items()} == dict.fromkeys(DIAMOND_NAMES, "succeeded")
    assert first.steps["count"].results == {"n": "5"}
    assert (first.steps["upper"].artifacts["up"]).read_text() == "HELLO\n"
    assert first.steps["gate"].artifacts["note"].read_text() == "n=5\n"
    # dependencies finish before their dependents start
    s = first.steps
    assert s["make"].ended_at <= s["count"].started_at and s["count"].ended_at <= s["gate"].started_at

    again = run_pipeline(pipe, None, home)
    assert {r.status for r in again.steps.values()} == {"cached"}
    assert again.steps["count"].results == {"n": "5"}

    changed = run_pipeline(pipe, {"min": 9}, home)   # only the gate reads `min`: the rest is cached
    st = {n: r.status for n, r in changed.steps.items()}
    assert st == {"make": "cached", "count": "cached", "upper": "cached", "gate": "skipped",
                  "after-gate": "skipped"}
    assert "condition" in changed.steps["gate"].message and "'gate' was skipped" in changed.steps["after-gate"].message
    other = run_pipeline(pipe, {"word": "hi"}, home)
    assert other.steps["make"].status == "succeeded" and other.steps["count"].results == {"n": "2"}
    assert other.steps["gate"].status == "skipped"


DIAMOND_NAMES = ["make", "count", "upper", "gate", "after-gate"]


def test_independent_steps_run_in_parallel(tmp_path: Path) -> None:
    steps = [{"name": f"s{i}", "command": ["sh", "-c", "sleep 0.6"], "resources": {"cpu": 0.5}, "cache": False}
             for i in range(2)]
    big = {"name": "big", "command": ["sh", "-c", "sleep 0.3"], "resources": {"cpu": 64}, "cache": False}
    fat = {"name": "fat", "command": ["sh", "-c", "sleep 0.3"], "resources": {"cpu": 0.1, "memory": "64Ti"},
           "cache": False, "after": ["big"]}
    thin = {"name": "thin", "command": ["sh", "-c", "sleep 0.3"], "resources": {"cpu": 0.1, "memory": "1Gi"},
            "cache": False,
            "after": ["big"]}
    res = run_pipeline(from_dict({"name": "par", "steps": [*steps, big, fat, thin]}), None, tmp_path)
    a, b, c = res.steps["s0"], res.steps["s1"], res.steps["big"]
    assert a.started_at < b.ended_at and b.started_at < a.ended_at   # overlapped
    assert c.started_at >= max(a.ended_at, b.ended_at)   # more CPUs than the machine has: it runs alone
    f, t = res.steps["fat"], res.steps["thin"]   # more memory than the machine has: alone too
    assert f.started_at >= t.ended_at or t.started_at >= f.ended_at


def test_code_failure_shows_log_tail_stops_dependents_and_not_the_rest(tmp_path: Path) -> None:
    raw = {"name": "f", "steps": [
        {"name": "bad", "command": ["sh", "-c", "echo computing; echo 'boom: bad thing' >&2; exit 3"],
         "outputs": {"artifacts": ["x"]}},
        {"name": "down", "command": ["cat", "{inputs.x}"], "inputs": {"x": "bad.x"}},
        {"name": "side", "command": ["sh", "-c", "echo ok"]}]}
    f = _pipe(tmp_path, raw)
    out = subprocess.run([*TANDEM, "run", str(f), "--home", str(tmp_path / "h")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1
    assert "step 'bad' failed (code): exit code 3" in out.stderr and "boom: bad thing" in out.stderr
    res = json.loads(subprocess.run([*TANDEM, "status", _last_run(tmp_path / "h"), "--home", str(tmp_path / "h"),
                                     "--json"], capture_output=True, text=True, check=True, timeout=60).stdout)
    st = {s["name"]: s["status"] for s in res["steps"]}
    assert st == {"bad": "failed", "down": "not_run", "side": "succeeded"}
    assert "boom: bad thing" in next(s for s in res["steps"] if s["name"] == "bad")["log_tail"]


def _last_run(home: Path) -> str:
    store = Store(home)
    try:
        return store.runs(limit=1)[0].id
    finally:
        store.close()


def test_infra_failures_are_retried_code_failures_only_when_asked(tmp_path: Path) -> None:
    marker = tmp_path / "tried"
    kill_once = f"if [ ! -e {marker}_k ]; then touch {marker}_k; kill -9 $$; fi; echo fine"
    fail_once = f"if [ ! -e {marker}_c ]; then touch {marker}_c; exit 1; fi; echo fine"
    raw = {"name": "r", "steps": [
        {"name": "preempted", "command": ["sh", "-c", kill_once], "retry": {"limit": 2, "backoff_s": 0.05}},
        {"name": "buggy", "command": ["sh", "-c", fail_once], "retry": {"limit": 2, "backoff_s": 0.05}},
        {"name": "flaky", "command": ["sh", "-c", fail_once.replace("_c", "_f")],
         "retry": {"limit": 1, "backoff_s": 0.05, "on": ["code"]}}]}
    res = run_pipeline(from_dict(raw), None, tmp_path / "h")
    assert res.steps["preempted"].status == "succeeded" and res.steps["preempted"].attempts == 2
    assert res.steps["buggy"].status == "failed" and res.steps["buggy"].attempts == 1   # code: not retried
    assert res.steps["buggy"].failure == "code"
    assert res.steps["flaky"].status == "succeeded" and res.steps["flaky"].attempts == 2


def test_timeout_kills_the_process_group_and_missing_outputs_fail(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    raw = {"name": "t", "steps": [
        {"name": "slow", "command": ["sh", "-c", f"sleep 30 & echo $! > {pidfile}; wait"], "timeout_s": 0.5},
        {"name": "lazy", "command": ["true"], "outputs": {"artifacts": ["model"], "params": ["acc"]}},
        {"name": "typo", "command": ["pyhton3", "-V"]}]}
    res = run_pipeline(from_dict(raw), None, tmp_path / "h")
    slow, lazy = res.steps["slow"], res.steps["lazy"]
    assert slow.status == "failed" and slow.failure == "timeout" and "timeout of 0.5 s" in slow.message
    assert not pid_alive(int(pidfile.read_text()))   # the grandchild went with its group
    assert lazy.failure == "code" and "did not write outputs.model, results.acc" in lazy.message
    assert "cannot start 'pyhton3': no such program" in res.steps["typo"].message




FUNC_MODULE = '''
from pathlib import Path

def make(out: Path, n: int, loud: bool = False) -> None:
    out.write_text("x" * n + ("!" if loud else ""))

def measure(path: Path, scale: float) -> dict:
    return {"size": len(path.read_text()) * scale, "name": path.name}
'''


def test_function_steps_convert_arguments_and_return_results(tmp_path: Path) -> None:
    (tmp_path / "mysteps.py").write_text(FUNC_MODULE)
    raw = {"name": "fn", "workdir": str(tmp_path), "steps": [
        {"name": "make", "function": "mysteps:make", "args": {"out": "{outputs.f}", "n": 4, "loud": "true"},
         "outputs": {"artifacts": ["f"]}},
        {"name": "measure", "function": "mysteps:measure", "args": {"path": "{inputs.f}", "scale": 0.5},
         "inputs": {"f": "make.f"}, "outputs": {"params": ["size"]}},
        {"name": "typo", "function": "mysteps:make", "args": {"out": "{outputs.f}", "count": 4},
         "outputs": {"artifacts": ["f"]}}]}
    res = run_pipeline(from_dict(raw), None, tmp_path / "h")
    assert res.steps["measure"].results == {"size": "2.5"}
    assert res.steps["typo"].status == "failed" and res.steps["typo"].log is not None
    assert "argument 'count': make takes out, n, loud" in res.steps["typo"].log.read_text()
    # editing the module's code invalidates the cache of the steps that run it
    (tmp_path / "mysteps.py").write_text(FUNC_MODULE.replace('"!"', '"?"'))
    again = run_pipeline(from_dict(raw), None, tmp_path / "h")
    assert again.steps["make"].status == "succeeded" and again.steps["make"].artifacts["f"].read_text() == "xxxx?"


def test_kill_9_of_the_runner_then_rerun_skips_completed_and_reruns_interrupted(tmp_path: Path) -> None:
    started, pidfile = tmp_path / "started", tmp_path / "pid"
    raw = {"name": "k", "steps": [
        {"name": "done-first", "command": ["sh", "-c", "echo a > {outputs.a}"], "outputs": {"artifacts": ["a"]}},
        {"name": "long", "command": ["sh", "-c", f"echo $$ > {pidfile}; touch {started}.$(date +%s%N); sleep 30; "
                                                 "cat {inputs.a} > {outputs.b}"],
         "inputs": {"a": "done-first.a"}, "outputs": {"artifacts": ["b"]}, "timeout_s": 120}]}
    f, home = _pipe(tmp_path, raw), tmp_path / "h"
    runner = subprocess.Popen([*TANDEM, "run", str(f), "--home", str(home)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("started.*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob("started.*")), "the long step never started"
    runner.send_signal(signal.SIGKILL)
    runner.wait(timeout=10)
    step_pid = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while pid_alive(step_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(step_pid), "the step outlived its runner"
    killed = _last_run(home)
    left = list((home / "artifacts").glob(".tmp-*"))
    assert len(left) == 1, left  # the interrupted step's scratch
    live = home / "artifacts" / f".tmp-{os.getpid()}-0123456789abcdef-00000000"  # a running runner's: kept
    live.mkdir()

    raw["steps"][1]["command"] = ["sh", "-c", "cat {inputs.a} > {outputs.b}"]   # the fixed, quick version
    res = run_pipeline(from_dict(raw), None, home)
    assert res.steps["done-first"].status == "cached" and res.steps["long"].status == "succeeded"
    assert list((home / "artifacts").glob(".tmp-*")) == [live]
    store = Store(home)
    try:
        old = store.run(killed)
        assert old is not None and old.status == "interrupted"
        assert {s.name: s.status for s in store.steps(killed)}["long"] == "interrupted"
    finally:
        store.close()


def test_retry_reuses_succeeded_steps_of_the_run(tmp_path: Path) -> None:
    flag = tmp_path / "fixed"
    raw = {"name": "rt", "steps": [
        {"name": "one", "command": ["sh", "-c", f"date +%s%N >> {tmp_path}/one.count; echo 1 > {{outputs.o}}"],
         "outputs": {"artifacts": ["o"]}, "cache": False},
        {"name": "two", "command": ["sh", "-c", f"test -e {flag} && cat {{inputs.o}}"], "inputs": {"o": "one.o"}}]}
    f, home = _pipe(tmp_path, raw), tmp_path / "h"
    first = run_pipeline(load_pipeline(f), None, home, file=str(f))
    assert first.steps["two"].status == "failed"
    flag.touch()
    again = retry_run(first.run_id, home)
    assert again.status == "succeeded" and again.steps["one"].status == "cached"
    assert len((tmp_path / "one.count").read_text().split()) == 1   # `one` (cache: false) did not run again
    with pytest.raises(PipelineError, match="no run 'nope'"):
        retry_run("nope", home)


def test_path_params_are_cached_by_content_and_must_exist(tmp_path: Path) -> None:
    data = tmp_path / "in.txt"
    data.write_text("one")
    raw = {"name": "pp", "workdir": str(tmp_path), "params": {"src": {"type": "path", "default": "in.txt"}},
           "steps": [{"name": "copy", "command": ["cp", "{params.src}", "{outputs.o}"],
                      "outputs": {"artifacts": ["o"]}}]}
    home = tmp_path / "h"
    assert run_pipeline(from_dict(raw), None, home).steps["copy"].status == "succeeded"
    assert run_pipeline(from_dict(raw), None, home).steps["copy"].status == "cached"
    data.write_text("two")   # same name, new content: not a cache hit
    again = run_pipeline(from_dict(raw), None, home)
    assert again.steps["copy"].status == "succeeded" and again.steps["copy"].artifacts["o"].read_text() == "two"
    with pytest.raises(PipelineError, match="path parameter 'src': .*nope.txt does not exist") as info:
        run_pipeline(from_dict(raw), {"src": "nope.txt"}, home)
    assert info.value.field == "params.src"


def test_history_cli_list_status_logs(tmp_path: Path) -> None:
    f, home = _pipe(tmp_path, DIAMOND), str(tmp_path / "h")
    run = subprocess.run([*TANDEM, "run", str(f), "--home", home, "-p", "word=abc"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "succeeded" in run.stdout and "(5 succeeded)" in run.stdout
    run_id = _last_run(Path(home))
    listed = subprocess.run([*TANDEM, "list", "--home", home], capture_output=True, text=True, timeout=60).stdout
    assert run_id in listed and "succeeded" in listed
    status = subprocess.run([*TANDEM, "status", run_id[:-2], "--home", home], capture_output=True, text=True,
                            timeout=60).stdout
    assert "count" in status and '"word": "abc"' in status
    logs = subprocess.run([*TANDEM, "logs", run_id, "count", "--home", home], capture_output=True, text=True,
                          timeout=60).stdout
    assert "===== count (succeeded) =====" in logs and "attempt 1" in logs
    bad = subprocess.run([*TANDEM, "run", str(f), "--home", home, "-p", "min=many"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "parameter 'min' must be int, got 'many'" in bad.stderr


def test_scheduler_cli_http_trigger_starts_a_real_run(tmp_path: Path) -> None:
    import re
    import urllib.request

    f = _pipe(tmp_path, {"name": "hooked", "params": {"word": {"type": "str", "default": "x"}},
                         "steps": [{"name": "say", "command": ["sh", "-c", "echo {params.word} > {outputs.o}"],
                                    "outputs": {"artifacts": ["o"]}}]})
    home = tmp_path / "h"
    sched = subprocess.Popen([*TANDEM, "schedule", str(f), "--home", str(home), "--http-port", "0"],
                             env={**os.environ, "TANDEM_PIPELINE_KEY": "s3cret"}, stderr=subprocess.PIPE, text=True)
    try:
        assert sched.stderr is not None
        line = sched.stderr.readline()
        port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))  # type: ignore[union-attr]
        req = urllib.request.Request(f"http://127.0.0.1:{port}/pipelines/hooked/runs", method="POST",
                                     data=b'{"params": {"word": "hooked!"}}',
                                     headers={"Authorization": "Bearer s3cret", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 202
            run_id = json.loads(resp.read())["run_id"]
        deadline = time.monotonic() + 60
        row = None
        while time.monotonic() < deadline:
            store = Store(home)
            row = store.run(run_id)
            store.close()
            if row is not None and row.status != "running":
                break
            time.sleep(0.2)
        assert row is not None and row.status == "succeeded" and row.trigger == "http"
        assert row.params == {"word": "hooked!"}
    finally:
        sched.terminate()
        sched.wait(timeout=10)
    bad = subprocess.run([*TANDEM, "schedule", str(f), "--home", str(home), "--http-port", "0"],
                         env={k: v for k, v in os.environ.items() if k != "TANDEM_PIPELINE_KEY"},
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "needs a key" in bad.stderr
