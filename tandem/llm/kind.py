"""The LLM kind (`kind: llm`, or `tandem serve --llm PATH`): continuous batching with many LoRA adapters.

No model.py and no arena: prompts and tokens travel as token ids in the LLM messages
(`messages.py`); the worker runs the engine (`worker.py`), the front client tokenizes and streams
(`client.py`), and the routes are TGI's and OpenAI's (`http/`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from tandem.config import BatchingConfig, ModelConfig
from tandem.errors import ConfigError
from tandem.llm.messages import AdapterReply, Tokens
from tandem.serving.kinds import FrontState, RouteSpec, WorkerTarget
from tandem.serving.repository import ModelEntry

if TYPE_CHECKING:
    import zmq.asyncio

    from tandem.llm.client import LLMClient
    from tandem.serving.layout import RunLayout

__all__ = ["LLMKind", "llm_entry"]


def llm_entry(index: int, config: ModelConfig) -> ModelEntry:
    """An LLM entry: no model.py, no tensor signature; its worker streams tokens."""
    assert config.llm is not None
    model_dir = config.llm.model_dir(config.path)
    if not (model_dir / "config.json").exists():
        raise ConfigError(f"{config.path / 'tandem.yaml'}: llm.path {config.llm.path!r} -> {model_dir} has no "
                          "config.json (fix: point it at a Hugging Face model folder)")
    return ModelEntry(index, config, BatchingConfig(max_batch_size=config.llm.max_batch_size), (), (), 1,
                      config.path)


class LLMKind:
    """`kind: llm`: see the module docstring."""

    name = "llm"
    needs_code = False
    messages: tuple[type[msgspec.Struct], ...] = (Tokens, AdapterReply)

    def entry(self, index: int, config: ModelConfig, code: Path) -> ModelEntry:
        return llm_entry(index, config)

    def arena_bytes(self, entry: ModelEntry) -> int:
        return 0  # token ids travel in messages

    def worker(self, entry: ModelEntry) -> WorkerTarget:
        from tandem.llm.worker import run_llm_worker

        return run_llm_worker

    def client(self, entry: ModelEntry, ctx: zmq.asyncio.Context, layout: RunLayout, front: int) -> LLMClient:
        from tandem.llm.client import LLMClient

        return LLMClient(entry, ctx, layout, front)

    def routes(self, state: FrontState) -> list[RouteSpec]:
        from tandem.llm.http.common import LLMDirectory
        from tandem.llm.http.openai import openai_routes
        from tandem.llm.http.tgi import tgi_routes

        llms = LLMDirectory(state)
        return tgi_routes(llms) + openai_routes(llms)

    def card(self, entry: ModelEntry) -> dict[str, Any]:
        cfg = entry.config.llm
        assert cfg is not None
        return {"task": "text-generation", "adapters": sorted(cfg.adapters), "max_loras": cfg.max_loras,
                "max_total_tokens": cfg.max_total_tokens, "default_max_new_tokens": cfg.default_max_new_tokens,
                "max_batch_size": cfg.max_batch_size, "dtype": cfg.dtype}

    def describe(self, entry: ModelEntry) -> str:
        cfg = entry.config.llm
        assert cfg is not None
        return f"continuous batching of {cfg.max_batch_size} sequences, {len(cfg.adapters)} adapter(s)"
