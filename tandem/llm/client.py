"""Front side of an LLM entry: tokenizer, replica sockets, and one `Generation` per request.

    LLMClient.start(prompt ids, params, adapter)  ──Generate──▶ LLM worker
    Generation.events()  ◀── Tokens (routed here by the front's Router) ── detokenize, stop sequences

`start` returns only after the first token (or an error) arrived, so errors such as an unknown
adapter become proper 4xx responses before any streaming starts. A generation closed early
(client gone, stop sequence) sends `Cancel`, which frees its KV slot at the worker's next step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import zmq.asyncio

from tandem.envs import extra_adapter_dirs
from tandem.errors import ErrorKind, InvalidInput, Overloaded, RequestTimeout, TooManyTokens, error_for
from tandem.llm.messages import AdapterOp, AdapterReply, Cancel, Generate, TokenItem, Tokens
from tandem.llm.metrics import llm_metrics
from tandem.llm.params import SamplingParams
from tandem.llm.text import Detokenizer, StopMatcher, load_tokenizer
from tandem.serving.layout import RunLayout
from tandem.serving.messages import encoder
from tandem.serving.replicas import ReplicaSet, next_request_id
from tandem.serving.repository import ModelEntry

__all__ = ["GenEvent", "Generation", "LLMClient"]


@dataclass(frozen=True)
class GenEvent:
    """One generated token as the APIs report it. `text` is what this token adds after stop handling."""

    token: int
    text: str
    logprob: float
    special: bool
    finish: str | None  # None | "length" | "eos_token" | "stop_sequence"


@dataclass
class Generation:
    """One running request: iterate `events()`, then `close()` (idempotent)."""

    client: LLMClient
    req_id: int
    replica: int
    prompt: list[int]
    stops: StopMatcher
    include_stop: bool
    queue: asyncio.Queue[TokenItem] = field(default_factory=asyncio.Queue)
    first: TokenItem | None = None
    done: bool = False

    async def _next(self) -> TokenItem:
        if self.first is not None:
            item, self.first = self.first, None
            return item
        try:
            return await asyncio.wait_for(self.queue.get(), self.client.timeout_s)
        except TimeoutError:
            raise RequestTimeout(f"no token from {self.client.key} within {self.client.timeout_s} s") from None

    async def events(self) -> AsyncIterator[GenEvent]:
        detok = Detokenizer(self.client.tokenizer, self.prompt)
        while not self.done:
            item = await self._next()
            if item.error:
                self.done = True
                raise error_for(item.error_kind or ErrorKind.INTERNAL, item.error)
            text, stop = self.stops.feed(detok.push(item.token))
            finish: str | None = item.finish or None
            if stop is not None:
                text, finish = text + (stop if self.include_stop else ""), "stop_sequence"
            elif finish:
                text += self.stops.flush()
            self.done = finish is not None
            yield GenEvent(item.token, text, item.logprob, item.token in self.client.special_ids, finish)

    async def close(self) -> None:
        self.client.forget(self)
        if not self.done:
            self.done = True
            await self.client.replicas.send(self.replica, encoder.encode(Cancel(req_id=self.req_id)))


class LLMClient:
    """Per-front connection to the replicas of one LLM entry (the kind's `FrontClient`)."""

    kind = "llm"

    def __init__(self, entry: ModelEntry, ctx: zmq.asyncio.Context, layout: RunLayout, front: int) -> None:
        cfg = entry.config.llm
        assert cfg is not None
        self.entry, self.cfg, self.layout, self.front, self.ctx = entry, cfg, layout, front, ctx
        self.key, self.name = entry.key, entry.config.name
        self.tokenizer = load_tokenizer(cfg.model_dir(entry.config.path))
        self.special_ids = frozenset(self.tokenizer.all_special_ids)
        self.max_total_tokens = cfg.total_tokens(entry.config.path)
        self.timeout_s = entry.config.timeout_s
        endpoints = [layout.task_endpoint(entry.index, r) for r in range(entry.config.instances)]
        self.replicas = ReplicaSet(ctx, endpoints, entry.key)
        self.streams: dict[int, Generation] = {}
        self.ops: dict[int, asyncio.Future[AdapterReply]] = {}
        own = cfg.adapter_dirs or sorted({str(Path(p).parent) for p in cfg.adapters.values()})
        self.adapter_dir_names = [*own, *(d for d in extra_adapter_dirs() if d not in own)]  # + serve --adapter-dir
        self.adapter_dirs = [cfg.resolve(entry.config.path, d) for d in self.adapter_dir_names]

    @property
    def ready(self) -> bool:
        return self.replicas.ready

    @property
    def in_flight(self) -> int:
        return len(self.streams) + len(self.ops)

    async def close(self) -> None:
        """Nothing to release: the router destroys the sockets with its context."""

    def on_message(self, msg: Any) -> None:
        if isinstance(msg, Tokens):
            self.on_tokens(msg)
        elif isinstance(msg, AdapterReply):
            self.on_reply(msg)

    # -- generation --------------------------------------------------------------------------------
    def check_length(self, prompt: list[int], max_new_tokens: int) -> None:
        if not prompt:
            raise InvalidInput("the prompt is empty")
        if len(prompt) + max_new_tokens > self.max_total_tokens:
            raise TooManyTokens(f"prompt has {len(prompt)} tokens and max_new_tokens is {max_new_tokens}: "
                                f"together they must be <= {self.max_total_tokens} (max_total_tokens of "
                                f"{self.name}); shorten the prompt or lower max_new_tokens")

    async def start(self, prompt: list[int], params: SamplingParams, adapter: str = "",
                    stops: list[str] | None = None, include_stop: bool = True) -> Generation:
        """Send the request and wait for its first token; raises the mapped error if it fails at once."""
        self.check_length(prompt, params.max_new_tokens)
        replica = self.replicas.pick()
        gen = Generation(self, next_request_id(), replica, prompt, StopMatcher(stops or []), include_stop)
        self.streams[gen.req_id] = gen
        self.replicas.outstanding[replica] += 1
        t0 = time.perf_counter()
        try:
            msg = Generate(req_id=gen.req_id, front=self.front, prompt=prompt, params=params, adapter=adapter)
            await self.replicas.send(replica, encoder.encode(msg))
            gen.first = await gen._next()
            llm_metrics().llm_ttft.labels(self.name).observe(time.perf_counter() - t0)
            if gen.first.error:
                gen.done = True
                raise error_for(gen.first.error_kind or ErrorKind.INTERNAL, gen.first.error)
        except BaseException:
            await gen.close()
            raise
        return gen

    def forget(self, gen: Generation) -> None:
        if self.streams.pop(gen.req_id, None) is not None:
            self.replicas.outstanding[gen.replica] -= 1

    def on_tokens(self, msg: Tokens) -> None:
        for item in msg.items:
            gen = self.streams.get(item.req_id)
            if gen is not None:
                gen.queue.put_nowait(item)  # bounded by the request's max_new_tokens

    # -- adapters ----------------------------------------------------------------------------------
    def confine(self, path: str) -> Path:
        """Resolve an adapter path named by a request; it must lie inside a configured adapter dir."""
        if "\x00" in path:
            raise InvalidInput("lora_path must not contain a NUL byte")
        p = Path(path).expanduser()
        resolved = (p if p.is_absolute() else self.adapter_dirs[0] / p).resolve() if self.adapter_dirs else None
        if resolved is None or not any(resolved.is_relative_to(d) for d in self.adapter_dirs):
            # as configured (relative to the entry's folder where so written): no server layout leaks
            allowed = ", ".join(self.adapter_dir_names) or \
                "none configured (set llm.adapter_dirs, or start with tandem serve --adapter-dir DIR)"
            raise InvalidInput(f"lora_path {path!r} is outside the allowed adapter directories: {allowed}")
        return resolved

    async def adapter_op(self, kind: Literal["load", "unload", "list"], name: str = "",
                         path: str = "") -> AdapterReply:
        """Run a load/unload/list on every live replica; returns the first failure or the last reply."""
        loop = asyncio.get_running_loop()
        waits = []
        for r in self.replicas.live():
            op_id = next_request_id()
            fut: asyncio.Future[AdapterReply] = loop.create_future()
            self.ops[op_id] = fut
            waits.append(fut)
            op = AdapterOp(op_id=op_id, front=self.front, kind=kind, name=name, path=path)
            await self.replicas.send(r, encoder.encode(op))
        if not waits:
            raise Overloaded(f"{self.key} has no live replica (restarting); retry shortly", retry_after=2.0)
        try:
            replies = await asyncio.wait_for(asyncio.gather(*waits), max(60.0, self.timeout_s))
        except TimeoutError:
            raise RequestTimeout(f"{self.key} did not finish the adapter operation in time") from None
        finally:
            for op_id in [k for k, f in self.ops.items() if f in waits]:
                del self.ops[op_id]
        failed = [r for r in replies if r.error]
        if failed and kind == "load" and len(failed) < len(replies):  # keep replicas in step: undo
            await self.adapter_op("unload", name)
        return failed[0] if failed else replies[-1]

    def on_reply(self, msg: AdapterReply) -> None:
        fut = self.ops.get(msg.op_id)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    # -- replica health ----------------------------------------------------------------------------
    def replica_down(self, replica: int) -> None:
        self.replicas.mark_down(replica)
        for gen in self.streams.values():
            if gen.replica == replica:
                gen.queue.put_nowait(TokenItem(req_id=gen.req_id, token=-1, error=(
                    f"LLM worker {self.key}#{replica} died while running this request"), error_kind=ErrorKind.DIED))

    def replica_up(self, replica: int) -> None:
        self.replicas.mark_up(replica)
