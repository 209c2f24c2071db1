"""The systems `diffusion.py` compares Tandem with, all running stock diffusers `StableDiffusionPipeline`.

Run as a subprocess, one mode at a time:

    python benchmarks/_diffusion_peers.py make      --folder F --shape sd-shaped
    python benchmarks/_diffusion_peers.py offline   --folder F --plan PLAN.json --out DIR
    python benchmarks/_diffusion_peers.py diffusers --folder F --port 8001
    python benchmarks/_diffusion_peers.py litserve  --folder F --port 8002 --batch 8 --batch-timeout 0.05

* `make`: write a random-weight SD-layout pipeline (`tandem.diffusion.testing`) to F.
* `offline`: the reference; the pipeline called in a loop in this process, one request at a time
  (pipeline call + PNG encode per image). Writes the reference images of the plan's health bodies
  (PNG files) and, per workload, per-image times and the share the UNet took; prints one JSON line.
* `diffusers`: the diffusers `examples/server` pattern: one FastAPI/uvicorn process, one shared
  pipeline; per request `StableDiffusionPipeline.from_pipe(shared, scheduler=<fresh from_config>)`
  run with `loop.run_in_executor(None, ...)` (asyncio's default thread pool: min(32, CPUs + 4) threads).
* `litserve`: LitServe with batching (`max_batch_size`, `batch_timeout`), one worker on the CPU;
  `predict` runs each same-(steps, size, scheduler, guidance) group of the batch as one pipeline call
  with a list of prompts and one seeded generator per request (the best a same-moment batcher can do).

Every server speaks Tandem's SageMaker/DJL contract: `POST /predictions/{name}` with
`{"prompt", "parameters": {num_inference_steps, guidance_scale, seed, width, height, scheduler,
negative_prompt}}` -> PNG bytes. Images equal stock diffusers for the same seed: a CPU
`torch.Generator().manual_seed(seed)`, the named scheduler made with `from_config(pipe.scheduler.config)`.
Every mode sets `torch.set_num_threads(--threads)`.
No `from __future__ import annotations`: FastAPI and LitServe read handler annotations at runtime.
"""

import argparse
import asyncio
import io
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
from fastapi import Request, Response

HOST = "127.0.0.1"
SAMPLERS = {"dpmpp_2m": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler",
            "euler_a": "EulerAncestralDiscreteScheduler", "ddim": "DDIMScheduler"}
DEFAULTS = {"num_inference_steps": 20, "guidance_scale": 7.5, "seed": 0, "width": 64, "height": 64,
            "scheduler": "dpmpp_2m", "negative_prompt": ""}


# --------------------------------------------------------------------------- shared plumbing


@dataclass(frozen=True)
class Params:
    """One request of the SageMaker/DJL contract, defaults filled in."""

    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    seed: int
    width: int
    height: int
    scheduler: str

    def group(self) -> tuple[int, int, int, str, float]:
        """What must be equal for requests to share one pipeline call."""
        return (self.steps, self.width, self.height, self.scheduler, self.guidance)


def parse_params(body: dict[str, Any]) -> Params:
    """The request body (prompt + parameters) as `Params`; ValueError on a bad scheduler."""
    p = {**DEFAULTS, **(body.get("parameters") or {})}
    if p["scheduler"] not in SAMPLERS:
        raise ValueError(f"unknown scheduler {p['scheduler']!r}; choose from {', '.join(SAMPLERS)}")
    return Params(prompt=str(body.get("prompt", body.get("inputs", ""))), negative_prompt=str(p["negative_prompt"]),
                  steps=int(p["num_inference_steps"]), guidance=float(p["guidance_scale"]), seed=int(p["seed"]),
                  width=int(p["width"]), height=int(p["height"]), scheduler=str(p["scheduler"]))


def load_pipeline(folder: Path, threads: int) -> Any:
    """Stock `StableDiffusionPipeline` on the CPU (fp32), progress bar off, `threads` intra-op threads."""
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(threads)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                   use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_scheduler(pipe: Any, name: str) -> Any:
    """A fresh scheduler of `name`'s class from the shared pipeline's scheduler config."""
    import diffusers

    return getattr(diffusers, SAMPLERS[name]).from_config(pipe.scheduler.config)


