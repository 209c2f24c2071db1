"""The live model repository (Triton's model-repository extension), run by the supervisor.

    index            every model version of the repository folder: READY if served, else UNAVAILABLE + why
    status           the same with each served version's kind, replicas (device, pid, memory) and card
    load m           (re)start every version of m found in the folder, then retire the old replicas of m
    unload m         retire every replica of m
    poll (option)    every `repository_poll_s`, load models whose folder changed, unload removed ones

A load is a roll-over without downtime: the new replicas start beside the old ones (fresh entry
indices, so fresh sockets and arenas); once they are ready every front adds a client for them
(requests now go to the new version), then each front drops the old clients and waits until their
last request finished, and only then do the old workers stop and their arenas go. A model that
fails to load stops only its new processes; what was served stays untouched, and the reply says why.

Operations run one at a time in the supervisor's loop; while one waits, the supervisor keeps
restarting crashed processes of other models.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandem.errors import ConfigError, ErrorKind
from tandem.serving._proc import rss_bytes
from tandem.serving.messages import (
    EntriesAck,
    EntriesChanged,
    EntrySource,
    ModelStatus,
    ReplicaStatus,
    RepoModel,
    RepoOp,
    RepoReply,
)
from tandem.serving.repository import ModelEntry, build_entry, find_model, repository_versions

if TYPE_CHECKING:
    from tandem.serving.supervisor import Supervisor

__all__ = ["LiveRepository"]

logger = logging.getLogger(__name__)
ACK_GRACE_S = 10.0  # beyond the drain timeout, how long a front may take to apply a change


class LoadFailed(Exception):
    """A repository operation failed; `kind` maps to the HTTP status at the front."""

    def __init__(self, message: str, kind: ErrorKind = ErrorKind.INVALID) -> None:
        super().__init__(message)
        self.kind = kind


def _fingerprint(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """What `poll` compares: every file's path, size and mtime under a model folder."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return tuple((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


