"""Supervisor: spawn, watch, restart and shut down every process of a server.

    supervisor (this process: owns arenas, sockets dir, metrics dir)
    ├── front 0..N-1    HTTP + pre/post-processing, sharing one listening socket
    └── accel m#r       one per model replica: batching + predict

A crashed process is restarted; when an accelerator worker dies the fronts are told at once
(`Event('down')`) and fail only the requests it held. SIGTERM/SIGINT: fronts stop accepting and
drain, then workers stop, then every shared-memory arena is unlinked.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import zmq

from tandem.config import ServerConfig, available_cpus
from tandem.errors import ConfigError
from tandem.serving.kinds import Kinds
from tandem.serving.layout import RunLayout
from tandem.serving.messages import Event, Ready, control_decoder, encoder
from tandem.serving.repository import ModelEntry, share_cpus
from tandem.serving.shm import Arena, arena_bytes, check_shm_space

__all__ = ["StartupInterrupted", "Supervisor", "default_cpu_workers", "sweep_stale_arenas"]

logger = logging.getLogger(__name__)
STARTUP_TIMEOUT_S = 600.0


def default_cpu_workers(entries: list[ModelEntry], server: ServerConfig) -> int:
    """Front processes: the CLI/env value, else the largest per-model setting, else CPUs / 2."""
    if server.cpu_workers:
        return server.cpu_workers
    asked = [e.config.cpu_workers for e in entries if isinstance(e.config.cpu_workers, int)]
    return max(asked) if asked else max(1, available_cpus() // 2)


def sweep_stale_arenas(directory: Path) -> list[Path]:
    """Unlink arenas left by a supervisor that no longer runs (e.g. after kill -9 of it)."""
    removed = []
    for path in directory.glob("tandem-*-f*-m*"):
        try:
            pid = int(path.name.split("-")[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            removed.append(path)
        except (ValueError, IndexError, PermissionError):
            continue
    return removed


class StartupInterrupted(Exception):
    """SIGTERM or SIGINT arrived before the server was ready."""


@dataclass
class _Proc:
    role: str  # "front" or "accel"
    index: int
    entry: ModelEntry | None
    process: BaseProcess
    restarts: int = 0
    ready: bool = False
    next_start: float = 0.0
    device: str = ""  # where an accelerator replica runs, as it reported at start


@dataclass
class Supervisor:
    """Runs one server until SIGTERM/SIGINT; `start()` returns once every process is ready."""

    entries: list[ModelEntry]
    server: ServerConfig
    kinds: Kinds
    n_fronts: int = 0
    layout: RunLayout = field(init=False)
    procs: list[_Proc] = field(default_factory=list)
    arenas: dict[int, list[Arena]] = field(default_factory=dict)  # entry index -> one arena per front
    repo: Path | None = None  # the model repository folder, for the live repository API (None: none)
    port: int = 0
    stopping: bool = False
    interrupted: bool = False

    def __post_init__(self) -> None:
        from tandem.envs import shm_dir

        self.n_fronts = self.n_fronts or default_cpu_workers(self.entries, self.server)
        run_dir = Path(tempfile.mkdtemp(prefix="tandem-"))
        self.layout = RunLayout(run_dir, Path(shm_dir()), f"tandem-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        self.mp = mp.get_context("spawn")
        self.ctx = zmq.Context()
        from tandem.serving.live_repo import LiveRepository

        self.live = LiveRepository(self)

    # -- start-up ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start every process; a SIGTERM/SIGINT during start-up aborts it and cleans up."""
        def _abort(signum: int, frame: Any) -> None:
            if self.interrupted:  # already unwinding: let the clean-up finish
                return
            self.interrupted = True
            raise StartupInterrupted(f"signal {signum} during start-up")

        previous = {sig: signal.signal(sig, _abort) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._start()
        except BaseException:
            self.shutdown()
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _start(self) -> None:
        sweep_stale_arenas(self.layout.shm_dir)
        self.create_arenas(self.entries)
        self.layout.metrics_dir.mkdir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(self.layout.metrics_dir)
        self.control = self.ctx.socket(zmq.PULL)
        self.control.bind(self.layout.control_endpoint)
        self.events = self.ctx.socket(zmq.PUB)
        self.events.bind(self.layout.events_endpoint)
        for entry in self.entries:
            for r in range(entry.config.instances):
                self.procs.append(self._spawn("accel", r, entry))
        self.await_ready([p for p in self.procs if p.role == "accel"])
        self.sock = self._bind()
        for i in range(self.n_fronts):
            self.procs.append(self._spawn("front", i, None))
        self.await_ready([p for p in self.procs if p.role == "front"])
        self.live.remember_start()

    def create_arenas(self, entries: list[ModelEntry]) -> None:
        """One arena per front for each entry whose kind needs one (its size from the kind)."""
        payloads = {e.index: self.kinds[e.config.kind].arena_bytes(e) for e in entries}
        with_arena = [e for e in entries if payloads[e.index]]  # 0: the kind needs no arena
        need = sum(arena_bytes(e.config.queue_size, payloads[e.index]) for e in with_arena) * self.n_fronts
        check_shm_space(need, str(self.layout.shm_dir))
        for e in with_arena:
            self.arenas[e.index] = [
                Arena.create(self.layout.arena_name(front, e.index), e.config.queue_size, payloads[e.index],
                             str(self.layout.shm_dir)) for front in range(self.n_fronts)]

    def release_arenas(self, index: int) -> None:
        for arena in self.arenas.pop(index, []):
            arena.close()
            arena.unlink()

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.server.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.server.host, self.server.port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {self.server.host}:{self.server.port}: {e.strerror} "
                              "(fix: pick another --port or stop what uses it)") from None
        sock.listen(2048)
        sock.set_inheritable(True)
        self.port = sock.getsockname()[1]
        return sock

    def spawn_replicas(self, entry: ModelEntry, beside: Sequence[ModelEntry] | None = None) -> list[_Proc]:
        """Start every replica of `entry`; `beside`: the entries served once they are up (default: now's)."""
        procs = [self._spawn("accel", r, entry, beside) for r in range(entry.config.instances)]
        self.procs.extend(procs)
        return procs

    def _spawn(self, role: str, index: int, entry: ModelEntry | None,
               beside: Sequence[ModelEntry] | None = None) -> _Proc:
        if role == "accel":
            assert entry is not None
            target = self.kinds[entry.config.kind].worker(entry)
            # the worker sizes `threads: auto` by the replicas it shares the CPUs with (share_cpus)
            shared = share_cpus(entry, self.entries if beside is None else beside)
            proc = self.mp.Process(target=target, args=(shared, index, self.layout, os.getpid(), self.server.log_level),
                                   name=f"tandem-accel-{entry.key}-{index}")
        else:
            from tandem.serving.front import run_front

            proc = self.mp.Process(target=run_front, name=f"tandem-front-{index}", args=(
                index, self.entries, self.kinds, self.layout, self.sock, self.server, os.getpid()))
        proc.start()
        return _Proc(role, index, entry, proc)

    def await_ready(self, procs: list[_Proc], watch: bool = False) -> None:
        """Wait until every process in `procs` reported ready; `watch` keeps restarting the others meanwhile."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        pids = {p.process.pid for p in procs}
        while any(not p.ready for p in procs):
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes not ready after {STARTUP_TIMEOUT_S:.0f} s")
            for p in procs:
                if not p.ready and not p.process.is_alive():
                    raise RuntimeError(f"{p.process.name} exited with code {p.process.exitcode} during start")
            ready = self.poll_control(200)
            if ready is not None and ready.error and ready.pid in pids:
                what = f"model {ready.model} replica {ready.index}" if ready.role == "accel" else "front"
                raise RuntimeError(f"{what} failed to start: {ready.error}")
            if watch:
                self.watch()

    def poll_control(self, timeout_ms: int) -> Ready | None:
        """Handle one control message: a Ready is returned; repository ops and acks go to `live`."""
        if not self.control.poll(timeout_ms):
            return None
        msg = control_decoder.decode(self.control.recv())
        if not isinstance(msg, Ready):
            self.live.receive(msg)
            return None
        for p in self.procs:
            if p.process.pid == msg.pid:
                p.ready = not msg.error
                p.device = msg.device
                if p.ready and p.entry is not None and p.restarts:
                    self.publish(Event(kind="up", model=p.entry.uid, replica=msg.index))
        return msg

    def devices(self, key: str) -> list[str]:
        """Devices the replicas of model `key` reported (the supervisor itself never imports torch)."""
        return [p.device for p in self.procs if p.entry is not None and p.entry.key == key]

    def publish(self, msg: Any) -> None:
        self.events.send(encoder.encode(msg))

    def stop_procs(self, procs: list[_Proc], timeout: float) -> None:
        """SIGTERM these processes (they finish what they hold), then kill what outlives `timeout`."""
        for p in procs:
            if p in self.procs:
                self.procs.remove(p)  # never restarted
        alive = [p.process for p in procs if p.process.is_alive()]
        for proc in alive:
            if proc.pid:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in alive:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                logger.warning("%s did not stop in %.0f s; killing it", proc.name, timeout)
                proc.kill()
                proc.join(5)

    # -- running -----------------------------------------------------------------------------------
    def run_forever(self) -> None:
        """Watch processes until a signal asks to stop, then shut down cleanly."""
        def _stop(signum: int, frame: Any) -> None:
            self.stopping = True

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        if self.interrupted:  # a signal arrived while the last start-up step finished
            self.stopping = True
        try:
            while not self.stopping:
                self.poll_control(200)
                self.watch()
                self.live.tick()
        finally:
            self.shutdown()

    def watch(self) -> None:
        from tandem.serving.metrics import mark_dead, metrics

        now = time.monotonic()
        for i, p in enumerate(self.procs):
            if p.process.is_alive() or self.stopping:
                continue
            if p.process.exitcode is not None and p.next_start == 0.0:
                name = p.entry.key if p.entry else ""
                logger.warning("%s died (exit code %s); restarting", p.process.name, p.process.exitcode)
                if p.process.pid:
                    mark_dead(p.process.pid)
                metrics().restarts.labels(p.role, name).inc()
                if p.role == "accel":
                    assert p.entry is not None
                    self.publish(Event(kind="down", model=p.entry.uid, replica=p.index))
                backoff = min(30.0, self.server.restart_backoff_s * 2 ** min(p.restarts, 6))
                p.next_start = now + (backoff if p.restarts else 0.0)
            if p.next_start and now >= p.next_start:
                fresh = self._spawn(p.role, p.index, p.entry)
                fresh.restarts = p.restarts + 1
                self.procs[i] = fresh

    # -- shutdown ----------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Drain fronts, stop workers, unlink every arena and the run directory. Idempotent."""
        self.stopping = True
        self.stop_procs([p for p in self.procs if p.role == "front"], self.server.drain_timeout_s + 5)
        self.stop_procs(list(self.procs), 15)
        for index in list(self.arenas):
            self.release_arenas(index)
        if getattr(self, "sock", None) is not None:
            self.sock.close()
        self.ctx.destroy(linger=0)
        shutil.rmtree(self.layout.run_dir, ignore_errors=True)
