"""Accelerator worker: one process per model replica that only batches and runs the model.

The model runs through the entry's runtime (`tandem/serving/runtimes.py`): model.py's `predict` on
torch, or an ONNX Runtime session on an exported artefact.

No pre- or post-processing runs here. Tasks arrive over ZeroMQ with tensor metadata; tensors are
read zero-copy from the fronts' shared-memory arenas, stacked (length-aware), run, and the outputs
written back into each request's slot.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import zmq

from tandem.serving.batcher import (
    ArrivalTracker,
    Pending,
    assemble,
    batch_deadline,
    pick_batch,
    plan_micro_batches,
    split_rows,
)
from tandem.serving.layout import RunLayout
from tandem.serving.messages import Result, Task, encoder, task_decoder
from tandem.serving.replicas import push_socket
from tandem.serving.repository import ModelEntry
from tandem.serving.runtimes import Runtime, load_runtime, warm_up_batches
from tandem.serving.shm import Arena
from tandem.serving.worker_proc import run_worker

__all__ = ["run_accel_worker"]

logger = logging.getLogger(__name__)


def _setup_runtime(entry: ModelEntry) -> Runtime:
    """Load the entry's runtime (torch or onnxruntime), check memory_limit, then warm it up."""
    runtime = load_runtime(entry, entry.device())
    _check_memory(entry, runtime)
    if entry.config.warmup:
        _warm_up(entry, runtime)
    return runtime


def _check_memory(entry: ModelEntry, runtime: Runtime) -> None:
    """Refuse to serve a replica that already uses more than its memory_limit after loading."""
    limit = entry.config.memory_limit
    measured = runtime.memory_used() if limit else None
    if limit and measured and measured[0] > limit:
        used, what = measured
        raise RuntimeError(f"model {entry.key} uses {used / 2**20:.0f} MiB ({what}) after setup, "
                           f"over its memory_limit of {limit / 2**20:.0f} MiB; raise memory_limit "
                           "or lower instances")


def _warm_up(entry: ModelEntry, runtime: Runtime) -> None:
    """Run the model once on dummy inputs (all ones) so the first real requests are not slow."""
    try:
        for batch in warm_up_batches(entry):
            runtime.run(batch)
    except Exception:  # a model may reject dummy data; warm-up is an optimisation, not a check
        logger.warning("warm-up predict of %s failed; continuing without it", entry.key, exc_info=True)


