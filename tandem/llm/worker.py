"""LLM worker: one process per LLM replica that only runs the engine (prefill, decode, sampling).

Tokenization, detokenization, stop sequences and the HTTP protocols run in the fronts. The loop:
drain every pending message (Generate, Cancel, AdapterOp) without blocking while sequences run,
take one engine step, and send each front one `Tokens` message with what the step produced.
When idle it blocks on the socket, so an idle worker costs no CPU.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from tandem.errors import ErrorKind
from tandem.llm.messages import (
    AdapterOp,
    AdapterReply,
    Cancel,
    Generate,
    TokenItem,
    Tokens,
    worker_decoder,
)
from tandem.llm.metrics import llm_metrics
from tandem.serving.layout import RunLayout
from tandem.serving.messages import encoder
from tandem.serving.replicas import push_socket
from tandem.serving.repository import ModelEntry
from tandem.serving.worker_proc import run_worker

if TYPE_CHECKING:  # the engine (torch) is imported only inside the worker process
    from tandem.llm.engine import StepOutput

__all__ = ["build_engine", "run_llm_worker"]

logger = logging.getLogger(__name__)


def build_engine(entry: ModelEntry, device: str) -> Any:
    """Load the base model and the start-up adapters of an LLM entry (errors name the adapter)."""
    import torch

    from tandem.llm.engine import Engine, EngineLimits
    from tandem.llm.model import load_weights

    cfg = entry.config.llm
    assert cfg is not None
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        cfg.dtype, torch.bfloat16 if device.startswith("cuda") else torch.float32)
    weights = load_weights(cfg.model_dir(entry.config.path), device, dtype)
    limits = EngineLimits.from_config(cfg, entry.config.path)
    engine = Engine(weights, limits)
    for name, path in cfg.adapters.items():
        engine.add_adapter_now(name, cfg.resolve(entry.config.path, path))
    rows = engine.rows.nbytes() if engine.rows is not None else 0
    logger.info("%s on %s: weights %.1f MiB, KV cache %.1f MiB (%d slots x %d tokens), LoRA bank %.1f MiB "
                "(%d slots, rank <= %d), per-sequence LoRA copies %.1f MiB (%s)", entry.key, device,
                weights.nbytes() / 2**20, engine.cache.nbytes() / 2**20, limits.max_batch_size,
                limits.max_total_tokens, engine.bank.nbytes() / 2**20, limits.max_loras, limits.max_lora_rank,
                rows / 2**20, limits.lora_form)
    return engine


# The engine's error strings (engine.py) as the typed kinds the fronts map to statuses.
_ENGINE_ERRORS = {"not_found": ErrorKind.NOT_FOUND, "invalid": ErrorKind.VALIDATION,
                  "overloaded": ErrorKind.OVERLOADED}


def _token_item(out: StepOutput) -> TokenItem:
    """One engine output as the fronts receive it: the same fields, its error kind typed."""
    return TokenItem(req_id=out.req_id, token=out.token, logprob=out.logprob, finish=out.finish,
                     error=out.error, error_kind=_ENGINE_ERRORS.get(out.error_kind))


class _Loop:
    """The worker's message loop around one engine."""

    def __init__(self, entry: ModelEntry, engine: Any, layout: RunLayout, replica: int, device: str) -> None:
        self.entry, self.engine, self.layout, self.device = entry, engine, layout, device
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.tasks = self.ctx.socket(zmq.PULL)
        self.tasks.bind(layout.task_endpoint(entry.index, replica))
        self.results: dict[int, zmq.Socket[Any]] = {}
        self.pending_ops: list[tuple[AdapterOp, Future[Any]]] = []
        self.stopping = False
        self.m = llm_metrics()

    def stop(self) -> None:
        self.stopping = True

    def _send(self, front: int, msg: Tokens | AdapterReply) -> None:
        if front not in self.results:
            self.results[front] = push_socket(self.ctx, self.layout.result_endpoint(front))
        self.results[front].send(encoder.encode(msg))

    def run(self) -> None:
        while not self.stopping:
            busy = self.engine.has_work or self.pending_ops
            if self.tasks.poll(0 if busy else 100):
                while True:
                    try:
                        raw = self.tasks.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._handle(worker_decoder.decode(raw))
            self._finish_ops()
            if self.engine.has_work:
                self._step()
        self.engine.close()
        self.ctx.destroy(linger=0)

    def _step(self) -> None:
        eng, name = self.engine, self.entry.config.name
        t0 = time.perf_counter()
        outs = eng.step()
        phase = eng.last_phase
        self.m.llm_step_time.labels(name, phase).observe(time.perf_counter() - t0)
        self.m.llm_tokens.labels(name, phase).inc(eng.last_tokens)
        self.m.llm_running.labels(name).set(len(eng.running))
        self.m.llm_waiting.labels(name).set(len(eng.waiting))
        self._emit(outs)

    def _handle(self, msg: Generate | Cancel | AdapterOp) -> None:
        from tandem.llm.engine import GenInput

        if isinstance(msg, Generate):
            err: StepOutput | None = self.engine.submit(
                GenInput(msg.req_id, msg.prompt, msg.params, msg.adapter, msg.front))
            if err is not None:
                self._emit([err])
        elif isinstance(msg, Cancel):
            if self.engine.cancel(msg.req_id):
                self.m.llm_cancelled.labels(self.entry.config.name).inc()
                self.m.llm_running.labels(self.entry.config.name).set(len(self.engine.running))
        elif isinstance(msg, AdapterOp):
            self._adapter_op(msg)

    def _emit(self, outs: list[StepOutput]) -> None:
        by_front: dict[int, list[TokenItem]] = defaultdict(list)
        for o in outs:
            by_front[o.front].append(_token_item(o))
        for front, items in by_front.items():
            self._send(front, Tokens(model=self.entry.uid, items=items))

    def _reply(self, op: AdapterOp, error: str = "", kind: ErrorKind | None = None) -> None:
        self._send(op.front, AdapterReply(model=self.entry.uid, op_id=op.op_id, error=error, error_kind=kind,
                                          adapters=self.engine.adapters.infos()))

    def _adapter_op(self, op: AdapterOp) -> None:
        store = self.engine.adapters
        if op.kind == "list":
            self._reply(op)
        elif op.kind == "unload":
            found = store.remove(op.name)
            self._reply(op, "" if found else f"adapter {op.name!r} is not loaded",
                        None if found else ErrorKind.NOT_FOUND)
        else:
            self.pending_ops.append((op, store.add(op.name, Path(op.path))))

    def _finish_ops(self) -> None:
        """Reply to adapter loads whose background thread finished; others keep decoding meanwhile."""
        from tandem.llm.lora import AdapterError

        for op, fut in [p for p in self.pending_ops if p[1].done()]:
            self.pending_ops.remove((op, fut))
            try:
                self.engine.adapters.finish_add(fut.result())
                self._reply(op)
            except AdapterError as e:
                self._reply(op, str(e), ErrorKind.INVALID)
            except Exception as e:  # noqa: BLE001 - a bad adapter must never take the engine down
                logger.exception("loading adapter %s failed", op.name)
                self._reply(op, f"loading adapter {op.name!r} failed: {type(e).__name__}: {e}", ErrorKind.INVALID)


def run_llm_worker(entry: ModelEntry, replica: int, layout: RunLayout, parent_pid: int, log_level: str) -> None:
    """Process entry point (spawned by the supervisor)."""

    def build() -> _Loop:
        import torch

        torch.set_num_threads(entry.threads())
        device = entry.device()
        return _Loop(entry, build_engine(entry, device), layout, replica, device)

    run_worker(entry, replica, layout, parent_pid, log_level, "llm", build)
