"""Continuous batching: requests join and leave between decode steps; one gathered LoRA pass per layer.

One `step()`:
    1. admit waiting requests (FIFO) while a sequence slot, an adapter slot and prefill budget allow;
    2. if any were admitted, prefill them together (right-padded, [S_new, L]) and choose their first
       token; otherwise decode every running sequence by one token ([S, 1]), mixed adapters in one batch;
    3. retire finished or cancelled sequences, compacting the KV cache so running sequences
       always occupy slots 0..n-1 (decode attention then reads views, never gathers the cache).

The engine is synchronous and single-threaded; the worker process drives it between messages.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from tandem.llm.adapters import AdapterStore
from tandem.llm.lora import LoraBank, SlotCopies
from tandem.llm.model import KVCache, LlamaWeights, forward
from tandem.llm.sampling import SamplerState, SamplingParams, choose, note_token, to_host

if TYPE_CHECKING:
    from tandem.config import LLMConfig

__all__ = ["Engine", "EngineLimits", "Finish", "GenInput", "StepOutput"]

Finish = Literal["", "length", "eos_token"]  # why a sequence ended ("" = it goes on); TokenItem's too

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int = 32  # sequence slots in the KV cache
    max_total_tokens: int = 256  # prompt + generated, per sequence
    max_prefill_tokens: int = 4096  # padded prompt tokens in one prefill call
    max_waiting: int = 256  # queued requests beyond the running ones
    max_loras: int = 8
    max_cpu_loras: int = 32
    max_lora_rank: int = 16
    lora_form: str = "slots"  # "slots" | "gathered" (BGMV-style) | "grouped" (SGMV-style); see lora.py

    @classmethod
    def from_config(cls, cfg: LLMConfig, model_path: Path) -> EngineLimits:
        """The limits an entry's `llm:` section asks for; `model_path` is the entry's folder.

        By name, not position, so a field added to either side cannot silently shift the others;
        max_total_tokens is capped at the model's max_position_embeddings, as the fronts cap it.
        """
        return cls(max_batch_size=cfg.max_batch_size, max_total_tokens=cfg.total_tokens(model_path),
                   max_prefill_tokens=cfg.max_prefill_tokens, max_waiting=cfg.max_waiting,
                   max_loras=cfg.max_loras, max_cpu_loras=cfg.max_cpu_loras, max_lora_rank=cfg.max_lora_rank,
                   lora_form=cfg.lora_form)


@dataclass
class GenInput:
    """A request as the engine receives it (from a front, or directly in tests and benchmarks)."""

    req_id: int
    prompt: list[int]
    params: SamplingParams
    adapter: str = ""  # "" = base model
    front: int = 0


@dataclass(frozen=True)
class StepOutput:
    """One token for one request (or its end). `error_kind` maps to an HTTP status at the front."""

    req_id: int
    front: int
    token: int = -1
    logprob: float = 0.0
    finish: Finish = ""
    error: str = ""
    error_kind: str = ""  # "" | "not_found" | "invalid" | "overloaded"


@dataclass(eq=False)  # identity: compared with `in`, `index` and `remove`
class _Seq:
    inp: GenInput
    sampler: SamplerState
    bank_slot: int
    length: int = 0  # tokens in the cache
    generated: int = 0
    next_token: int = -1


class Engine:
    """Generation over a fixed set of KV slots, for base and adapter requests mixed in one batch."""

    def __init__(self, weights: LlamaWeights, limits: EngineLimits) -> None:
        spec = weights.spec
        if limits.max_total_tokens > spec.max_positions:
            raise ValueError(f"max_total_tokens {limits.max_total_tokens} exceeds the model's "
                             f"max_position_embeddings {spec.max_positions}")
        if spec.sliding_window and limits.max_total_tokens > spec.sliding_window:
            raise ValueError(f"max_total_tokens {limits.max_total_tokens} exceeds the sliding window "
                             f"{spec.sliding_window} (windowed attention is not implemented)")
        self.w, self.limits = weights, limits
        self.cache = KVCache.allocate(spec, limits.max_batch_size, limits.max_total_tokens, weights.device,
                                      weights.dtype)
        self.bank = LoraBank(spec, limits.max_loras, limits.max_lora_rank, weights.device, weights.dtype,
                             limits.lora_form)
        self.adapters = AdapterStore(spec, self.bank, limits.max_cpu_loras)
        self.rows = SlotCopies(self.bank, limits.max_batch_size) if limits.lora_form == "slots" else None
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []  # index == KV slot
        self.eos = set(spec.eos_token_ids)
        self.last_phase, self.last_tokens = "", 0  # what the last step did (for metrics)

    # -- requests ----------------------------------------------------------------------------------
    def submit(self, inp: GenInput) -> StepOutput | None:
        """Queue a request; returns an error output at once if it cannot be served."""
        if inp.adapter and inp.adapter not in self.adapters.known:
            known = ", ".join(sorted(self.adapters.known)) or "none"
            return StepOutput(inp.req_id, inp.front, error=f"unknown adapter {inp.adapter!r}; loaded: {known}",
                              error_kind="not_found")
        limit = self.limits.max_total_tokens
        if not inp.prompt or len(inp.prompt) + inp.params.max_new_tokens > limit:
            return StepOutput(inp.req_id, inp.front, error_kind="invalid", error=(
                f"prompt ({len(inp.prompt)} tokens) + max_new_tokens ({inp.params.max_new_tokens}) must be "
                f"between 1 and max_total_tokens = {limit}"))
        if len(self.waiting) >= self.limits.max_waiting:
            return StepOutput(inp.req_id, inp.front, error_kind="overloaded",
                              error=f"{len(self.waiting)} requests already waiting; retry later")
        sampler = SamplerState.create(inp.params, inp.prompt, self.w.spec.vocab_size, self.w.device)
        self.waiting.append(_Seq(inp, sampler, bank_slot=-1))
        return None

    def cancel(self, req_id: int) -> bool:
        """Drop a request wherever it is; its KV slot is free for the next step."""
        for seq in self.waiting:
            if seq.inp.req_id == req_id:
                self.waiting.remove(seq)
                return True
        for i, seq in enumerate(self.running):
            if seq.inp.req_id == req_id:
                self._retire(i)
                return True
        return False

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # -- one iteration -----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Prefill newly admitted requests if any, else decode every running one; one output per token.

        A prefill step returns at once, so its first tokens reach clients before the next decode.
        """
        self.adapters.poll()
        new, dropped = self._admit()  # dropped: their adapter went away while they waited
        if new:
            self.last_phase, self.last_tokens = "prefill", sum(len(s.inp.prompt) for s in new)
            return dropped + self._prefill(new)
        self.last_phase, self.last_tokens = "decode", len(self.running)
        return dropped + (self._decode() if self.running else [])

    def _admit(self) -> tuple[list[_Seq], list[StepOutput]]:
        new: list[_Seq] = []
        dropped: list[StepOutput] = []
        budget, longest = self.limits.max_prefill_tokens, 0
        skipped: list[_Seq] = []
        while self.waiting and len(self.running) < self.limits.max_batch_size:
            seq = self.waiting[0]
            longest_if = max(longest, len(seq.inp.prompt))
            if new and longest_if * (len(new) + 1) > budget:
                break
            self.waiting.popleft()
            if seq.inp.adapter and seq.inp.adapter not in self.adapters.known:  # unloaded while waiting
                why = self.adapters.broken.get(seq.inp.adapter, f"adapter {seq.inp.adapter!r} was unloaded")
                dropped.append(StepOutput(seq.inp.req_id, seq.inp.front, error=why, error_kind="not_found"))
                continue
            slot = self.adapters.acquire(seq.inp.adapter) if seq.inp.adapter else 0
            if slot is None:  # adapter still loading or every bank slot pinned: others go first
                skipped.append(seq)
                continue
            seq.bank_slot, longest = slot, longest_if
            if self.rows is not None:
                self.rows.assign(len(self.running), slot)
            self.running.append(seq)
            new.append(seq)
        self.waiting.extendleft(reversed(skipped))
        return new, dropped

    def _prefill(self, new: list[_Seq]) -> list[StepOutput]:
        first = len(self.running) - len(new)
        S, L = len(new), max(len(s.inp.prompt) for s in new)
        tokens = torch.zeros(S, L, dtype=torch.long)
        for i, s in enumerate(new):
            tokens[i, :len(s.inp.prompt)] = torch.tensor(s.inp.prompt)
        dev = self.w.device
        lengths = torch.tensor([len(s.inp.prompt) for s in new], device=dev)
        logits = forward(self.w, tokens.to(dev), self.cache, torch.arange(first, first + S, device=dev),
                         torch.zeros(S, dtype=torch.long, device=dev), lengths, lengths - 1,
                         self.bank.hook([s.bank_slot for s in new], self.rows, first), prefill=True)  # [S, V]
        for s in new:
            s.length = len(s.inp.prompt)
        return self._emit(new, logits)

    def _decode(self) -> list[StepOutput]:
        seqs = self.running
        dev = self.w.device
        tokens = torch.tensor([[s.next_token] for s in seqs], device=dev)  # [S, 1]
        host_starts = [s.length for s in seqs]
        starts = torch.tensor(host_starts, device=dev)  # [S]
        logits = forward(self.w, tokens, self.cache, torch.arange(len(seqs), device=dev), starts, starts + 1,
                         torch.zeros(len(seqs), dtype=torch.long, device=dev),
                         self.bank.hook([s.bank_slot for s in seqs], self.rows, 0),
                         n_ctx=max(host_starts) + 1)  # known here: no device read inside forward
        for s in seqs:
            s.length += 1
        return self._emit(list(seqs), logits)

    def _emit(self, seqs: list[_Seq], logits: Tensor) -> list[StepOutput]:
        states = [s.sampler for s in seqs]
        tokens, logprobs = choose(logits, states)
        token_list, lp_list = to_host(tokens, logprobs)  # the step's one device -> host transfer
        note_token(states, token_list)
        outs, done = [], []
        for s, tok, lp in zip(seqs, token_list, lp_list):
            s.generated += 1
            s.next_token = tok
            finish: Finish = ""
            if tok in self.eos and not s.sampler.params.ignore_eos:
                finish = "eos_token"
            elif s.generated >= s.sampler.params.max_new_tokens:  # submit() kept prompt + these in the cache
                finish = "length"
            outs.append(StepOutput(s.inp.req_id, s.inp.front, tok, lp, finish))
            if finish:
                done.append(s)
        for s in done:
            self._retire(self.running.index(s))
        return outs

    def _retire(self, i: int) -> None:
        """Free KV slot i: the last running sequence moves into it (the cache stays compact)."""
        seq = self.running[i]
        self.adapters.release(seq.bank_slot)
        last = len(self.running) - 1
        if i != last:
            moved = self.running[last]
            self.cache.move(last, i, moved.length)
            if self.rows is not None:
                self.rows.move(last, i)
            self.running[i] = moved
        self.running.pop()

    # -- adapters ----------------------------------------------------------------------------------
    def add_adapter_now(self, name: str, path: Path) -> None:
        self.adapters.add_now(name, path)

    def close(self) -> None:
        self.adapters.close()


def generate(engine: Engine, inputs: list[GenInput]) -> dict[int, list[StepOutput]]:
    """Run requests to completion (tests, benchmarks, offline use); outputs per request id."""
    results: dict[int, list[StepOutput]] = {inp.req_id: [] for inp in inputs}
    for inp in inputs:
        err = engine.submit(inp)
        if err is not None:
            results[inp.req_id].append(err)
    while engine.has_work:
        for out in engine.step():
            results[out.req_id].append(out)
    return results
