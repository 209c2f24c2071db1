"""The systems `serving.py` compares Tandem with, all running Tandem's own default model code.

Run as a subprocess, one mode at a time:

    python benchmarks/_peers.py offline  --model embeddings --batch 32 --duration 10 --warmup 3
    python benchmarks/_peers.py baseline --model embeddings --port 8001
    python benchmarks/_peers.py litserve --model embeddings --port 8002 --batch 32

* `offline`: the in-process limit, a tight loop of preprocess + `assemble` + predict + postprocess
  at the server's max batch size; prints one JSON line (items/s, batch times, and the reference
  output of the first body at batch size 1, which the servers are checked against).
* `baseline`: the traditional design, one FastAPI/uvicorn process (1 worker) whose sync `def`
  handler runs preprocess + predict (batch of 1) + postprocess per request.
* `litserve`: LitServe with dynamic batching; the same hooks in decode_request/batch/predict/
  unbatch/encode_response (see `_litserve_api.py`).

Every mode serves `POST /predictions/{model}` with the body handed to `preprocess` as Tandem does.
No `from __future__ import annotations`: FastAPI resolves the handler's annotations at runtime.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from tandem.kinds import builtin_kinds
from tandem.model import Model, Request
from tandem.serving.batcher import assemble
from tandem.serving.repository import ModelEntry, default_repository, instantiate, scan_repository

HOST = "127.0.0.1"


# --------------------------------------------------------------------------- shared model plumbing


def load_entry(name: str) -> ModelEntry:
    """The default repository's entry for model `name` (its config, signature and batching)."""
    for entry in scan_repository(default_repository(), builtin_kinds()):
        if entry.config.name == name:
            return entry
    raise SystemExit(f"no model {name!r} in the default repository")


def load_model(entry: ModelEntry) -> Model:
    """The user's Model object with weights on the CPU and its CPU-side state loaded."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model = instantiate(entry)
    model.setup_cpu()
    model.setup("cpu")
    return model


def to_request(body: bytes, content_type: str) -> Request:
    """The `Request` Tandem's front builds for a /predictions body (JSON parsed when JSON)."""
    req = Request(body=body, content_type=content_type)
    if "json" in content_type:
        req.json = orjson.loads(body)
    return req


def predict_arrays(model: Model, entry: ModelEntry, items: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Pad/stack per-item arrays exactly as Tandem's accelerator worker does, then run predict."""
    import torch

    inputs = assemble([{k: v[None] for k, v in item.items()} for item in items], entry.inputs)
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.inference_mode():
        out = model.predict(tensors)
    return {spec.name: out[spec.name].detach().cpu().numpy() for spec in entry.outputs}


def run_batch(model: Model, entry: ModelEntry, requests: list[Request]) -> list[Any]:
    """preprocess every request, one predict for all of them, postprocess every item."""
    items = [model.preprocess(r) for r in requests]
    outputs = predict_arrays(model, entry, items)
    return [model.postprocess({k: v[i] for k, v in outputs.items()}, r) for i, r in enumerate(requests)]


def read_bodies(path: Path) -> tuple[list[bytes], str]:
    """Bodies and content type written by serving.py (JSON: hex bodies + content type)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return [bytes.fromhex(b) for b in data["bodies"]], data["content_type"]


# --------------------------------------------------------------------------- offline limit


def offline(name: str, bodies_path: Path, batch: int, duration_s: float, warmup_s: float) -> dict[str, Any]:
    """Items/s of the tight in-process loop at `batch` items per predict, and the reference output."""
    entry = load_entry(name)
    model = load_model(entry)
    bodies, ctype = read_bodies(bodies_path)
    reference = run_batch(model, entry, [to_request(bodies[0], ctype)])[0]
    times: list[float] = []
    items, cursor = 0, 0
    start = time.perf_counter()
    measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s
    while duration_s > 0 and (now := time.perf_counter()) < stop_at:
        chunk = [bodies[(cursor + k) % len(bodies)] for k in range(batch)]
        cursor += batch
        run_batch(model, entry, [to_request(b, ctype) for b in chunk])
        done = time.perf_counter()
        if now >= measure_from:
            times.append(done - now)
            items += batch
    busy = sum(times)
    return {
        "items_per_s": items / busy if busy else None,
        "batch": batch,
        "batches": len(times),
        "batch_p50_ms": statistics.median(times) * 1000 if times else None,
        "batch_p99_ms": float(np.percentile(times, 99)) * 1000 if times else None,
        "torch_threads": _torch_threads(),
        "reference": reference,
    }


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# --------------------------------------------------------------------------- baseline: FastAPI


def baseline_app(name: str) -> Any:
    """FastAPI app with a sync `def` handler: preprocess + predict(batch of 1) + postprocess."""
    from fastapi import Depends, FastAPI
    from fastapi import Request as HTTPRequest

    entry = load_entry(name)
    model = load_model(entry)
    app = FastAPI()

    async def raw_body(request: HTTPRequest) -> bytes:
        return await request.body()

    @app.post(f"/predictions/{name}")
    def predictions(request: HTTPRequest, body: bytes = Depends(raw_body)) -> Any:
        req = to_request(body, request.headers.get("content-type", ""))
        return run_batch(model, entry, [req])[0]

    return app


def serve_baseline(name: str, port: int) -> None:
    import uvicorn

    uvicorn.run(baseline_app(name), host=HOST, port=port, workers=1, log_level="warning", access_log=False)


# --------------------------------------------------------------------------- LitServe


def serve_litserve(name: str, port: int, batch: int, timeout_s: float) -> None:
    import litserve as ls
    from _litserve_api import litserve_api

    server = ls.LitServer(litserve_api(name, batch, timeout_s), accelerator="cpu", workers_per_device=1)
    server.run(host=HOST, port=port, log_level="warning", generate_client_file=False)


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["offline", "baseline", "litserve"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batch-timeout", type=float, default=0.005)
    parser.add_argument("--bodies", type=Path, help="offline: JSON file of bodies (from serving.py)")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    args = parser.parse_args(argv)
    if args.mode == "offline":
        result = offline(args.model, args.bodies, args.batch, args.duration, args.warmup)
        sys.stdout.write(json.dumps(result) + "\n")
    elif args.mode == "baseline":
        serve_baseline(args.model, args.port)
    else:
        serve_litserve(args.model, args.port, args.batch, args.batch_timeout)


if __name__ == "__main__":
    main()
