"""Token choice for a batch whose sequences each have their own sampling parameters.

Order as in transformers' logits processors: repetition penalty -> temperature -> top-k -> top-p,
then greedy argmax or a draw. Everything is batched; only seeded draws take a per-sequence
generator (one uniform number each), so seeded requests are reproducible whatever they share a
batch with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tandem.llm.params import SamplingParams

__all__ = ["SamplingParams", "SamplerState", "choose", "note_token", "to_host", "warp"]


@dataclass
class SamplerState:
    """Per-sequence state kept by the engine: which tokens were seen (for the penalty) and its generator."""

    params: SamplingParams
    seen: Tensor | None  # [V] bool, only when repetition_penalty != 1
    generator: torch.Generator | None

    @classmethod
    def create(cls, params: SamplingParams, prompt: list[int], vocab: int, device: torch.device) -> SamplerState:
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            seen[torch.tensor(prompt, device=device)] = True
        gen = None
        if params.do_sample and params.seed is not None:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(params.seed)
        return cls(params, seen, gen)


def _penalize(logits: Tensor, states: list[SamplerState]) -> Tensor:
    rows = [i for i, s in enumerate(states) if s.seen is not None]
    if not rows:
        return logits
    seen = torch.stack([states[i].seen for i in rows])  # type: ignore[misc]  # [R, V]
    pen = torch.tensor([states[i].params.repetition_penalty for i in rows], device=logits.device)[:, None]
    sub = logits[rows]
    sub = torch.where(seen, torch.where(sub > 0, sub / pen, sub * pen), sub)
    logits[rows] = sub
    return logits


def _filter(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    # logits: [R, V] (already divided by temperature); top_k: [R] (0 = off); top_p: [R]
    V = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
    ranks = torch.arange(V, device=logits.device)[None, :]
    drop = ranks >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    # top-p keeps the smallest prefix whose mass reaches p (the token crossing p stays); p = 1 is off
    # (the fp32 running sum reaches 1.0 before the tail, which would otherwise drop tokens of mass ~1e-8)
    drop |= ((probs.cumsum(-1) - probs) >= top_p[:, None]) & (top_p[:, None] < 1.0)
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def _draw(logits: Tensor, states: list[SamplerState], rows: list[int]) -> Tensor:
    probs = logits.softmax(-1)  # [R, V]
    u = torch.rand(len(rows))
    for j, i in enumerate(rows):
        gen = states[i].generator
        if gen is not None:
            u[j] = torch.rand(1, generator=gen)[0]
    cdf = probs.cumsum(-1)
    # token i is drawn iff cdf[i-1] < u <= cdf[i]: with u > 0 a zero-mass (filtered) token never is, even at u = 0
    u = (u.to(probs.device)[:, None] * cdf[:, -1:]).clamp(min=torch.finfo(probs.dtype).tiny)
    return torch.searchsorted(cdf, u).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def warp(logits: Tensor, states: list[SamplerState]) -> tuple[Tensor, list[int], Tensor | None]:
    """The distributions `choose` picks from. logits: [S, V] fp32 (penalized in place).

    Returns (scaled [S, V]: after repetition penalty and temperature, what greedy rows take the argmax
    of and logprobs are read from; rows: the R sequences that sample; filtered [R, V] or None: their
    scaled logits after top-k and top-p, -inf outside what may be drawn; a draw is softmax(filtered)).
    """
    logits = _penalize(logits, states)
    temps = torch.tensor([s.params.temperature if s.params.do_sample else 1.0 for s in states],
                         device=logits.device)[:, None]
    scaled = logits / temps  # [S, V]
    rows = [i for i, s in enumerate(states) if s.params.do_sample]
    if not rows:
        return scaled, rows, None
    top_k = torch.tensor([states[i].params.top_k for i in rows], device=logits.device)
    top_p = torch.tensor([states[i].params.top_p for i in rows], device=logits.device)
    return scaled, rows, _filter(scaled[rows], top_k, top_p)


def choose(logits: Tensor, states: list[SamplerState]) -> tuple[Tensor, Tensor | None]:
    """Pick one token per sequence. logits: [S, V] fp32 -> (tokens [S], logprobs [S] or None).

    Logprobs are of the model's distribution after repetition penalty and temperature, the
    distribution the token was drawn from before top-k/top-p truncation.
    """
    scaled, rows, filtered = warp(logits, states)
    tokens = scaled.argmax(-1)  # [S]
    if filtered is not None:
        tokens[rows] = _draw(filtered, states, rows)
    logprobs = None
    if any(s.params.logprobs for s in states):
        logprobs = scaled.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logprobs


def to_host(tokens: Tensor, logprobs: Tensor | None) -> tuple[list[int], list[float]]:
    """tokens [S] and logprobs [S] (or None: zeros) as Python lists, in ONE device -> host copy.

    Both travel as one fp64 [2, S] tensor: token ids (< 2^53) and fp32 logprobs are exact in fp64.
    """
    if logprobs is None:
        return tokens.tolist(), [0.0] * tokens.shape[0]
    both = torch.stack((tokens.to(torch.float64), logprobs.to(torch.float64))).tolist()  # [2, S]
    return [int(t) for t in both[0]], both[1]


def note_token(states: list[SamplerState], tokens: list[int]) -> None:
    """Mark chosen tokens (already on the host) as seen for sequences with a repetition penalty."""
    for s, t in zip(states, tokens):
        if s.seen is not None:
            s.seen[t] = True
