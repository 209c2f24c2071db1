"""Run history in SQLite: runs, their steps (status, attempts, timings, failure kind, log tail), the artifacts and
output parameters each step produced, and the step cache (content key -> outputs).

One file, ``HOME/history.sqlite``, in WAL mode so ``tandem pipeline status`` can read while a runner writes.
A runner writes from several threads through one connection guarded by a lock.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem.serving._proc import pid_alive

__all__ = ["CacheEntry", "RunRow", "StepRow", "Store"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
  id TEXT PRIMARY KEY, pipeline TEXT NOT NULL, file TEXT, params TEXT NOT NULL, trigger TEXT NOT NULL,
  status TEXT NOT NULL, started REAL NOT NULL, ended REAL, pid INTEGER, message TEXT DEFAULT '');
CREATE TABLE IF NOT EXISTS steps (
  run_id TEXT NOT NULL, name TEXT NOT NULL, status TEXT NOT NULL, attempts INTEGER DEFAULT 0,
  cache_key TEXT, cached INTEGER DEFAULT 0, ready REAL, started REAL, ended REAL, exit_code INTEGER,
  failure TEXT, message TEXT DEFAULT '', log TEXT, log_tail TEXT DEFAULT '', PRIMARY KEY (run_id, name));
CREATE TABLE IF NOT EXISTS artifacts (
  run_id TEXT NOT NULL, step TEXT NOT NULL, name TEXT NOT NULL, path TEXT NOT NULL, sha256 TEXT NOT NULL,
  bytes INTEGER NOT NULL, PRIMARY KEY (run_id, step, name));
CREATE TABLE IF NOT EXISTS results (
  run_id TEXT NOT NULL, step TEXT NOT NULL, name TEXT NOT NULL, value TEXT NOT NULL,
  PRIMARY KEY (run_id, step, name));
CREATE TABLE IF NOT EXISTS cache (
  key TEXT PRIMARY KEY, step TEXT NOT NULL, folder TEXT NOT NULL, results TEXT NOT NULL,
  artifacts TEXT NOT NULL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS runs_started ON runs (started);
"""


@dataclass
class RunRow:
    """One run of a pipeline."""

    id: str
    pipeline: str
    file: str | None
    params: dict[str, Any]
    trigger: str
    status: str
    started: float
    ended: float | None
    pid: int | None
    message: str


@dataclass
class StepRow:
    """One step of a run."""

    run_id: str
    name: str
    status: str
    attempts: int
    cache_key: str | None
    cached: bool
    ready: float | None
    started: float | None
    ended: float | None
    exit_code: int | None
    failure: str | None
    message: str
    log: str | None
    log_tail: str


@dataclass
class CacheEntry:
    """Outputs of a step run keyed by the content of everything it read: folder, results, artifact hashes."""

    key: str
    folder: Path
    results: dict[str, str]
    artifacts: dict[str, tuple[str, str]]   # name -> (path, sha256)