def generator(seed: int) -> Any:
    import torch

    return torch.Generator().manual_seed(seed)


def call_kwargs(group: list[Params]) -> dict[str, Any]:
    """Pipeline keyword arguments for a group of requests that share steps, size, scheduler and guidance."""
    first = group[0]
    negatives = [p.negative_prompt for p in group]
    return {"prompt": [p.prompt for p in group], "negative_prompt": negatives if any(negatives) else None,
            "num_inference_steps": first.steps, "guidance_scale": first.guidance, "width": first.width,
            "height": first.height, "num_images_per_prompt": 1, "generator": [generator(p.seed) for p in group],
            "output_type": "np"}


def to_uint8(images: Any) -> list[np.ndarray]:
    """Pipeline `np` output (N, H, W, 3) floats in [0, 1] -> uint8 arrays, rounded as diffusers' PIL path does."""
    return [(np.asarray(img) * 255).round().astype(np.uint8) for img in images]


def run_group(pipe: Any, group: list[Params]) -> list[np.ndarray]:
    """One pipeline call for the whole group; `pipe` must already carry the group's scheduler."""
    import torch

    with torch.inference_mode():
        return to_uint8(pipe(**call_kwargs(group)).images)


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- make


def make(folder: Path, shape_name: str) -> None:
    from tandem.diffusion.testing import SD_SHAPED, TINY, make_random_pipeline

    shapes = {"sd-shaped": SD_SHAPED, "tiny": TINY}
    make_random_pipeline(folder, shapes[shape_name], seed=0)


# --------------------------------------------------------------------------- offline


class UnetTimer:
    """Wall time spent inside the UNet's forward (hooks), to report its share of a request."""

    def __init__(self, unet: Any) -> None:
        self.total_s = 0.0
        self._t0 = 0.0
        unet.register_forward_pre_hook(self._pre)
        unet.register_forward_hook(self._post)

    def _pre(self, *_: Any) -> None:
        self._t0 = time.perf_counter()

    def _post(self, *_: Any) -> None:
        self.total_s += time.perf_counter() - self._t0


def offline_one(pipe: Any, params: Params) -> tuple[np.ndarray, bytes]:
    """One request as a server would answer it: fresh scheduler, pipeline call, PNG bytes."""
    pipe.scheduler = make_scheduler(pipe, params.scheduler)
    pixels = run_group(pipe, [params])[0]
    return pixels, png_bytes(pixels)


def offline_workload(pipe: Any, timer: UnetTimer, bodies: list[dict[str, Any]], warmup_s: float,
                     duration_s: float) -> dict[str, Any]:
    """Bodies in order, one at a time, for warm-up + duration seconds; per-image times of the measured ones."""
    times, unet_s, cursor = [], 0.0, 0
    start = time.perf_counter()
    measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s
    while (t0 := time.perf_counter()) < stop_at:
        unet_before = timer.total_s
        offline_one(pipe, parse_params(bodies[cursor % len(bodies)]))
        cursor += 1
        if t0 >= measure_from:
            times.append(time.perf_counter() - t0)
            unet_s += timer.total_s - unet_before
    busy = sum(times)
    return {"latencies_ms": [t * 1000 for t in times], "images": len(times), "busy_s": busy,
            "images_per_s": len(times) / busy if busy else None, "unet_share": unet_s / busy if busy else None}


