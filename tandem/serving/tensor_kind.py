"""The tensor-model kind (`kind: model`, the default): a model.py with TensorSpecs, batched predict.

Requests are preprocessed in the fronts, their tensors travel through each front's shared-memory
arena (`shm.py`), and accelerator workers (`accel_worker.py`) batch them; the routes are KServe v2,
`/predictions` and `/invocations` (`tensor_routes.py`), and for embedding models OpenAI
`/v1/embeddings` and TEI `/embed` (`embedding_routes.py`). It lives in the serving package because
shared memory and batching are what the core is built around, but it reaches the core only through
the `Kind` interface, like any other kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from tandem.config import ModelConfig
from tandem.serving.kinds import FrontState, RouteSpec, WorkerTarget
from tandem.serving.messages import Result
from tandem.serving.repository import ModelEntry, tensor_entry

if TYPE_CHECKING:
    import zmq.asyncio

    from tandem.serving.layout import RunLayout
    from tandem.serving.tensor_client import TensorClient

__all__ = ["TensorKind"]


class TensorKind:
    """`kind: model`: see the module docstring."""

    name = "model"
    needs_code = True
    messages: tuple[type[msgspec.Struct], ...] = (Result,)

    def entry(self, index: int, config: ModelConfig, code: Path) -> ModelEntry:
        return tensor_entry(index, config, code)

    def arena_bytes(self, entry: ModelEntry) -> int:
        return entry.slot_payload

    def worker(self, entry: ModelEntry) -> WorkerTarget:
        from tandem.serving.accel_worker import run_accel_worker

        return run_accel_worker

    def client(self, entry: ModelEntry, ctx: zmq.asyncio.Context, layout: RunLayout, front: int) -> TensorClient:
        from tandem.serving.tensor_client import TensorClient

        return TensorClient(entry, ctx, layout, front)

    def routes(self, state: FrontState) -> list[RouteSpec]:
        from tandem.serving.embedding_routes import embedding_routes
        from tandem.serving.tensor_routes import tensor_routes

        return tensor_routes(state) + embedding_routes(state)

    def describe(self, entry: ModelEntry) -> str:
        b = entry.batching
        return f"batch <= {b.max_batch_size}, delay {b.max_batch_delay_ms} ms"
