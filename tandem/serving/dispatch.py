"""The front's side of inference: slots, replica choice, futures, and failure handling.

`Dispatcher.infer` writes a request's tensors into a free slot of this front's arena, sends a
`Task` to the least-busy live replica and awaits its `Result`. The slot pool is the bounded queue:
no free slot means 503 at once, so memory never grows with load.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import zmq
import zmq.asyncio

from tandem.errors import InferenceFailed, Overloaded, PayloadTooLarge, RequestTimeout, WorkerDied
from tandem.llm.client import LLMClient
from tandem.serving.layout import RunLayout
from tandem.serving.messages import AdapterReply, Event, Result, Task, Tokens, decoder, encoder
from tandem.serving.replicas import least_busy, push_socket
from tandem.serving.repository import ModelEntry
from tandem.serving.shm import Arena, SlotPool

__all__ = ["Dispatcher", "ModelState"]

logger = logging.getLogger(__name__)


@dataclass
class _Waiter:
    future: asyncio.Future[Result]
    model: ModelState
    replica: int


@dataclass
class ModelState:
    """One model version as a front sees it: its arena, replica sockets and their health."""

    entry: ModelEntry
    pool: SlotPool
    sockets: list[zmq.asyncio.Socket]
    up: list[bool]
    outstanding: list[int] = field(default_factory=list)
    preprocessing: int = 0  # requests of this model inside preprocess() right now

    def pick_replica(self) -> int:
        return least_busy(self.up, self.outstanding, self.entry.key)

    @property
    def ready(self) -> bool:
        return any(self.up)


class Dispatcher:
    """Per-front connection to every model's replicas (one per front process, on its event loop)."""

    def __init__(self, entries: list[ModelEntry], layout: RunLayout, front: int) -> None:
        self.layout, self.front = layout, front
        self.ctx = zmq.asyncio.Context()
        self.models: dict[str, ModelState] = {}
        self.waiting: dict[int, _Waiter] = {}
        self._ids = itertools.count((os.getpid() & 0xFFFFFF) << 32 | 1)
        self.llms: dict[str, LLMClient] = {}
        for entry in entries:
            if entry.is_llm:
                self.llms[entry.key] = LLMClient(entry, self.ctx, layout, front)
                continue
            arena = Arena.attach(layout.arena_path(front, entry.index))
            for slot in range(arena.n_slots):  # a restarted front starts with every slot free
                arena.set_owner(slot, 0)
            n = entry.config.instances
            self.models[entry.key] = ModelState(
                entry, SlotPool(arena), [self._task_socket(entry, r) for r in range(n)], [True] * n, [0] * n)
        self.results = self.ctx.socket(zmq.PULL)
        self.results.bind(layout.result_endpoint(front))
        self.events = self.ctx.socket(zmq.SUB)
        self.events.setsockopt(zmq.SUBSCRIBE, b"")
        self.events.connect(layout.events_endpoint)
        self._tasks: list[asyncio.Task[None]] = []

    def _task_socket(self, entry: ModelEntry, replica: int) -> zmq.asyncio.Socket:
        # no zmq high-water mark: the slot pool bounds what is in flight
        return push_socket(self.ctx, self.layout.task_endpoint(entry.index, replica), unbounded=True)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._read_results()), asyncio.create_task(self._read_events())]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        self.ctx.destroy(linger=0)

    async def _read_results(self) -> None:
        while True:
            msg = decoder.decode(await self.results.recv())
            if isinstance(msg, Result):
                waiter = self.waiting.get(msg.req_id)
                if waiter is not None and not waiter.future.done():
                    waiter.future.set_result(msg)
            elif isinstance(msg, Tokens) and msg.model in self.llms:
                self.llms[msg.model].on_tokens(msg)
            elif isinstance(msg, AdapterReply) and msg.model in self.llms:
                self.llms[msg.model].on_reply(msg)

    async def _read_events(self) -> None:
        while True:
            msg = decoder.decode(await self.events.recv())
            if isinstance(msg, Event) and msg.model in self.models:
                self._on_event(msg)
            elif isinstance(msg, Event) and msg.model in self.llms:
                llm = self.llms[msg.model]
                llm.replica_up(msg.replica) if msg.kind == "up" else llm.replica_down(msg.replica)

    def _on_event(self, event: Event) -> None:
        state = self.models[event.model]
        if event.kind == "up":
            state.up[event.replica] = True
            return
        state.up[event.replica] = False
        # Tasks still queued for the dead process must not reach its successor: new socket.
        state.sockets[event.replica].close(linger=0)
        state.sockets[event.replica] = self._task_socket(state.entry, event.replica)
        for waiter in list(self.waiting.values()):
            if waiter.model is state and waiter.replica == event.replica and not waiter.future.done():
                waiter.future.set_exception(WorkerDied(
                    f"accelerator worker {event.model}#{event.replica} died while running this request"))

    async def infer(self, state: ModelState, arrays: dict[str, np.ndarray], rows: int,
                    length: int) -> dict[str, np.ndarray]:
        """Run one request ([rows, ...] arrays) through a replica; returns copies of its outputs."""
        replica = state.pick_replica()
        req_id = next(self._ids)
        slot = state.pool.acquire(req_id)
        if slot is None:
            raise Overloaded(f"queue of model {state.entry.key} is full "
                             f"({state.entry.config.queue_size} requests per front); retry later")
        waiter = _Waiter(asyncio.get_running_loop().create_future(), state, replica)
        self.waiting[req_id] = waiter
        state.outstanding[replica] += 1
        try:
            try:
                metas = state.pool.arena.write(slot, arrays)
            except ValueError as e:
                raise PayloadTooLarge(f"request for {state.entry.key} is too large: {e}") from None
            expect = state.outstanding[replica] + state.preprocessing
            task = Task(req_id, self.front, slot, rows, length, metas, time.monotonic(), expect)
            await state.sockets[replica].send(encoder.encode(task), copy=False)
            try:
                result = await asyncio.wait_for(waiter.future, state.entry.config.timeout_s)
            except TimeoutError:
                raise RequestTimeout(f"model {state.entry.key} did not answer within "
                                     f"{state.entry.config.timeout_s} s") from None
            if result.error:
                raise InferenceFailed(result.error)
            return {m.name: state.pool.arena.view(slot, m).copy() for m in result.outputs}
        finally:
            del self.waiting[req_id]
            state.outstanding[replica] -= 1
            state.pool.release(slot)

    def all_ready(self) -> bool:
        return all(s.ready for s in self.models.values()) and all(any(c.up) for c in self.llms.values())
