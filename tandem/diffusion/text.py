"""Prompt tokenization in the fronts: the pipeline's CLIP tokenizer, with its limit stated, not truncated.

StableDiffusionPipeline pads every prompt to the tokenizer's `model_max_length` and silently drops
what is beyond it; Tandem refuses an over-long prompt instead, naming the field and the limit.
"""

from __future__ import annotations

from pathlib import Path

from tandem.serving.bodies import field_error as invalid

__all__ = ["PromptTokenizer", "invalid"]


class PromptTokenizer:
    """Token ids padded to the model's length, as the stock pipeline feeds its text encoder."""

    def __init__(self, folder: Path) -> None:
        from transformers import CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        self.max_length = int(self.tokenizer.model_max_length)

    def encode(self, text: str, field: str, *, allow_empty: bool = True) -> tuple[list[int], int]:
        """(ids padded to max_length, real length with start/end tokens); 400 naming `field` when too long."""
        if not allow_empty and not text.strip():
            raise invalid(field, f"{field} is empty; describe the image to draw")
        n = len(self.tokenizer(text, truncation=False).input_ids)
        if n > self.max_length:
            raise invalid(field, f"{field} is {n} tokens with the start and end tokens; this model's tokenizer "
                                 f"takes at most {self.max_length} (shorten it)")
        enc = self.tokenizer(text, padding="max_length", max_length=self.max_length, truncation=True)
        return list(enc.input_ids), n
