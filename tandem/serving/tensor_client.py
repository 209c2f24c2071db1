"""The front's side of a tensor model: slots, replica choice, futures, and failure handling.

`TensorClient.infer` writes a request's tensors into a free slot of this front's arena, sends a
`Task` to the least-busy live replica and awaits its `Result`. The slot pool is the bounded queue:
no free slot means 503 at once, so memory never grows with load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq.asyncio

from tandem.errors import InferenceFailed, Overloaded, PayloadTooLarge, RequestTimeout, WorkerDied
from tandem.model import Model, Request
from tandem.serving.layout import RunLayout
from tandem.serving.messages import Result, Task, encoder
from tandem.serving.metrics import metrics
from tandem.serving.replicas import ReplicaSet, next_request_id
from tandem.serving.repository import ModelEntry, instantiate
from tandem.serving.shm import Arena, SlotPool

__all__ = ["TensorClient"]

logger = logging.getLogger(__name__)


@dataclass
class _Waiter:
    future: asyncio.Future[Result]
    replica: int


class TensorClient:
    """One tensor-model version as a front sees it: its Model object, arena, replicas and waiters."""

    kind = "model"

    def __init__(self, entry: ModelEntry, ctx: zmq.asyncio.Context, layout: RunLayout, front: int) -> None:
        self.entry, self.front = entry, front
        self.key, self.name = entry.key, entry.config.name
        self.model: Model = instantiate(entry)
        self.model.setup_cpu()
        arena = Arena.attach(layout.arena_path(front, entry.index))
        for slot in range(arena.n_slots):  # a restarted front starts with every slot free
            arena.set_owner(slot, 0)
        self.pool = SlotPool(arena)
        # no zmq high-water mark: the slot pool bounds what is in flight
        endpoints = [layout.task_endpoint(entry.index, r) for r in range(entry.config.instances)]
        self.replicas = ReplicaSet(ctx, endpoints, entry.key, unbounded=True)
        self.waiting: dict[int, _Waiter] = {}
        self.preprocessing = 0  # requests of this model inside preprocess() right now
        self.active = 0  # requests being handled with this client, from lookup to response

    @property
    def ready(self) -> bool:
        return self.replicas.ready

    @property
    def in_flight(self) -> int:
        return self.active + len(self.waiting)

    @contextlib.contextmanager
    def use(self) -> Iterator[TensorClient]:
        """Hold the client for one request, so a retiring version is closed only after it."""
        self.active += 1
        try:
            yield self
        finally:
            self.active -= 1

    def on_message(self, msg: Any) -> None:
        waiter = self.waiting.get(msg.req_id)
        if waiter is not None and not waiter.future.done():
            waiter.future.set_result(msg)

    def replica_up(self, replica: int) -> None:
        self.replicas.mark_up(replica)

    def replica_down(self, replica: int) -> None:
        self.replicas.mark_down(replica)
        for waiter in list(self.waiting.values()):
            if waiter.replica == replica and not waiter.future.done():
                waiter.future.set_exception(WorkerDied(
                    f"accelerator worker {self.key}#{replica} died while running this request"))

    async def close(self) -> None:
        self.pool.arena.close()

    def _full(self) -> Overloaded:
        return Overloaded(f"queue of model {self.key} is full ({self.entry.config.queue_size} requests per "
                          "front); retry later")

    def admit(self) -> None:
        """503 at once, before a request's body is read and preprocessed, when it could not run now.

        Keeps rejection cheap under overload (benchmarks/overload.py): no live replica, or no free
        slot in this front's arena. `infer` checks again: a slot can go while the body is read.
        """
        self.replicas.pick()
        if not self.pool.free:
            raise self._full()

    def preprocess(self, request: Request) -> Any:
        """The user model's preprocess of one request, counted in `preprocessing` and timed.

        Every path into preprocess goes through here so the count stays right: `infer` adds it to a
        task's `expect`, which tells the batcher how many more requests are about to arrive. Returns
        what preprocess returned, unchecked (the caller checks it against the inputs it expects).
        """
        t0 = time.perf_counter()
        self.preprocessing += 1
        try:
            arrays = self.model.preprocess(request)
        finally:
            self.preprocessing -= 1
        metrics().preprocess_time.labels(self.name).observe(time.perf_counter() - t0)
        return arrays

    async def infer(self, arrays: dict[str, np.ndarray], rows: int, length: int) -> dict[str, np.ndarray]:
        """Run one request ([rows, ...] arrays) through a replica; returns copies of its outputs."""
        replica = self.replicas.pick()
        req_id = next_request_id()
        slot = self.pool.acquire(req_id)
        if slot is None:
            raise self._full()
        waiter = _Waiter(asyncio.get_running_loop().create_future(), replica)
        self.waiting[req_id] = waiter
        self.replicas.outstanding[replica] += 1
        try:
            try:
                metas = self.pool.arena.write(slot, arrays)
            except ValueError as e:
                raise PayloadTooLarge(f"request for {self.key} is too large: {e}") from None
            task = Task(req_id=req_id, front=self.front, slot=slot, rows=rows, length=length, inputs=metas,
                        enqueued=time.monotonic(),
                        expect=self.replicas.outstanding[replica] + self.preprocessing)
            await self.replicas.send(replica, encoder.encode(task))
            try:
                result = await asyncio.wait_for(waiter.future, self.entry.config.timeout_s)
            except TimeoutError:
                raise RequestTimeout(f"model {self.key} did not answer within "
                                     f"{self.entry.config.timeout_s} s") from None
            if result.error:
                raise InferenceFailed(result.error)
            return {m.name: self.pool.arena.view(slot, m).copy() for m in result.outputs}
        finally:
            del self.waiting[req_id]
            self.replicas.outstanding[replica] -= 1
            self.pool.release(slot)
