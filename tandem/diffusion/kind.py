"""The diffusion kind (`kind: diffusion`): text-to-image with step-level continuous batching.

No model.py and no arena: prompts travel as token ids and images as uint8 pixels in the kind's
messages (`messages.py`); the worker runs the denoising loop and the VAE stage (`worker.py`), the
front client tokenizes, validates and encodes images (`client.py`, `images.py`), and the routes
are SageMaker's, OpenAI's and AUTOMATIC1111's (`routes.py`, `openai_images.py`, `a1111.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from tandem.config import SAMPLERS, BatchingConfig, ModelConfig
from tandem.diffusion.messages import ImageEvents, Images
from tandem.serving.kinds import FrontState, RouteSpec, WorkerTarget
from tandem.serving.repository import ModelEntry

if TYPE_CHECKING:
    import zmq.asyncio

    from tandem.diffusion.client import DiffusionClient
    from tandem.serving.layout import RunLayout

__all__ = ["DiffusionKind", "diffusion_entry"]


def diffusion_entry(index: int, config: ModelConfig) -> ModelEntry:
    """A diffusion entry: the pipeline folder is checked now, so a bad path fails the start with its fix."""
    from tandem.diffusion.pipeline import check_folder

    assert config.diffusion is not None
    check_folder(config.diffusion.pipeline_dir(config.path))
    return ModelEntry(index, config, BatchingConfig(max_batch_size=config.diffusion.max_batch_rows), (), (), 1,
                      config.path)


class DiffusionKind:
    """`kind: diffusion`: see the module docstring."""

    name = "diffusion"
    needs_code = False
    messages: tuple[type[msgspec.Struct], ...] = (ImageEvents, Images)

    def entry(self, index: int, config: ModelConfig, code: Path) -> ModelEntry:
        return diffusion_entry(index, config)

    def arena_bytes(self, entry: ModelEntry) -> int:
        return 0  # token ids and pixels travel in messages

    def worker(self, entry: ModelEntry) -> WorkerTarget:
        from tandem.diffusion.worker import run_diffusion_worker

        return run_diffusion_worker

    def client(self, entry: ModelEntry, ctx: zmq.asyncio.Context, layout: RunLayout, front: int) -> DiffusionClient:
        from tandem.diffusion.client import DiffusionClient

        return DiffusionClient(entry, ctx, layout, front)

    def routes(self, state: FrontState) -> list[RouteSpec]:
        from tandem.diffusion.routes import diffusion_routes

        return diffusion_routes(state)

    def card(self, entry: ModelEntry) -> dict[str, Any]:
        cfg = entry.config.diffusion
        assert cfg is not None
        return {"task": "text-to-image", "sizes": list(cfg.sizes), "samplers": list(SAMPLERS),
                "default_sampler": cfg.scheduler, "default_steps": cfg.default_steps, "min_steps": cfg.min_steps,
                "max_steps": cfg.max_steps, "default_guidance": cfg.default_guidance,
                "max_guidance": cfg.max_guidance, "max_images": cfg.max_images,
                "max_batch_rows": cfg.max_batch_rows, "preview_interval_ms": cfg.preview_interval_ms}

    def describe(self, entry: ModelEntry) -> str:
        cfg = entry.config.diffusion
        assert cfg is not None
        return (f"text-to-image, {cfg.max_batch_rows} UNet rows per iteration, sizes {', '.join(cfg.sizes)}, "
                f"{cfg.scheduler} by default")
