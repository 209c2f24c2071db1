"""A front's message router: one result socket and one event subscription for every entry.

Workers of every kind push their replies to the front's result socket; each reply names its entry
(`model`), and the router hands it to that entry's client. Supervisor events (replica down/up) go
the same way. The router knows only the `FrontClient` interface, never a kind.

Repository operations (`repo_op`) go to the supervisor; when it adds entries the router builds their
clients, and when it retires entries the router drops their clients at once (new requests go
elsewhere), waits until their last request finished, and confirms.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import reduce
from operator import or_
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from tandem.errors import RequestTimeout, error_for
from tandem.serving.kinds import FrontClient, Kinds
from tandem.serving.layout import RunLayout
from tandem.serving.messages import (
    EntriesAck,
    EntriesChanged,
    Event,
    RepoOp,
    RepoReply,
    encoder,
    events_decoder,
)
from tandem.serving.replicas import next_request_id, push_socket
from tandem.serving.repository import ModelEntry, build_entry

__all__ = ["Router"]

logger = logging.getLogger(__name__)


def _reply_decoder(kinds: Kinds) -> msgspec.msgpack.Decoder[Any]:
    """One decoder for every front-bound message type the registered kinds declare."""
    types = [t for kind in kinds.values() for t in kind.messages]
    return msgspec.msgpack.Decoder(reduce(or_, types))


class Router:
    """Per-front connection to every entry's replicas (one per front process, on its event loop)."""

    def __init__(self, entries: list[ModelEntry], kinds: Kinds, layout: RunLayout, front: int,
                 drain_timeout_s: float = 30.0) -> None:
        self.layout, self.front, self.kinds, self.drain_timeout_s = layout, front, kinds, drain_timeout_s
        self.ctx = zmq.asyncio.Context()
        self.clients: dict[str, FrontClient] = {}
        # clients of removed (rolled-over) entries while their in-flight requests finish: their replies and
        # replica events must still reach them, or those requests wait out their timeout (a 504 per request)
        self.draining: dict[str, FrontClient] = {}
        try:
            for entry in entries:
                self.clients[entry.uid] = kinds[entry.config.kind].client(entry, self.ctx, layout, front)
        except BaseException:
            self.ctx.destroy(linger=0)
            raise
        self.decoder = _reply_decoder(kinds)
        self.results = self.ctx.socket(zmq.PULL)
        self.results.bind(layout.result_endpoint(front))
        self.events = self.ctx.socket(zmq.SUB)
        self.events.setsockopt(zmq.SUBSCRIBE, b"")
        self.events.connect(layout.events_endpoint)
        self.control = push_socket(self.ctx, layout.control_endpoint)
        self.repo_waits: dict[int, asyncio.Future[RepoReply]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._read_results()), asyncio.create_task(self._read_events())]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for client in [*self.clients.values(), *self.draining.values()]:
            await client.close()
        self.ctx.destroy(linger=0)

    def _client(self, uid: str) -> FrontClient | None:
        return self.clients.get(uid) or self.draining.get(uid)

    async def _read_results(self) -> None:
        while True:
            raw = await self.results.recv()
            try:
                msg = self.decoder.decode(raw)
            except msgspec.DecodeError:
                logger.exception("undecodable reply on the result socket")
                continue
            client = self._client(msg.model)
            if client is not None:
                client.on_message(msg)

    async def _read_events(self) -> None:
        while True:
            msg = events_decoder.decode(await self.events.recv())
            if isinstance(msg, Event):
                self._on_event(msg)
            elif isinstance(msg, RepoReply):
                fut = self.repo_waits.get(msg.op_id)
                if msg.front == self.front and fut is not None and not fut.done():
                    fut.set_result(msg)
            else:  # one change at a time, in order; replies to requests keep flowing meanwhile
                self._tasks.append(asyncio.create_task(self._apply(msg)))

    def _on_event(self, msg: Event) -> None:
        client = self._client(msg.model)
        if client is None:
            return
        if msg.kind == "up":
            client.replica_up(msg.replica)
        else:
            client.replica_down(msg.replica)

    async def _apply(self, change: EntriesChanged) -> None:
        error = ""
        try:
            for src in change.added:
                found = (Path(src.folder), Path(src.code), src.name, src.version)
                entry = build_entry(src.index, self.kinds, found)
                self.clients[entry.uid] = self.kinds[entry.config.kind].client(entry, self.ctx, self.layout, self.front)
            gone = {uid: self.clients.pop(uid) for uid in change.removed if uid in self.clients}
            self.draining.update(gone)
            deadline = time.monotonic() + self.drain_timeout_s
            while any(c.in_flight for c in gone.values()) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            for uid, client in gone.items():
                self.draining.pop(uid, None)
                await client.close()
        except Exception as e:  # noqa: BLE001 - report to the supervisor, keep serving the rest
            logger.exception("applying repository change %d failed", change.op_id)
            error = f"{type(e).__name__}: {e}"
        ack = EntriesAck(op_id=change.op_id, front=self.front, error=error)
        await self.control.send(encoder.encode(ack))

    async def repo_op(self, kind: str, name: str = "", timeout_s: float = 900.0) -> list[Any]:
        """Ask the supervisor to index, load, unload or report status; raises the mapped error when it failed.

        Returns the `RepoModel`s of the repository (the `ModelStatus`es for "status")."""
        op = RepoOp(op_id=next_request_id(), front=self.front, kind=kind, name=name)  # type: ignore[arg-type]
        fut: asyncio.Future[RepoReply] = asyncio.get_running_loop().create_future()
        self.repo_waits[op.op_id] = fut
        try:
            await self.control.send(encoder.encode(op))
            reply = await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            raise RequestTimeout(f"repository {kind} {name!r} did not finish in {timeout_s:.0f} s") from None
        finally:
            del self.repo_waits[op.op_id]
        if reply.error:
            raise error_for(reply.error_kind, reply.error)
        return reply.status if kind == "status" else reply.models

    def all_ready(self) -> bool:
        return all(c.ready for c in self.clients.values())
