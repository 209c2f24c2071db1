"""Per-request generation settings: a typed message field, so this module must not import torch."""

from __future__ import annotations

import msgspec

__all__ = ["SamplingParams"]


class SamplingParams(msgspec.Struct, frozen=True, array_like=True):
    """Per-request generation settings (validated by the API layer before they get here)."""

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    logprobs: bool = False
    ignore_eos: bool = False
