"""ONNX Runtime sessions for the optimizer: build, run over calibration batches, time, profile.

The optimizer measures on the runtime that will serve the artefact, with the same threads: a
conversion's speed is a property of (graph, execution provider, CPU), never assumed.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from tandem.errors import OptimizeError
from tandem.optimize.types import Timing
from tandem.serving.runtimes import session_options

__all__ = ["Feeds", "available_providers", "expose_outputs", "make_session", "profile_nodes", "provider_chain",
           "run_batches", "session_options", "time_session"]

Feeds = dict[str, np.ndarray]
_MAX_PROTO = 1_800_000_000  # protobuf's 2 GB limit, with room for the graph


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def _options(threads: int, level: str, optimized_path: Path | None, profile_prefix: str | None) -> Any:
    so = session_options(threads, level)
    so.log_severity_level = 3
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


def provider_chain(provider: str, precision: str = "fp32") -> list[Any]:
    """`provider` with its fall-backs; TensorRT gets the builder flag for the target's precision.

    TensorRT decides layer precisions itself once fp16 is allowed and may ignore the FP32 casts
    (TensorRT #2080, #3224): `confirm_fp32` cannot see inside its engines and says so.
    """
    if provider == "CPUExecutionProvider":
        return [provider]
    chain: list[Any] = [provider]
    if provider == "TensorrtExecutionProvider":
        chain = [(provider, {"trt_fp16_enable": precision == "fp16", "trt_bf16_enable": precision == "bf16",
                             "trt_engine_cache_enable": False})]
        chain.append("CUDAExecutionProvider")
    return [*chain, "CPUExecutionProvider"]


def make_session(model: onnx.ModelProto | Path, provider: str = "CPUExecutionProvider", threads: int = 0,
                 *, level: str = "all", optimized_path: Path | None = None,
                 profile_prefix: str | None = None, precision: str = "fp32") -> Any:
    """An InferenceSession on `provider` (with the CPU provider behind it for unsupported nodes)."""
    import onnxruntime as ort

    providers = provider_chain(provider, precision)
    so = _options(threads, level, optimized_path, profile_prefix)
    try:
        if isinstance(model, Path):
            return ort.InferenceSession(str(model), so, providers=providers)
        if model.ByteSize() < _MAX_PROTO:
            return ort.InferenceSession(model.SerializeToString(), so, providers=providers)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data")
            return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
        raise OptimizeError(f"ONNX Runtime cannot load the model on {provider}: {e}") from e


def run_batches(session: Any, feeds: Sequence[Feeds], names: Sequence[str] | None = None) -> list[Feeds]:
    """Run every batch; returns one {output name: array} dict per batch."""
    wanted = list(names) if names is not None else [o.name for o in session.get_outputs()]
    results = []
    for feed in feeds:
        values = session.run(wanted, feed)
        results.append(dict(zip(wanted, values)))
    return results


def expose_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph also outputs the tensors `names` (types left to ONNX Runtime)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    for name in names:
        if name not in have:
            out.graph.output.append(onnx.ValueInfoProto(name=name))
            have.add(name)
    return out


def _median_seconds(session: Any, feed: Feeds, repeats: int, min_seconds: float) -> float:
    session.run(None, feed)  # warm-up: first runs allocate and pre-pack
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_seconds and len(times) < 10 * repeats):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_session(session: Any, one: Feeds, batch: Feeds, *, repeats: int = 5, min_seconds: float = 0.5) -> Timing:
    """Median latency at batch 1 and throughput (items/s) at the batch size of `batch`."""
    rows = int(next(iter(batch.values())).shape[0])
    latency = _median_seconds(session, one, repeats, min_seconds)
    per_batch = _median_seconds(session, batch, repeats, min_seconds)
    return Timing(batch=rows, latency_ms=latency * 1000, throughput=rows / per_batch)


def profile_nodes(session: Any, feed: Feeds) -> dict[str, dict[str, Any]]:
    """Run once with profiling on; per executed node name: op type, provider and input/output types.

    The session must have been made with `profile_prefix`. This is what ONNX Runtime really ran,
    after its fusions and any casts it inserted, so it is the ground truth for precision checks.
    """
    session.run(None, feed)
    path = session.end_profiling()
    try:
        events = json.loads(Path(path).read_text())
    finally:
        os.unlink(path)
    nodes: dict[str, dict[str, Any]] = {}
    for ev in events:
        args = ev.get("args", {})
        if ev.get("cat") != "Node" or "op_name" not in args:
            continue
        name = ev["name"].removesuffix("_kernel_time").removesuffix("_fence_before").removesuffix("_fence_after")
        types = [next(iter(t)) for t in args.get("input_type_shape", []) if t]
        outs = [next(iter(t)) for t in args.get("output_type_shape", []) if t]
        nodes[name] = {"op": args["op_name"], "provider": args.get("provider", ""), "inputs": types,
                       "outputs": outs}
    return nodes
