"""The tensor-model kind (`kind: model`, the default): a model.py with TensorSpecs, batched predict.

Requests are preprocessed in the fronts, their tensors travel through each front's shared-memory
arena (`shm.py`), and accelerator workers (`accel_worker.py`) batch them; the routes are KServe v2,
`/predictions` and `/invocations` (`tensor_routes.py`), and for embedding models OpenAI
`/v1/embeddings` and TEI `/embed` (`embedding_routes.py`). It lives in the serving package because
shared memory and batching are what the core is built around, but it reaches the core only through
the `Kind` interface, like any other kind.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

    def card(self, entry: ModelEntry) -> dict[str, Any]:
        from tandem.model import EMBEDDING_FIELD

        cls = _model_class(entry.code, entry.config.key, entry.uid)
        embedding = next((s for s in cls.request_outputs if s.name == EMBEDDING_FIELD), None)
        b = entry.batching
        return {"task": cls.task or ("embeddings" if embedding is not None else ""),
                "embedding_dim": embedding.shape[0] if embedding is not None else None,
                "inputs": [_spec(s) for s in entry.inputs], "outputs": [_spec(s) for s in entry.outputs],
                "request_inputs": [_spec(s) for s in cls.request_inputs],
                "request_outputs": [_spec(s) for s in cls.request_outputs],
                "max_batch_size": b.max_batch_size, "max_batch_delay_ms": b.max_batch_delay_ms,
                "runtime": entry.config.runtime}

    def describe(self, entry: ModelEntry) -> str:
        b = entry.batching
        return f"batch <= {b.max_batch_size}, delay {b.max_batch_delay_ms} ms"


def _spec(s: Any) -> dict[str, Any]:
    """A TensorSpec or RequestSpec as JSON: name, v2 datatype, shape per row (-1: variable)."""
    return {"name": s.name, "datatype": s.dtype, "shape": list(s.shape)}


@lru_cache(maxsize=64)  # bounded: every roll-over makes a new uid
def _model_class(code: Path, key: str, uid: str) -> Any:
    """An entry's Model class for `card`; `uid` keys it, so a reloaded version is read afresh."""
    from tandem.serving.repository import load_model_class

    return load_model_class(code, key)