class LiveRepository:
    """Load, unload and index operations over one supervisor's entries (see the module docstring)."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.ops: deque[RepoOp] = deque()
        self.acks: dict[int, set[int]] = {}
        self.failures: dict[str, str] = {}  # model name -> why its last load failed
        self.seen: dict[str, Any] = {}  # model folder name -> fingerprint (poll mode)
        self.next_index = 0
        self.next_op = 1 << 40  # the supervisor's own op ids never collide with the fronts'
        self.last_poll = 0.0

    def remember_start(self) -> None:
        self.next_index = max((e.index for e in self.sup.entries), default=-1) + 1
        if self.sup.server.model_control == "poll" and self.sup.repo is not None:
            self.seen = self._fingerprints()

    # -- messages from fronts ---------------------------------------------------------------------
    def receive(self, msg: Any) -> None:
        if isinstance(msg, RepoOp):
            self.ops.append(msg)
        elif isinstance(msg, EntriesAck):
            self.acks.setdefault(msg.op_id, set()).add(msg.front)
            if msg.error:
                logger.warning("front %d could not apply repository change %d: %s", msg.front, msg.op_id,
                               msg.error)

    def tick(self) -> None:
        """Run the queued operations, then poll the folder when asked to."""
        while self.ops and not self.sup.stopping:
            self._run(self.ops.popleft())
        control = self.sup.server.model_control
        if control == "poll" and time.monotonic() - self.last_poll >= self.sup.server.repository_poll_s:
            self.last_poll = time.monotonic()
            self._poll()

    def _run(self, op: RepoOp) -> None:
        reply = RepoReply(op_id=op.op_id, front=op.front)
        try:
            if op.kind in ("load", "unload"):
                self._check_control()
                self.load(op.name) if op.kind == "load" else self.unload(op.name)
            if op.kind == "status":
                reply.status = self.status()
            else:
                reply.models = self.index()
        except LoadFailed as e:
            reply.error, reply.error_kind = str(e), str(e.kind)
        except Exception as e:  # noqa: BLE001 - the supervisor must survive any failed operation
            logger.exception("repository %s %s failed", op.kind, op.name)
            reply.error, reply.error_kind = f"{op.kind} {op.name!r} failed: {type(e).__name__}: {e}", "internal"
        self.sup.publish(reply)

    def _check_control(self) -> None:
        if self.sup.server.model_control == "none":
            raise LoadFailed("model control is 'none': models cannot be loaded or unloaded at run time "
                             "(fix: start with --model-control explicit or poll)", ErrorKind.CONFLICT)
        if self.sup.repo is None:
            raise LoadFailed("this server has no model repository folder to load from (fix: pass one to "
                             "`tandem serve REPO`)", ErrorKind.CONFLICT)

    # -- index ------------------------------------------------------------------------------------
    def index(self) -> list[RepoModel]:
        served = {(e.config.name, e.config.version) for e in self.sup.entries}
        out = [RepoModel(name=n, version=v, state="READY") for n, v in sorted(served)]
        if self.sup.repo is not None:
            for name, version in repository_versions(self.sup.repo, self.sup.kinds):
                if (name, version) not in served:
                    why = self.failures.get(name, "unloaded")
                    out.append(RepoModel(name=name, version=version, state="UNAVAILABLE", reason=why))
        return out

    def status(self) -> list[ModelStatus]:
        """`index` plus, for each served version, its kind, card and replica processes."""
        served = {(e.config.name, e.config.version): e for e in self.sup.entries}
        out = []
        for m in self.index():
            entry = served.get((m.name, m.version))
            if entry is None:
                out.append(ModelStatus(name=m.name, version=m.version, kind="", state=m.state, reason=m.reason))
                continue
            cfg = entry.config
            replicas = [ReplicaStatus(replica=p.index, device=p.device, pid=p.process.pid or 0, ready=p.ready,
                                      restarts=p.restarts, rss_bytes=rss_bytes(p.process.pid or 0))
                        for p in self.sup.procs if p.role == "accel" and p.entry is entry]
            out.append(ModelStatus(name=m.name, version=m.version, kind=cfg.kind, state=m.state,
                                   instances=cfg.instances, memory_limit=cfg.memory_limit or 0,
                                   card=self.sup.kinds[cfg.kind].card(entry), replicas=replicas))
        return out

    # -- load / unload ----------------------------------------------------------------------------
    def load(self, name: str) -> None:
        """Start every version of `name` in the folder, switch the fronts to them, retire the old ones."""
        assert self.sup.repo is not None
        try:
            found = find_model(self.sup.repo, self.sup.kinds, name)
            if not found:
                raise LoadFailed(f"no model {name!r} in the repository {self.sup.repo.name}/ (fix: add its "
                                 "folder first)", ErrorKind.NOT_FOUND)
            entries = [build_entry(self.next_index + i, self.sup.kinds, f) for i, f in enumerate(found)]
        except ConfigError as e:
            self.failures[name] = str(e)
            raise LoadFailed(str(e)) from None
        self.next_index += len(entries)
        self._start(name, entries)
        sources = [EntrySource(index=e.index, folder=str(f[0]), code=str(f[1]), name=f[2], version=f[3])
                   for e, f in zip(entries, found)]
        old = [e for e in self.sup.entries if e.config.name == name]
        self.sup.entries.extend(entries)
        self._change(added=sources)
        self._retire(old)
        self.failures.pop(name, None)
        logger.info("loaded %s: %s (retired %s)", name, [e.key for e in entries], [e.uid for e in old])

    def unload(self, name: str) -> None:
        old = [e for e in self.sup.entries if e.config.name == name]
        if not old:
            raise LoadFailed(f"model {name!r} is not loaded", ErrorKind.NOT_FOUND)
        self._retire(old)
        logger.info("unloaded %s", name)

    def _start(self, name: str, entries: list[ModelEntry]) -> None:
        """Arenas and replicas for new entries; on failure, undo them and raise why."""
        procs = []
        # what is served once the load is done (the old versions of `name` retire): the CPU share of
        # the new workers; those already running keep theirs (see share_cpus)
        beside = [e for e in self.sup.entries if e.config.name != name] + entries
        try:
            self.sup.create_arenas(entries)
            for entry in entries:
                procs += self.sup.spawn_replicas(entry, beside)
            self.sup.await_ready(procs, watch=True)
        except (RuntimeError, ConfigError) as e:
            self.sup.stop_procs(procs, 15)
            for entry in entries:
                self.sup.release_arenas(entry.index)
            self.failures[name] = str(e)
            raise LoadFailed(f"model {name!r} failed to load: {e}", ErrorKind.INVALID) from None

    def _retire(self, old: list[ModelEntry]) -> None:
        """Fronts drop the old clients once idle; then the old workers stop and their arenas go."""
        if not old:
            return
        uids = {e.uid for e in old}
        self.sup.entries[:] = [e for e in self.sup.entries if e.uid not in uids]
        self._change(removed=sorted(uids))
        self.sup.stop_procs([p for p in self.sup.procs if p.entry is not None and p.entry.uid in uids], 15)
        for entry in old:
            self.sup.release_arenas(entry.index)

    def _change(self, added: list[EntrySource] | None = None, removed: list[str] | None = None) -> None:
        """Publish an EntriesChanged and wait until every running front applied it."""
        op_id = self.next_op = self.next_op + 1
        self.sup.publish(EntriesChanged(op_id=op_id, added=added or [], removed=removed or []))
        fronts = {p.index for p in self.sup.procs if p.role == "front" and p.process.is_alive()}
        deadline = time.monotonic() + self.sup.server.drain_timeout_s + ACK_GRACE_S
        while not fronts <= self.acks.get(op_id, set()) and time.monotonic() < deadline:
            self.sup.poll_control(100)
            self.sup.watch()
            fronts = {p.index for p in self.sup.procs if p.role == "front" and p.process.is_alive()}
        missing = fronts - self.acks.pop(op_id, set())
        if missing:  # a front restarted meanwhile starts from the new entries anyway
            logger.warning("fronts %s did not confirm repository change %d in time", sorted(missing), op_id)

    # -- poll ------------------------------------------------------------------------------------
    def _fingerprints(self) -> dict[str, Any]:
        assert self.sup.repo is not None
        return {p.name: _fingerprint(p) for p in sorted(self.sup.repo.iterdir())
                if p.is_dir() and not p.name.startswith((".", "_"))}

    def _poll(self) -> None:
        now = self._fingerprints()
        for folder, fp in now.items():
            if self.seen.get(folder) != fp:
                self._poll_load(folder)
        assert self.sup.repo is not None
        for folder in sorted(set(self.seen) - set(now)):
            gone = self.sup.repo / folder
            self._retire([e for e in self.sup.entries if e.config.path.is_relative_to(gone)])
        self.seen = now

    def _poll_load(self, folder: str) -> None:
        try:
            self.load(folder)
        except LoadFailed as e:
            logger.warning("poll: loading %s failed: %s", folder, e)
