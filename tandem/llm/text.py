"""Front-side text handling: tokenizer loading, incremental detokenization, stop sequences, chat prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tandem.errors import ConfigError, InvalidInput

__all__ = ["Detokenizer", "StopMatcher", "load_tokenizer", "render_chat"]


def load_tokenizer(folder: Path) -> Any:
    """The model folder's fast tokenizer (tokenizer.json); never downloads."""
    from transformers import AutoTokenizer

    if not (folder / "tokenizer.json").exists() and not (folder / "tokenizer_config.json").exists():
        raise ConfigError(f"{folder}: no tokenizer.json / tokenizer_config.json next to the weights")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def render_chat(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """Apply the tokenizer's chat template (with the generation prompt) and return token ids."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidInput("this model's tokenizer has no chat template; use /v1/completions instead")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja errors, e.g. a role the template rejects
        raise InvalidInput(f"cannot apply the chat template to these messages: {e}") from None
    # The template writes special tokens (e.g. BOS) itself; do not add them twice.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class Detokenizer:
    """Turns a growing list of token ids into text increments, never splitting a multi-byte character.

    Same scheme as TGI/vLLM: decode a short window before and after the new token and emit the
    difference once it no longer ends in U+FFFD (an incomplete UTF-8 sequence).
    """

    def __init__(self, tokenizer: Any, prompt: list[int]) -> None:
        self.tok = tokenizer
        self.ids = list(prompt[-6:])  # a little context: some tokenizers decode a leading space per context
        self.prefix = 0
        self.read = len(self.ids)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return str(after[len(before):])
        return ""


class StopMatcher:
    """Finds stop sequences in streamed text; holds back text that might be the start of one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """Returns (text safe to emit, the stop sequence matched or None). Text after a match is dropped."""
        if not self.stops:
            return text, None
        buf = self.held + text
        hits = [(buf.find(s), s) for s in self.stops if s in buf]
        if hits:
            at, stop = min(hits)
            self.held = ""
            return buf[:at], stop
        keep = max((k for s in self.stops for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], None

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out