class _Worker:
    """State of one replica's loop: sockets, attached arenas, waiting tasks."""

    def __init__(self, entry: ModelEntry, replica: int, layout: RunLayout, runtime: Runtime) -> None:
        self.entry, self.replica, self.layout = entry, replica, layout
        self.runtime = runtime
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind(layout.task_endpoint(entry.index, replica))
        self.pushes: dict[int, zmq.Socket[Any]] = {}
        self.arenas: dict[int, Arena] = {}
        self.pending: list[Pending] = []
        self.arrivals = ArrivalTracker()
        self.device = runtime.device
        self.stopping = False
        from tandem.serving.metrics import metrics

        self.metrics = metrics()

    def arena(self, front: int) -> Arena:
        if front not in self.arenas:
            self.arenas[front] = Arena.attach(self.layout.arena_path(front, self.entry.index))
        return self.arenas[front]

    def push(self, front: int) -> zmq.Socket[Any]:
        if front not in self.pushes:
            self.pushes[front] = push_socket(self.ctx, self.layout.result_endpoint(front))
        return self.pushes[front]

    def receive(self, timeout_ms: int) -> None:
        if not self.pull.poll(timeout_ms):
            return
        while True:
            try:
                raw = self.pull.recv(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            self.accept(task_decoder.decode(raw))

    def accept(self, task: Task) -> None:
        self.arrivals.arrived(task)
        arena = self.arena(task.front)
        if arena.owner(task.slot) != task.req_id:
            self.arrivals.finished(task)
            return  # stale: the request timed out or its front restarted
        try:
            arrays = {m.name: arena.view(task.slot, m) for m in task.inputs}
        except ValueError as e:
            self.reply(task, Result(model=self.entry.uid, req_id=task.req_id, outputs=[], error=str(e)))
            return
        self.pending.append(Pending(task, time.monotonic(), arrays))

    def reply(self, task: Task, result: Result) -> None:
        self.arrivals.finished(task)
        self.push(task.front).send(encoder.encode(result), copy=False)

    def step(self) -> None:
        """Wait for work until the batch deadline, then run one batch if due."""
        b = self.entry.batching
        if not self.pending:
            self.receive(100)
            return
        delay = b.max_batch_delay_ms / 1000
        wait = batch_deadline(self.pending, b.max_batch_size, delay, self.arrivals) - time.monotonic()
        if wait > 0:
            self.receive(max(1, int(wait * 1000)))
            if batch_deadline(self.pending, b.max_batch_size, delay, self.arrivals) > time.monotonic():
                return
        else:
            self.receive(0)  # pick up what arrived during the last predict before choosing
        batch = pick_batch(self.pending, b.max_batch_size, b.length_aware)
        for group in plan_micro_batches(batch) if b.length_aware else [batch]:
            self.run_batch(group)

    def run_batch(self, batch: list[Pending]) -> None:
        start = time.monotonic()
        name = self.entry.config.name
        for p in batch:
            self.metrics.queue_time.labels(name).observe(max(0.0, start - p.task.enqueued))
        try:
            inputs = assemble([p.arrays for p in batch], self.entry.inputs)
            outputs = self.check_outputs(self.runtime.run(inputs), sum(p.rows for p in batch))
        except Exception as e:  # the boundary: predict's failure goes to each request, not the worker
            logger.exception("predict failed for %s", self.entry.key)
            for p in batch:
                self.reply(p.task, Result(model=self.entry.uid, req_id=p.task.req_id, outputs=[],
                                          error=f"predict failed: {type(e).__name__}: {e}"))
            return
        self.metrics.predict_time.labels(name).observe(time.monotonic() - start)
        self.metrics.batch_size.labels(name).observe(sum(p.rows for p in batch))
        for p, rows in zip(batch, split_rows(outputs, [p.rows for p in batch])):
            self.deliver(p, rows)

    def check_outputs(self, out: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        """Every declared output, [rows, ...], in its spec's dtype."""
        result = {}
        for spec in self.entry.outputs:
            if spec.name not in out:
                raise KeyError(f"predict did not return output {spec.name!r}")
            arr = out[spec.name]
            if arr.shape[:1] != (rows,):
                raise ValueError(f"output {spec.name!r} has batch dim {arr.shape[:1]}, expected {rows}")
            result[spec.name] = arr.astype(spec.np_dtype, copy=False)
        return result

    def deliver(self, p: Pending, rows: dict[str, np.ndarray]) -> None:
        arena = self.arena(p.task.front)
        if arena.owner(p.task.slot) != p.task.req_id:
            self.arrivals.finished(p.task)
            return  # the front gave up on this request; never write into a reused slot
        try:
            result = Result(model=self.entry.uid, req_id=p.task.req_id, outputs=arena.write(p.task.slot, rows))
        except ValueError as e:
            result = Result(model=self.entry.uid, req_id=p.task.req_id, outputs=[],
                            error=f"output does not fit the slot: {e}")
        self.reply(p.task, result)

    def stop(self) -> None:
        self.stopping = True

    def run(self) -> None:
        """Serve until stopped, then finish what is pending (SIGTERM drains)."""
        try:
            while not self.stopping or self.pending:
                self.step()
        finally:
            self.close()

    def close(self) -> None:
        for sock in [self.pull, *self.pushes.values()]:
            sock.close(linger=100)
        self.ctx.term()
        for arena in self.arenas.values():
            arena.close()


def run_accel_worker(entry: ModelEntry, replica: int, layout: RunLayout, parent_pid: int, log_level: str) -> None:
    """Process entry point (started with spawn by the supervisor)."""
    run_worker(entry, replica, layout, parent_pid, log_level, "accel",
               lambda: _Worker(entry, replica, layout, _setup_runtime(entry)))