class Store:
    """The SQLite history of one pipeline home."""

    def __init__(self, home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.path = home / "history.sqlite"
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._tx() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")   # WAL: safe against a killed runner, no fsync per step
            db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db

    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> None:
        with self._tx() as db:
            db.execute(sql, args)

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._tx() as db:
            return list(db.execute(sql, args).fetchall())

    # runs -------------------------------------------------------------------------------------------------------
    def start_run(self, run_id: str, pipeline: str, file: str | None, params: dict[str, Any], trigger: str) -> None:
        """Record a new run as running, owned by this process."""
        self._exec("INSERT INTO runs (id, pipeline, file, params, trigger, status, started, pid) "
                   "VALUES (?, ?, ?, ?, ?, 'running', ?, ?)",
                   (run_id, pipeline, file, json.dumps(params), trigger, time.time(), os.getpid()))

    def end_run(self, run_id: str, status: str, message: str = "") -> None:
        """Record the end of a run."""
        self._exec("UPDATE runs SET status = ?, ended = ?, message = ? WHERE id = ?",
                   (status, time.time(), message, run_id))

    def run(self, run_id: str) -> RunRow | None:
        """The run `run_id` (a unique prefix is enough), or None."""
        rows = self._rows("SELECT * FROM runs WHERE id = ? OR id LIKE ? ORDER BY started DESC",
                          (run_id, run_id + "%"))
        exact = [r for r in rows if r["id"] == run_id]
        rows = exact or rows
        return _run_row(rows[0]) if len(rows) == 1 else None

    def runs(self, pipeline: str | None = None, limit: int = 20) -> list[RunRow]:
        """The latest runs, newest first."""
        if pipeline:
            rows = self._rows("SELECT * FROM runs WHERE pipeline = ? ORDER BY started DESC LIMIT ?", (pipeline, limit))
        else:
            rows = self._rows("SELECT * FROM runs ORDER BY started DESC LIMIT ?", (limit,))
        return [_run_row(r) for r in rows]

    def mark_orphans(self) -> list[str]:
        """Runs still 'running' whose runner process is gone (killed) become 'interrupted'; returns their ids."""
        lost = []
        for r in self._rows("SELECT id, pid FROM runs WHERE status = 'running'"):
            if r["pid"] is None or not _alive(int(r["pid"])):
                lost.append(str(r["id"]))
        for run_id in lost:
            self._exec("UPDATE steps SET status = 'interrupted', failure = 'infra', message = "
                       "'the runner process died while this step ran' WHERE run_id = ? AND status = 'running'",
                       (run_id,))
            self.end_run(run_id, "interrupted", "the runner process died (killed?)")
        return lost

    # steps ------------------------------------------------------------------------------------------------------
    def set_step(self, run_id: str, name: str, **fields: Any) -> None:
        """Insert or update the row of step `name` in run `run_id`."""
        if "cached" in fields:
            fields["cached"] = int(bool(fields["cached"]))
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO steps (run_id, name, status) VALUES (?, ?, 'pending')", (run_id, name))
            if fields:
                sets = ", ".join(f"{k} = ?" for k in fields)
                db.execute(f"UPDATE steps SET {sets} WHERE run_id = ? AND name = ?",   # noqa: S608 (keys are ours)
                           (*fields.values(), run_id, name))

    def steps(self, run_id: str) -> list[StepRow]:
        """Steps of a run, in the order they became ready."""
        rows = self._rows("SELECT * FROM steps WHERE run_id = ? ORDER BY COALESCE(ready, 1e18), rowid", (run_id,))
        return [StepRow(**{k: r[k] for k in r.keys()}) for r in rows]   # noqa: SIM118 (sqlite3.Row)

    def record_outputs(self, run_id: str, step: str, results: dict[str, str],
                       artifacts: dict[str, tuple[str, str, int]]) -> None:
        """Output parameters and artifacts (name -> (path, sha256, bytes)) of a finished step."""
        with self._tx() as db:
            db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?)",
                           [(run_id, step, k, v) for k, v in results.items()])
            db.executemany("INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?, ?, ?, ?)",
                           [(run_id, step, k, p, h, n) for k, (p, h, n) in artifacts.items()])

    def outputs(self, run_id: str, step: str) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
        """(results, artifacts name -> (path, sha256)) a step of a run recorded."""
        res = {r["name"]: r["value"] for r in self._rows(
            "SELECT name, value FROM results WHERE run_id = ? AND step = ?", (run_id, step))}
        arts = {r["name"]: (r["path"], r["sha256"]) for r in self._rows(
            "SELECT name, path, sha256 FROM artifacts WHERE run_id = ? AND step = ?", (run_id, step))}
        return res, arts

    def artifacts(self, run_id: str) -> list[sqlite3.Row]:
        """Every artifact of a run."""
        return self._rows("SELECT * FROM artifacts WHERE run_id = ? ORDER BY step, name", (run_id,))

    # cache ------------------------------------------------------------------------------------------------------
    def cache_get(self, key: str) -> CacheEntry | None:
        """The cache entry for `key` if its folder still exists."""
        rows = self._rows("SELECT * FROM cache WHERE key = ?", (key,))
        if not rows:
            return None
        r = rows[0]
        entry = CacheEntry(key, Path(r["folder"]), json.loads(r["results"]),
                           {k: (v[0], v[1]) for k, v in json.loads(r["artifacts"]).items()})
        if not entry.folder.is_dir() or not all(Path(p).exists() for p, _ in entry.artifacts.values()):
            self._exec("DELETE FROM cache WHERE key = ?", (key,))
            return None
        return entry

    def cache_put(self, key: str, step: str, folder: Path, results: dict[str, str],
                  artifacts: dict[str, tuple[str, str]]) -> None:
        """Remember a step's outputs under its content key."""
        self._exec("INSERT OR REPLACE INTO cache VALUES (?, ?, ?, ?, ?, ?)",
                   (key, step, str(folder), json.dumps(results), json.dumps(artifacts), time.time()))


def _run_row(r: sqlite3.Row) -> RunRow:
    return RunRow(r["id"], r["pipeline"], r["file"], json.loads(r["params"]), r["trigger"], r["status"],
                  r["started"], r["ended"], r["pid"], r["message"] or "")


def _alive(pid: int) -> bool:
    return pid == os.getpid() or pid_alive(pid)