def offline(folder: Path, plan_path: Path, out: Path, threads: int) -> dict[str, Any]:
    """The plan's reference images (PNG files in `out`) and its workloads run one request at a time."""
    import torch

    plan = json.loads(plan_path.read_text(encoding="utf-8"))
    pipe = load_pipeline(folder, threads)
    timer = UnetTimer(pipe.unet)
    out.mkdir(parents=True, exist_ok=True)
    references = []
    for i, body in enumerate(plan["references"]):
        _, png = offline_one(pipe, parse_params(body))
        path = out / f"reference-{i}.png"
        path.write_bytes(png)
        references.append(str(path))
    workloads = {w["name"]: offline_workload(pipe, timer, w["bodies"], w["warmup_s"], w["duration_s"])
                 for w in plan["workloads"]}
    return {"references": references, "workloads": workloads, "torch_threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- diffusers examples/server pattern


def diffusers_app(folder: Path, name: str, threads: int) -> Any:
    """FastAPI app: a shared pipeline, per request from_pipe + fresh scheduler, run in the default executor."""
    from diffusers import StableDiffusionPipeline
    from fastapi import FastAPI, HTTPException

    shared = load_pipeline(folder, threads)
    app = FastAPI()

    @app.post(f"/predictions/{name}")
    async def predictions(request: Request) -> Response:
        try:
            params = parse_params(await request.json())
        except (ValueError, TypeError) as e:
            raise HTTPException(status_code=400, detail=str(e)) from None
        loop = asyncio.get_running_loop()
        scheduler = make_scheduler(shared, params.scheduler)
        pipeline = StableDiffusionPipeline.from_pipe(shared, scheduler=scheduler)
        pipeline.set_progress_bar_config(disable=True)  # from_pipe does not carry it over
        pixels = await loop.run_in_executor(None, lambda: run_group(pipeline, [params])[0])
        return Response(png_bytes(pixels), media_type="image/png")

    return app


def serve_diffusers(folder: Path, name: str, port: int, threads: int) -> None:
    import uvicorn

    uvicorn.run(diffusers_app(folder, name, threads), host=HOST, port=port, workers=1, log_level="warning",
                access_log=False)


# --------------------------------------------------------------------------- LitServe


class DiffusionLitAPI(ls.LitAPI):
    """decode_request = parse the contract; predict = one pipeline call per same-settings group."""

    def __init__(self, folder: str, threads: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.folder, self.threads = folder, threads

    def setup(self, device: str) -> None:
        self.pipe = load_pipeline(Path(self.folder), self.threads)

    def decode_request(self, request: Request, **kwargs: Any) -> Params:
        payload: Any = request  # the `Request` annotation makes LitServe pass the parsed JSON body
        return parse_params(payload)

    def batch(self, inputs: list[Params]) -> list[Params]:
        return inputs

    def predict(self, x: list[Params], **kwargs: Any) -> list[np.ndarray]:
        groups: dict[tuple[int, int, int, str, float], list[int]] = defaultdict(list)
        for i, p in enumerate(x):
            groups[p.group()].append(i)
        out: list[np.ndarray] = [np.empty(0)] * len(x)
        for idx in groups.values():
            self.pipe.scheduler = make_scheduler(self.pipe, x[idx[0]].scheduler)
            for i, pixels in zip(idx, run_group(self.pipe, [x[i] for i in idx]), strict=True):
                out[i] = pixels
        return out

    def unbatch(self, output: list[np.ndarray]) -> list[np.ndarray]:
        return output

    def encode_response(self, output: np.ndarray, **kwargs: Any) -> Response:
        return Response(png_bytes(output), media_type="image/png")  # a Response is passed through as is


def serve_litserve(folder: Path, name: str, port: int, threads: int, batch: int, timeout_s: float) -> None:
    import litserve as ls

    # Imported by module name so that LitServe's spawned worker unpickles the API from `_diffusion_peers`.
    from _diffusion_peers import DiffusionLitAPI as API

    api = API(str(folder), threads, max_batch_size=batch, batch_timeout=timeout_s, api_path=f"/predictions/{name}")
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=False)
    server.run(host=HOST, port=port, log_level="warning", generate_client_file=False)


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["make", "offline", "diffusers", "litserve"])
    parser.add_argument("--folder", type=Path, required=True, help="SD-layout pipeline folder")
    parser.add_argument("--shape", default="sd-shaped", help="make: sd-shaped or tiny")
    parser.add_argument("--name", default="t2i", help="servers: model name in /predictions/{name}")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batch-timeout", type=float, default=0.05)
    parser.add_argument("--plan", type=Path, help="offline: JSON plan written by diffusion.py")
    parser.add_argument("--out", type=Path, help="offline: folder for the reference images")
    args = parser.parse_args(argv)
    if args.mode == "make":
        make(args.folder, args.shape)
    elif args.mode == "offline":
        sys.stdout.write(json.dumps(offline(args.folder, args.plan, args.out, args.threads)) + "\n")
    elif args.mode == "diffusers":
        serve_diffusers(args.folder, args.name, args.port, args.threads)
    else:
        serve_litserve(args.folder, args.name, args.port, args.threads, args.batch, args.batch_timeout)


if __name__ == "__main__":
    main()
