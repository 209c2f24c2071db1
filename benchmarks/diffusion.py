"""Text-to-image benchmark: Tandem's step-level continuous batching vs stock diffusers servers.

One run, one machine, the same pipeline folder and the same client (a small asyncio/httpx closed
loop, below) for every system. Systems:

  offline    stock `StableDiffusionPipeline` in a loop in its own process, one request at a time
             (pipeline call + PNG encode): the reference latency and the reference images
  diffusers  the diffusers `examples/server` pattern: FastAPI/uvicorn, one shared pipeline, per request
             `from_pipe(shared, scheduler=<fresh from_config>)` run in `loop.run_in_executor` (thread pool)
  litserve   LitServe, max_batch_size 8, batch_timeout 50 ms, 1 worker on the CPU; each same-(steps,
             size, scheduler) group of a batch is one pipeline call with one seeded generator per request
  tandem     `tandem serve` on a temporary repository: one `kind: diffusion` entry, Tandem's defaults
             plus sizes, default_steps 20, max_steps 100, max_batch_rows 16 (and `threads`, below)

Every server answers `POST /predictions/t2i` ({"prompt", "parameters": {num_inference_steps,
guidance_scale, seed, width, height, scheduler, negative_prompt}} -> PNG bytes). Servers run one at a
time as subprocesses on loopback, each with torch intra-op threads = `--threads` (default 2: the
reference machine's cores; `threads:` in Tandem's tandem.yaml). Each is health-checked before any
timing with one request whose image must equal the offline image for the same seed (PSNR >= 40 dB;
printed for every system, Tandem's streaming route too).

Workloads (closed loop, `--duration` measured seconds after `--warmup` seconds per level):
  1. c=1, 20 steps: p50/p90/p95/mean endpoint latency; Tandem's model time (`X-Tandem-Model-Ms`) too.
     Goal: Tandem p50 <= offline p50 x 1.05.
  2. c=8, steps drawn (seeded) from 20/30/50: images/s, p50, p95. Goals: Tandem >= 1.5x diffusers and
     >= 1.3x LitServe in images/s. Without --quick also c=1, 2, 4 for the latency plot (--plot).
  3. Preview cost: Tandem at c=8 on `POST /v1/images/generations`, 20 steps, streaming with
     partial_images 3 vs the same with stream false. Goal: slowdown <= 5%.
  4. VAE stall: Tandem's `tandem_diffusion_stage_seconds` histograms (/metrics, before/after workload 2
     at c=8): unet_iteration p50 / p99 / max bucket against the mean vae_decode time, and the
     per-decode stall meter (`tandem_diffusion_vae_stall_iterations`: UNet iterations each decode cost
     the loop). Goal: every decode-overlapped stretch loses <= 1 iteration per decode.

Models (`--models`):
  sd-shaped  random weights (`tandem.diffusion.testing.SD_SHAPED`: UNet channels 64/128/256/256, 2
             layers per block, CLIP text 128 wide x 77 tokens, 4-level VAE) at 128x128 (16x16 latents).
             Measured on the 2-core dev machine (busy with other work, torch at 1 thread): one 20-step
             request 2.2 s, the UNet 95-96% of it, as on real SD (text encode ~10 ms, VAE decode ~70 ms);
             2 idle cores should take ~1-2 s. Its native 256x256 costs ~4x (latents 4x larger), too slow
             for c=8 runs on 2 cores. The offline rows print the UNet share they measured.
  shipped    the built-in model's pipeline (tandem/default_repo/text-to-image/pipeline, 64x64) when
             that folder exists; skipped with a note otherwise.

    python benchmarks/diffusion.py --markdown diffusion.md --json diffusion.json --plot diffusion.png
    python benchmarks/diffusion.py --quick            # smoke run: 64x64, steps / 5, 8 s per level
    python benchmarks/diffusion.py --models sd-shaped --systems offline,tandem --duration 30

A full run (both models, every system, 60 s + 15 s per level, c=1, 2, 4, 8) takes over an hour on 2
cores; --duration 30 --warmup 8 took 41 minutes. To settle one ratio at c=8, benchmarks/diffusion_rounds.py
repeats workload 2 in interleaved rounds. A level's window grows past --warmup/--duration to at least one
and two rounds of (concurrency x the server's one-image time), so a slow level still completes images
inside it (the tables say which window each level had). images/s = successful images completed inside
the measured window / its length; latencies are those of the requests sent inside it. "c / mean latency" is
the same closed loop's throughput by Little's law: LitServe answers a batch's images together, so its count
inside a window moves by a whole batch with alignment alone (8 images in a 60 s window: 0.133 images/s),
which the latency-based figure does not.

--quick is a smoke test only: sd-shaped at 64x64, every step count divided by 5 (c=1 at 4 steps, the
mix 4/6/10), 8 s + 2 s warm-up per level, c=8 only, no plot. On a machine busy with other work, add
--threads 1: two OpenMP threads contending with another process for 2 cores run ~10x slower.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import io
import itertools
import json
import math
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _proc import spawn_group, stop, tail  # noqa: E402  (benchmarks/_proc.py, beside this script)

PEERS = Path(__file__).resolve().with_name("_diffusion_peers.py")
HOST = "127.0.0.1"
SYSTEMS = ("offline", "diffusers", "litserve", "tandem", "tandem-ort")  # tandem-ort: `unet: {runtime: onnxruntime}`
MODELS = ("shipped", "sd-shaped")
SHIPPED_PIPELINE = ROOT / "tandem" / "default_repo" / "text-to-image" / "pipeline"
NAME = "t2i"  # the model name every server serves
SD_SHAPED_SIZE, SHIPPED_SIZE, QUICK_SD_SIZE = 128, 64, 64
C1_STEPS, STEP_MIX, PREVIEW_STEPS, QUICK_DIVISOR = 20, (20, 30, 50), 20, 5
GUIDANCE, SAMPLER = 7.5, "dpmpp_2m"
HIGH = 8  # concurrency of workloads 2-4
PLOT_LEVELS = (1, 2, 4, 8)
PARTIAL_IMAGES = 3
LITSERVE_BATCH, LITSERVE_BATCH_TIMEOUT_S = 8, 0.05
MAX_BATCH_ROWS = 16
PSNR_MIN_DB = 40.0
HEALTH_SEED = 123
READY_TIMEOUT_S = 600.0
REQUEST_TIMEOUT_S = 600.0
BODIES = 64  # distinct request bodies per workload, cycled
COLORS = ("red", "green", "blue", "yellow", "white", "black")  # tandem.diffusion.world's palette
SHAPES = ("circle", "square", "triangle")


@dataclass(frozen=True)
class Settings:
    """What one run does: durations, step counts, levels, image size of sd-shaped, torch threads."""

    duration_s: float
    warmup_s: float
    c1_steps: int
    step_mix: tuple[int, ...]
    preview_steps: int
    levels: tuple[int, ...]  # concurrency levels of the step-mix workload
    sd_size: int
    threads: int


@dataclass(frozen=True)
class ModelCase:
    key: str
    label: str
    folder: Path
    size: int


@dataclass
class Sample:
    """One request as the client saw it (perf_counter seconds)."""

    sent: float
    done: float
    status: int
    ok: bool
    model_ms: float | None = None
    previews: int = 0


@dataclass
class Level:
    """One table row: a system under one workload at one concurrency."""

    model: str
    system: str
    workload: str  # "c1" (20 steps), "mix" (20/30/50 steps), "preview", "no-preview"
    concurrency: int
    images_per_s: float | None
    p50_ms: float | None
    p90_ms: float | None
    p95_ms: float | None
    mean_ms: float | None
    errors: int
    requests: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelResult:
    case: ModelCase
    levels: list[Level] = field(default_factory=list)
    parity: dict[str, dict[str, Any]] = field(default_factory=dict)  # system -> psnr, ready_s, note
    offline: dict[str, Any] = field(default_factory=dict)  # unet share, threads
    vae: dict[str, Any] | None = None


# --------------------------------------------------------------------------- request bodies


def prompts(n: int, seed: int) -> list[str]:
    """`n` seeded prompts in the built-in model's world: "a {color} {shape} on a {background} background"."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        color, background = rng.sample(COLORS, 2)
        out.append(f"a {color} {rng.choice(SHAPES)} on a {background} background")
    return out


def predict_body(prompt: str, seed: int, steps: int, size: int) -> dict[str, Any]:
    return {"prompt": prompt, "parameters": {"num_inference_steps": steps, "guidance_scale": GUIDANCE, "seed": seed,
                                             "width": size, "height": size, "scheduler": SAMPLER,
                                             "negative_prompt": ""}}


def generation_body(prompt: str, seed: int, steps: int, size: int, stream: bool) -> dict[str, Any]:
    body = {"model": NAME, "prompt": prompt, "size": f"{size}x{size}", "stream": stream, "steps": steps,
            "seed": seed, "guidance_scale": GUIDANCE, "sampler": SAMPLER}
    return {**body, "partial_images": PARTIAL_IMAGES} if stream else body


def health_prompt() -> str:
    return "a red circle on a blue background"


def c1_bodies(s: Settings, case: ModelCase) -> list[dict[str, Any]]:
    return [predict_body(p, 1000 + i, s.c1_steps, case.size) for i, p in enumerate(prompts(BODIES, 1))]


def mix_bodies(s: Settings, case: ModelCase) -> list[dict[str, Any]]:
    rng = random.Random(2)
    return [predict_body(p, 2000 + i, rng.choice(s.step_mix), case.size) for i, p in enumerate(prompts(BODIES, 2))]


def preview_bodies(s: Settings, case: ModelCase, stream: bool) -> list[dict[str, Any]]:
    return [generation_body(p, 3000 + i, s.preview_steps, case.size, stream) for i, p in enumerate(prompts(BODIES, 3))]


def encode(bodies: list[dict[str, Any]]) -> list[bytes]:
    return [json.dumps(b).encode() for b in bodies]


# --------------------------------------------------------------------------- the client (every system)


async def _post(client: httpx.AsyncClient, url: str, body: bytes, stream: bool, expect: str) -> Sample:
    """Send one request and read all of it; `sent`/`done` are filled in by the caller."""
    headers = {"content-type": "application/json"}
    if stream:
        async with client.stream("POST", url, content=body, headers=headers) as r:
            previews, completed = 0, False
            async for line in r.aiter_lines():
                if line.startswith("event:"):
                    kind = line[6:].strip()
                    previews += kind == "image_generation.partial_image"
                    completed = completed or kind == "image_generation.completed"
            return Sample(0.0, 0.0, r.status_code, r.status_code == 200 and completed, None, previews)
    r = await client.post(url, content=body, headers=headers)
    ok = r.status_code == 200 and r.headers.get("content-type", "").startswith(expect)
    model = r.headers.get("x-tandem-model-ms")
    return Sample(0.0, 0.0, r.status_code, ok, float(model) if model else None)


async def _worker(client: httpx.AsyncClient, url: str, bodies: list[bytes], counter: itertools.count[int],
                  end: float, stream: bool, expect: str, out: list[Sample]) -> None:
    while (sent := time.perf_counter()) < end:
        body = bodies[next(counter) % len(bodies)]
        try:
            sample = await _post(client, url, body, stream, expect)
        except httpx.HTTPError:
            sample = Sample(0.0, 0.0, 0, False)
        sample.sent, sample.done = sent, time.perf_counter()
        out.append(sample)
        if sample.status == 0:
            await asyncio.sleep(0.05)  # spare a dead server


async def closed_loop(url: str, bodies: list[bytes], concurrency: int, warmup_s: float, duration_s: float,
                      stream: bool = False, expect: str = "image/png") -> tuple[list[Sample], float, float]:
    """`concurrency` connections sending back to back until warm-up + duration; (samples, window start, end)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    start = time.perf_counter()
    warm_end, end = start + warmup_s, start + warmup_s + duration_s
    samples: list[Sample] = []
    counter = itertools.count()
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(REQUEST_TIMEOUT_S)) as client:
        await asyncio.gather(*(_worker(client, url, bodies, counter, end, stream, expect, samples)
                               for _ in range(concurrency)))
    return samples, warm_end, end


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(samples: list[Sample], warm_end: float, end: float) -> dict[str, Any]:
    """Requests sent inside the window count (latency of the successful ones); images/s = successes
    completed inside the window / its length."""
    counted = [x for x in samples if warm_end <= x.sent < end]
    ok = [x for x in counted if x.ok]
    lat = [(x.done - x.sent) * 1000 for x in ok]
    completed = sum(1 for x in samples if x.ok and warm_end <= x.done <= end)
    model = [x.model_ms for x in ok if x.model_ms is not None]
    statuses: dict[str, int] = {}
    for x in counted:
        statuses[str(x.status)] = statuses.get(str(x.status), 0) + 1
    extra: dict[str, Any] = {"status_counts": statuses}
    if model:
        extra.update(model_p50_ms=_pct(model, 50), model_mean_ms=float(np.mean(model)))
    if any(x.previews for x in ok):
        extra["previews_per_image"] = float(np.mean([x.previews for x in ok]))
    return {"images_per_s": completed / (end - warm_end), "p50_ms": _pct(lat, 50), "p90_ms": _pct(lat, 90),
            "p95_ms": _pct(lat, 95), "mean_ms": float(np.mean(lat)) if lat else None,
            "errors": len(counted) - len(ok), "requests": len(counted), "extra": extra}


def window(s: Settings, concurrency: int, image_s: float) -> tuple[float, float]:
    """(warm-up, duration) of one level: at least one and two closed-loop rounds of `concurrency` images made
    one at a time (`image_s` each), so that a slow machine still sees completions inside the window."""
    one_round = concurrency * image_s
    return max(s.warmup_s, one_round), max(s.duration_s, 2 * one_round)


def load_level(url: str, bodies: list[dict[str, Any]], concurrency: int, timing: tuple[float, float],
               where: tuple[str, str, str], stream: bool = False, expect: str = "image/png") -> Level:
    """One closed-loop level; `timing` = (warm-up, duration) seconds, `where` = (model, system, workload)."""
    warmup_s, duration_s = timing
    samples, warm_end, end = asyncio.run(closed_loop(url, encode(bodies), concurrency, warmup_s, duration_s,
                                                     stream, expect))
    level = Level(*where, concurrency, **summarize(samples, warm_end, end))
    level.extra.update(warmup_s=warmup_s, duration_s=duration_s, little_ips=little_ips(concurrency, level.mean_ms))
    return level


def little_ips(concurrency: int, mean_ms: float | None) -> float | None:
    """Closed-loop throughput by Little's law: concurrency / mean latency (no think time between requests).

    Unlike the count of images completed inside the window, it does not depend on where batch completions
    fall: a server that answers 8 images at once every 12 s completes 32 or 40 inside a 60 s window by
    alignment alone (a 20% swing), while every request's latency counts here."""
    return concurrency * 1000.0 / mean_ms if mean_ms else None


# --------------------------------------------------------------------------- images


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return -math.inf
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def sse_events(text: str) -> list[tuple[str, str]]:
    """(event name, data) of each event of an SSE body ("data:" with or without its optional space)."""
    events, name, data = [], "message", []
    for line in [*text.splitlines(), ""]:
        if not line:
            if data:
                events.append((name, "\n".join(data)))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    return events


def stream_image(text: str) -> np.ndarray:
    """The image of the `image_generation.completed` event of an SSE body."""
    for name, data in sse_events(text):
        if name == "image_generation.completed":
            return decode_png(base64.b64decode(json.loads(data)["b64_json"]))
    raise RuntimeError(f"no image_generation.completed event in the stream: {text[-300:]!r}")


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def child_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", DO_NOT_TRACK="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    return spawn_group(cmd, log, child_env(), ROOT)


def run_peer(args: list[str], timeout_s: float) -> str:
    """A one-shot `_diffusion_peers.py` mode; its stdout."""
    done = subprocess.run([sys.executable, str(PEERS), *args], cwd=ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"_diffusion_peers.py {args[0]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def tandem_repo(case: ModelCase, s: Settings, workdir: Path, runtime: str = "torch") -> Path:
    """A one-entry repository whose tandem.yaml points `path:` at the case's pipeline folder."""
    entry = workdir / f"repo-{case.key}-{runtime}" / NAME
    entry.mkdir(parents=True, exist_ok=True)
    (entry / "tandem.yaml").write_text(
        f"name: {NAME}\nkind: diffusion\nthreads: {s.threads}\ndiffusion:\n  path: {json.dumps(str(case.folder))}\n"
        f"  sizes: [\"{case.size}x{case.size}\"]\n  default_steps: 20\n  max_steps: 100\n"
        f"  max_batch_rows: {MAX_BATCH_ROWS}\n  unet: {{runtime: {runtime}}}\n", encoding="utf-8")
    return entry.parent


def server_command(system: str, case: ModelCase, port: int, s: Settings, workdir: Path) -> list[str]:
    if system.startswith("tandem"):
        runtime = "onnxruntime" if system == "tandem-ort" else "torch"
        repo = tandem_repo(case, s, workdir, runtime)
        return [sys.executable, "-m", "tandem.cli", "serve", str(repo), "--port", str(port)]
    cmd = [sys.executable, str(PEERS), system, "--folder", str(case.folder), "--name", NAME, "--port", str(port),
           "--threads", str(s.threads)]
    if system == "litserve":
        cmd += ["--batch", str(LITSERVE_BATCH), "--batch-timeout", str(LITSERVE_BATCH_TIMEOUT_S)]
    return cmd


def wait_ready(url: str, body: dict[str, Any], proc: subprocess.Popen[bytes], log: Path) -> bytes:
    """Poll with the health request until it succeeds; return its PNG bytes."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready:\n{tail(log)}")
        try:
            r = httpx.post(url, json=body, timeout=REQUEST_TIMEOUT_S)
            if r.status_code == 200:
                return r.content
            last = f"HTTP {r.status_code}: {r.text[:300]}"
            if r.status_code in (400, 404, 405, 415, 422):  # a wiring bug: waiting will not fix it
                break
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(1.0)
    raise RuntimeError(f"{url} not ready ({last}):\n{tail(log)}")


# --------------------------------------------------------------------------- Tandem's /metrics

_STAGES = "tandem_diffusion_stage_seconds"
_ROWS = "tandem_diffusion_unet_rows"
_STALL = "tandem_diffusion_vae_stall_iterations"
_UNMEASURED = "tandem_diffusion_vae_stall_unmeasured"


def scrape(base: str) -> dict[tuple[str, str, str], float]:
    """Tandem's diffusion histogram samples of model `t2i`: (sample name, stage, `le`) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", timeout=30.0).text
    out: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in (_STAGES, _ROWS, _STALL, _UNMEASURED):
            continue
        for x in family.samples:
            if x.labels.get("model") == NAME:
                key = (x.name, x.labels.get("stage", ""), x.labels.get("le", ""))
                out[key] = out.get(key, 0.0) + x.value
    return out


def _buckets(delta: dict[tuple[str, str, str], float], name: str, stage: str) -> list[tuple[float, float]]:
    return sorted((float(le), v) for (n, st, le), v in delta.items() if n == f"{name}_bucket" and st == stage)


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus-style histogram_quantile: linear inside the bucket holding rank q."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank, lower, below = q * buckets[-1][1], 0.0, 0.0
    for upper, cum in buckets:
        if cum >= rank:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - below) / max(cum - below, 1e-12)
        lower, below = upper, cum
    return lower


def max_bucket(buckets: list[tuple[float, float]]) -> float | None:
    """Upper bound of the highest non-empty bucket (the max observation is at most this)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    return next(upper for upper, cum in buckets if cum >= buckets[-1][1])


def _mean_ms(delta: dict[tuple[str, str, str], float], name: str, stage: str = "") -> tuple[float | None, int]:
    count, total = delta.get((f"{name}_count", stage, ""), 0.0), delta.get((f"{name}_sum", stage, ""), 0.0)
    return (total / count * (1000.0 if name == _STAGES else 1.0) if count else None), int(count)


def vae_stall(before: dict[tuple[str, str, str], float], after: dict[tuple[str, str, str], float]) -> dict[str, Any]:
    """Workload 4: UNet iteration times against decodes, from two scrapes around one level."""
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    unet = _buckets(delta, _STAGES, "unet_iteration")
    out: dict[str, Any] = {}
    for key, q in (("unet_p50_ms", 0.5), ("unet_p99_ms", 0.99)):
        v = quantile(unet, q)
        out[key] = None if v is None else v * 1000
    top = max_bucket(unet)
    out["unet_max_bucket_ms"] = None if top is None else top * 1000
    out["unet_mean_ms"], out["unet_iterations"] = _mean_ms(delta, _STAGES, "unet_iteration")
    out["vae_decode_mean_ms"], out["vae_decodes"] = _mean_ms(delta, _STAGES, "vae_decode")
    out["text_encode_mean_ms"], out["text_encodes"] = _mean_ms(delta, _STAGES, "text_encode")
    out["rows_mean"], _ = _mean_ms(delta, _ROWS)
    p50, vae = out["unet_p50_ms"], out["vae_decode_mean_ms"]
    out["one_decode_bound_ms"] = p50 + vae if p50 is not None and vae is not None else None
    stall = _buckets(delta, _STALL, "")
    out["stall_stretches"] = int(stall[-1][1]) if stall else 0
    out["stall_mean_iterations"], _ = _mean_ms(delta, _STALL)
    out["stall_p99_iterations"] = quantile(stall, 0.99)
    out["stall_max_bucket"] = max_bucket(stall)
    within = next((cum for le, cum in stall if le == 1.0), None)   # 1.0 is a bucket edge: exact share
    out["stall_within_one"] = within / stall[-1][1] if within is not None and stall[-1][1] > 0 else None
    out["stall_unmeasured"] = int(delta.get((f"{_UNMEASURED}_total", "", ""), 0.0))
    return out


# --------------------------------------------------------------------------- running


def make_case(key: str, s: Settings, workdir: Path) -> ModelCase | None:
    """The pipeline folder of model `key` (sd-shaped: written now); None when the shipped one is absent."""
    if key == "shipped":
        if not (SHIPPED_PIPELINE / "model_index.json").exists():
            return None
        return ModelCase(key, "built-in text-to-image model (trained), 64x64", SHIPPED_PIPELINE, SHIPPED_SIZE)
    folder = workdir / "sd-shaped" / "pipeline"
    run_peer(["make", "--folder", str(folder), "--shape", "sd-shaped"], READY_TIMEOUT_S)
    label = (f"random weights, SD-shaped UNet (channels 64/128/256/256, 2 layers/block, text 128 x 77 tokens), "
             f"{s.sd_size}x{s.sd_size}")
    return ModelCase(key, label, folder, s.sd_size)


def offline_plan(case: ModelCase, s: Settings, timed: bool) -> dict[str, Any]:
    health = health_body(s, case)
    workloads = [{"name": "c1", "bodies": c1_bodies(s, case)}, {"name": "mix", "bodies": mix_bodies(s, case)}]
    for w in workloads:
        w.update(warmup_s=s.warmup_s, duration_s=s.duration_s)
    return {"references": [health], "workloads": workloads if timed else []}


def offline_levels(case: ModelCase, s: Settings, result: dict[str, Any]) -> list[Level]:
    levels = []
    for name, w in result["workloads"].items():
        lat = w["latencies_ms"]
        levels.append(Level(case.key, "offline", name, 1, w["images_per_s"], _pct(lat, 50), _pct(lat, 90),
                            _pct(lat, 95), float(np.mean(lat)) if lat else None, 0, w["images"],
                            {"unet_share": w["unet_share"], "in_process": True, "warmup_s": s.warmup_s,
                             "duration_s": s.duration_s}))
    return levels


def offline_run(case: ModelCase, s: Settings, timed: bool, workdir: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """The reference image (and, when `timed`, the offline levels) from `_diffusion_peers.py offline`."""
    plan = workdir / f"plan-{case.key}.json"
    plan.write_text(json.dumps(offline_plan(case, s, timed)), encoding="utf-8")
    budget = READY_TIMEOUT_S + 4 * (s.warmup_s + s.duration_s + 120)
    out = run_peer(["offline", "--folder", str(case.folder), "--plan", str(plan), "--out",
                    str(workdir / f"offline-{case.key}"), "--threads", str(s.threads)], budget)
    result = dict(json.loads(out.strip().splitlines()[-1]))
    return decode_png(Path(result["references"][0]).read_bytes()), result


def _window(lv: Level) -> str:
    return f"{fmt(lv.extra.get('warmup_s'), 0)}+{fmt(lv.extra.get('duration_s'), 0)}"


def print_level(lv: Level) -> None:
    model = lv.extra.get("model_p50_ms")
    more = f"  window {_window(lv)} s"
    more += f"  model p50 {fmt(model)} ms" if model is not None else ""
    share = lv.extra.get("unet_share")
    more += f"  UNet {share * 100:.0f}% of the time" if share is not None else ""
    print(f"    {lv.system:<9} {lv.workload:<10} c={lv.concurrency:<2} {fmt(lv.images_per_s, 3):>7} img/s  "
          f"p50 {fmt(lv.p50_ms, 0):>7} ms  p95 {fmt(lv.p95_ms, 0):>7} ms  errors {lv.errors}/{lv.requests}{more}",
          flush=True)


def check_stream(base: str, case: ModelCase, s: Settings, reference: np.ndarray) -> float:
    """Tandem's streaming route gives the reference image too (same prompt, seed, steps)."""
    body = generation_body(health_prompt(), HEALTH_SEED, s.c1_steps, case.size, stream=True)
    r = httpx.post(f"{base}/v1/images/generations", json=body, timeout=REQUEST_TIMEOUT_S)
    r.raise_for_status()
    return psnr_db(stream_image(r.text), reference)


def mean_steps(bodies: list[dict[str, Any]]) -> float:
    return float(np.mean([b.get("steps") or b["parameters"]["num_inference_steps"] for b in bodies]))


def server_levels(system: str, base: str, case: ModelCase, s: Settings, step_s: float, res: ModelResult) -> None:
    """Workloads 1 and 2 (and, for Tandem, 3 and 4) against one running server; `step_s`: seconds per step alone."""
    url = f"{base}/predictions/{NAME}"
    plan = [(1, "c1", c1_bodies(s, case))] + [(c, "mix", mix_bodies(s, case)) for c in s.levels]
    for lv_c, workload, bodies in plan:
        before = scrape(base) if system == "tandem" and workload == "mix" and lv_c == HIGH else None
        level = load_level(url, bodies, lv_c, window(s, lv_c, step_s * mean_steps(bodies)),
                           (case.key, system, workload))
        if before is not None:
            res.vae = vae_stall(before, scrape(base))
        res.levels.append(level)
        print_level(level)
    if system == "tandem":
        gen = f"{base}/v1/images/generations"
        for workload, stream in (("no-preview", False), ("preview", True)):
            bodies = preview_bodies(s, case, stream)
            level = load_level(gen, bodies, HIGH, window(s, HIGH, step_s * mean_steps(bodies)),
                               (case.key, system, workload), stream, "application/json")
            res.levels.append(level)
            print_level(level)
        if res.vae:
            print(format_vae(res.vae), flush=True)


def warm_request_s(url: str, body: dict[str, Any]) -> float:
    """Seconds one request takes on the warm, idle server."""
    t0 = time.perf_counter()
    httpx.post(url, json=body, timeout=REQUEST_TIMEOUT_S).raise_for_status()
    return time.perf_counter() - t0


@contextlib.contextmanager
def served(system: str, case: ModelCase, s: Settings, reference: np.ndarray, workdir: Path,
           tag: str = "") -> Iterator[tuple[str, float, int]]:
    """Start one server and wait for its health request; yield (base URL, PSNR of that image against the
    reference, the server's pid: the supervisor for Tandem); stop it on the way out. Its log is
    `workdir/{system}-{model}{tag}.log`."""
    port = free_port()
    log = workdir / f"{system}-{case.key}{tag}.log"
    proc = spawn(server_command(system, case, port, s, workdir), log)
    try:
        base = f"http://{HOST}:{port}"
        png = wait_ready(f"{base}/predictions/{NAME}", health_body(s, case), proc, log)
        yield base, psnr_db(decode_png(png), reference), proc.pid
    finally:
        stop(proc)


def health_body(s: Settings, case: ModelCase) -> dict[str, Any]:
    return predict_body(health_prompt(), HEALTH_SEED, s.c1_steps, case.size)


def server_run(system: str, case: ModelCase, s: Settings, reference: np.ndarray, res: ModelResult,
               workdir: Path) -> None:
    """Start one server, check its image against the reference, run the workloads, stop it."""
    t0 = time.monotonic()
    try:
        with served(system, case, s, reference, workdir) as (base, db, _):
            server_workloads(system, base, db, time.monotonic() - t0, case, s, reference, res)
    except (RuntimeError, httpx.HTTPError, ValueError, KeyError) as e:
        res.parity[system] = {"psnr_db": None, "note": f"failed: {str(e).splitlines()[0]}"}
        print(f"  {system}: FAILED: {e}", flush=True)


def server_workloads(system: str, base: str, db: float, ready_s: float, case: ModelCase, s: Settings,
                     reference: np.ndarray, res: ModelResult) -> None:
    """On a ready server: record its image check, then (if it passed) time every workload."""
    parity: dict[str, Any] = {"psnr_db": db, "ready_s": ready_s}
    if system == "tandem":
        parity["stream_psnr_db"] = check_stream(base, case, s, reference)
    res.parity[system] = parity
    print(f"  {system}: ready in {parity['ready_s']:.1f} s, PSNR vs offline {fmt_db(db)}"
          + (f", streaming route {fmt_db(parity['stream_psnr_db'])}" if "stream_psnr_db" in parity else ""),
          flush=True)
    if min(db, parity.get("stream_psnr_db", math.inf)) < PSNR_MIN_DB:
        parity["note"] = f"image differs from the offline one (< {PSNR_MIN_DB:.0f} dB): not timed"
        print(f"  {system}: {parity['note']}", flush=True)
        return
    parity["warm_request_s"] = warm_request_s(f"{base}/predictions/{NAME}", health_body(s, case))
    server_levels(system, base, case, s, parity["warm_request_s"] / s.c1_steps, res)


def model_run(case: ModelCase, s: Settings, systems: list[str], workdir: Path) -> ModelResult:
    res = ModelResult(case)
    print(f"\n== {case.key}: {case.label}; pipeline {case.folder}", flush=True)
    reference, offline = offline_run(case, s, "offline" in systems, workdir)
    res.offline = {"torch_threads": offline["torch_threads"]}
    res.parity["offline"] = {"psnr_db": math.inf, "note": "reference"}
    for level in offline_levels(case, s, offline):
        res.levels.append(level)
        print_level(level)
    for system in (x for x in SYSTEMS if x != "offline" and x in systems):
        time.sleep(1.0)  # let the previous server's processes leave the CPUs
        server_run(system, case, s, reference, res, workdir)
    return res


# --------------------------------------------------------------------------- report


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def fmt_db(value: float | None) -> str:
    if value is None:
        return "-"
    return "identical (inf dB)" if math.isinf(value) and value > 0 else f"{value:.1f} dB"


def find(res: ModelResult, system: str, workload: str, concurrency: int) -> Level | None:
    return next((lv for lv in res.levels if (lv.system, lv.workload, lv.concurrency) == (system, workload,
                                                                                      concurrency)), None)


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _attr(lv: Level | None, name: str) -> float | None:
    return None if lv is None else getattr(lv, name)


def ratios(res: ModelResult) -> dict[str, float | None]:
    tandem_c1, offline_c1 = find(res, "tandem", "c1", 1), find(res, "offline", "c1", 1)
    ips = {x: _attr(find(res, x, "mix", 1 if x == "offline" else HIGH), "images_per_s") for x in SYSTEMS}
    little = {x: _little(find(res, x, "mix", HIGH)) for x in SYSTEMS}
    plain, preview = find(res, "tandem", "no-preview", HIGH), find(res, "tandem", "preview", HIGH)
    slow = _div(_attr(preview, "images_per_s"), _attr(plain, "images_per_s"))
    return {"tandem_p50_over_offline_c1": _div(_attr(tandem_c1, "p50_ms"), _attr(offline_c1, "p50_ms")),
            "tandem_over_diffusers": _div(ips["tandem"], ips["diffusers"]),
            "tandem_over_litserve": _div(ips["tandem"], ips["litserve"]),
            "tandem_over_diffusers_little": _div(little["tandem"], little["diffusers"]),
            "tandem_over_litserve_little": _div(little["tandem"], little["litserve"]),
            "tandem_over_offline_sequential": _div(ips["tandem"], ips["offline"]),
            "ort_p50_over_offline_c1": _div(_attr(find(res, "tandem-ort", "c1", 1), "p50_ms"),
                                            _attr(offline_c1, "p50_ms")),
            "ort_over_diffusers": _div(ips["tandem-ort"], ips["diffusers"]),
            "ort_over_litserve": _div(ips["tandem-ort"], ips["litserve"]),
            "preview_slowdown": None if slow is None else 1.0 - slow}


def _little(lv: Level | None) -> float | None:
    return None if lv is None else lv.extra.get("little_ips")


def _goal(value: float | None, ok: bool) -> str:
    return "n/a" if value is None else ("met" if ok else "**missed**")


def ratio_lines(r: dict[str, float | None]) -> list[str]:
    c1, dif, lit = r["tandem_p50_over_offline_c1"], r["tandem_over_diffusers"], r["tandem_over_litserve"]
    off, slow = r["tandem_over_offline_sequential"], r["preview_slowdown"]
    return [
        f"- Tandem p50 / offline p50 at c=1: {fmt(c1, 3)} (goal <= 1.05: {_goal(c1, (c1 or 9) <= 1.05)})",
        f"- Tandem / diffusers-server images/s at c={HIGH}: {fmt(dif, 2)}x (goal >= 1.5x: "
        f"{_goal(dif, (dif or 0) >= 1.5)}); by Little's law (c / mean latency) "
        f"{fmt(r['tandem_over_diffusers_little'], 2)}x",
        f"- Tandem / LitServe images/s at c={HIGH}: {fmt(lit, 2)}x (goal >= 1.3x: {_goal(lit, (lit or 0) >= 1.3)}); "
        f"by Little's law {fmt(r['tandem_over_litserve_little'], 2)}x",
        f"- Tandem at c={HIGH} / offline one-at-a-time images/s: {fmt(off, 2)}x",
        f"- Tandem with the UNet on onnxruntime: p50 / offline p50 at c=1 {fmt(r['ort_p50_over_offline_c1'], 3)}; "
        f"/ diffusers-server {fmt(r['ort_over_diffusers'], 2)}x, / LitServe {fmt(r['ort_over_litserve'], 2)}x "
        f"at c={HIGH}",
        f"- Preview cost (streaming with partial_images {PARTIAL_IMAGES} vs stream false, c={HIGH}): "
        f"{'-' if slow is None else f'{slow * 100:+.1f}%'} slowdown (goal <= 5%: {_goal(slow, (slow or 0) <= 0.05)})",
    ]


def format_vae(v: dict[str, Any]) -> str:
    return (f"      VAE stall (c={HIGH} step mix, /metrics deltas incl. warm-up): unet_iteration p50 ~"
            f"{fmt(v['unet_p50_ms'])} ms, p99 ~{fmt(v['unet_p99_ms'])} ms, max bucket <= "
            f"{fmt(v['unet_max_bucket_ms'], 0)} ms, mean {fmt(v['unet_mean_ms'])} ms over {v['unet_iterations']} "
            f"iterations ({fmt(v['rows_mean'])} rows each on average); vae_decode mean {fmt(v['vae_decode_mean_ms'])} "
            f"ms over {v['vae_decodes']} decodes; text_encode mean {fmt(v['text_encode_mean_ms'])} ms; "
            f"median iteration + one decode = {fmt(v['one_decode_bound_ms'])} ms\n"
            f"      VAE stall per decode (tandem_diffusion_vae_stall_iterations, {v.get('stall_stretches', 0)} "
            f"decode-overlapped stretches, {v.get('stall_unmeasured', 0)} unmeasured): mean "
            f"{fmt(v.get('stall_mean_iterations'), 3)} iterations lost, p99 ~{fmt(v.get('stall_p99_iterations'), 2)}, "
            f"max <= {fmt(v.get('stall_max_bucket'), 2)}; {_share(v.get('stall_within_one'))} of stretches lost "
            f"<= 1 iteration per decode (goal: all)")


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def _row(lv: Level) -> str:
    unit = " (in-process, one at a time)" if lv.extra.get("in_process") else ""
    model = lv.extra.get("model_p50_ms")
    return (f"| {_label(lv)} | {lv.concurrency}{unit} | {fmt(lv.images_per_s, 3)} | "
            f"{fmt(None if unit else lv.extra.get('little_ips'), 3)} | {fmt(lv.p50_ms, 0)} | "
            f"{fmt(lv.p90_ms, 0)} | {fmt(lv.p95_ms, 0)} | {fmt(lv.mean_ms, 0)} | {fmt(model, 0)} | "
            f"{lv.errors}/{lv.requests} | {_window(lv)} |")


def tables(res: ModelResult, s: Settings) -> list[str]:
    head = ["| system | concurrency | images/s | c / mean latency | p50 ms | p90 ms | p95 ms | mean ms | model p50 ms "
            "| errors | window s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    out = []
    titles = {"c1": f"Workload 1: c=1, {s.c1_steps} steps",
              "mix": f"Workload 2: steps drawn from {'/'.join(map(str, s.step_mix))}",
              "no-preview": f"Workload 3: preview cost, Tandem /v1/images/generations, {s.preview_steps} steps"}
    for workload, title in titles.items():
        names = ("no-preview", "preview") if workload == "no-preview" else (workload,)
        rows = sorted((lv for lv in res.levels if lv.workload in names),
                      key=lambda lv: (lv.concurrency, SYSTEMS.index(lv.system), lv.workload))
        if rows:
            out += [f"{title}:", "", *head, *(_row(lv) for lv in rows), ""]
    return out


def _label(lv: Level) -> str:
    return {"preview": "tandem, stream + previews", "no-preview": "tandem, stream false"}.get(lv.workload, lv.system)


def parity_lines(res: ModelResult) -> list[str]:
    lines = [f"Image check (health request, seed {HEALTH_SEED}, vs the offline image; PSNR >= {PSNR_MIN_DB:.0f} dB):"]
    for system, p in res.parity.items():
        extra = f"; streaming route {fmt_db(p['stream_psnr_db'])}" if "stream_psnr_db" in p else ""
        note = f" ({p['note']})" if p.get("note") else ""
        lines.append(f"- {system}: {fmt_db(p.get('psnr_db'))}{extra}{note}")
    return lines


def model_markdown(res: ModelResult, s: Settings) -> str:
    lines = [f"### {res.case.key} ({res.case.label})", ""]
    offline = find(res, "offline", "c1", 1)
    share = None if offline is None else offline.extra.get("unet_share")
    if share is not None:
        lines += [f"UNet share of an offline {s.c1_steps}-step request: {share * 100:.1f}%.", ""]
    lines += [*parity_lines(res), "", *tables(res, s), *ratio_lines(ratios(res)), ""]
    c1 = find(res, "tandem", "c1", 1)
    if c1 and c1.extra.get("model_p50_ms") is not None:
        lines += [f"- Tandem at c=1: endpoint p50 {fmt(c1.p50_ms, 0)} ms, model p50 {fmt(c1.extra['model_p50_ms'], 0)}"
                  f" ms (X-Tandem-Model-Ms: queue + text encode + denoise + decode); HTTP side "
                  f"{fmt(_diff(c1.p50_ms, c1.extra['model_p50_ms']), 0)} ms", ""]
    preview = find(res, "tandem", "preview", HIGH)
    if preview and preview.extra.get("previews_per_image") is not None:
        lines += [f"- Previews received per streamed image: {preview.extra['previews_per_image']:.1f} "
                  f"(partial_images {PARTIAL_IMAGES}, Tandem's preview_interval_ms default)", ""]
    if res.vae:
        lines += ["Workload 4:", format_vae(res.vae).strip(), ""]
    return "\n".join(lines)


def _diff(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def report(results: list[ModelResult], skipped: list[str], s: Settings, meta: dict[str, Any]) -> str:
    m = meta["machine"]
    head = [f"Command: `{meta['command']}`", "",
            f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), no GPU; date {meta['date']}; revision {meta['revision']}; "
            f"{s.duration_s:g} s + warm-up {s.warmup_s:g} s per level; torch threads {s.threads} per system; "
            f"same httpx closed-loop client for every server.", "", *system_lines(s), ""]
    return "\n".join(head + [f"- {x}" for x in skipped] + [""] * bool(skipped)
                     + [model_markdown(r, s) for r in results])


def system_lines(s: Settings) -> list[str]:
    pool = min(32, (os.cpu_count() or 1) + 4)
    return [
        "- offline: stock StableDiffusionPipeline in a loop in its own process, one request at a time "
        "(pipeline call + PNG encode)",
        f"- diffusers: diffusers examples/server pattern, FastAPI/uvicorn, per request from_pipe + fresh scheduler "
        f"in asyncio's default executor ({pool} threads here)",
        f"- litserve: max_batch_size {LITSERVE_BATCH}, batch_timeout {LITSERVE_BATCH_TIMEOUT_S * 1000:.0f} ms, 1 CPU "
        "worker; one pipeline call per same-(steps, size, scheduler) group, one seeded generator per request",
        f"- tandem: tandem serve, defaults plus sizes, default_steps 20, max_steps 100, max_batch_rows "
        f"{MAX_BATCH_ROWS}, threads {s.threads}",
        "- a level's window (warm-up + measured s) grows to at least one and two rounds of concurrency x the "
        "server's one-image time, so that slow levels still complete images inside it",
    ]


def plot(results: list[ModelResult], path: Path) -> Path:
    """p50 (solid) and p95 (dashed) latency against concurrency, per system, one panel per model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0 * len(results), 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    for ax, res in zip(axes, results, strict=True):
        for i, system in enumerate(SYSTEMS):
            rows = sorted((lv for lv in res.levels if lv.system == system and lv.workload == "mix"),
                          key=lambda lv: lv.concurrency)
            if not rows:
                continue
            x = [lv.concurrency for lv in rows]
            label = f"{system} (in-process)" if system == "offline" else system
            ax.plot(x, [lv.p50_ms for lv in rows], "-o", color=f"C{i}", label=f"{label} p50")
            ax.plot(x, [lv.p95_ms for lv in rows], "--s", color=f"C{i}", label=f"{label} p95")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(PLOT_LEVELS), [str(c) for c in PLOT_LEVELS])
        ax.set_xlabel("concurrency (closed loop)")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{res.case.key}: {res.case.size}x{res.case.size}, steps 20/30/50")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# --------------------------------------------------------------------------- main


def _csv(text: str, allowed: tuple[str, ...]) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}; got {text!r}")
    return items


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Tandem text-to-image vs offline diffusers, diffusers-server, LitServe.")
    p.add_argument("--duration", type=float, default=60.0, help="measured seconds per level")
    p.add_argument("--warmup", type=float, default=15.0, help="unmeasured warm-up seconds per level")
    p.add_argument("--models", type=lambda v: _csv(v, MODELS), default=list(MODELS))
    p.add_argument("--systems", type=lambda v: _csv(v, SYSTEMS), default=list(SYSTEMS))
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads of every system")
    p.add_argument("--quick", action="store_true", help="smoke run: 64x64, steps / 5, 8 s + 2 s per level, c=8 only")
    p.add_argument("--markdown", type=Path, help="write the markdown report here")
    p.add_argument("--json", type=Path, help="write raw results here")
    p.add_argument("--plot", type=Path, help="latency-vs-concurrency PNG (default: in the log folder; not --quick)")
    return p.parse_args(argv)


def settings(args: argparse.Namespace) -> Settings:
    if args.quick:
        mix = tuple(max(1, n // QUICK_DIVISOR) for n in STEP_MIX)
        return Settings(min(args.duration, 8.0), min(args.warmup, 2.0), C1_STEPS // QUICK_DIVISOR, mix,
                        PREVIEW_STEPS // QUICK_DIVISOR, (HIGH,), QUICK_SD_SIZE, args.threads)
    return Settings(args.duration, args.warmup, C1_STEPS, STEP_MIX, PREVIEW_STEPS, PLOT_LEVELS, SD_SHAPED_SIZE,
                    args.threads)


def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "platform": platform.platform()}


def revision() -> str:
    """The checked-out commit, read from .git (HEAD, its ref file or packed-refs); no git process."""
    git = ROOT / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:12]
        ref = head[5:]
        if (git / ref).exists():
            return (git / ref).read_text().strip()[:12]
        packed = (git / "packed-refs").read_text().splitlines()
        return next(ln.split()[0][:12] for ln in packed if ln.endswith(" " + ref))
    except (OSError, StopIteration):
        return "unknown"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("tandem-ai", "torch", "diffusers", "transformers", "litserve", "fastapi", "uvicorn", "httpx"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, Paths -> str, tuples -> lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def write_outputs(args: argparse.Namespace, text: str, results: list[ModelResult], s: Settings,
                  meta: dict[str, Any], workdir: Path) -> None:
    if args.markdown:
        args.markdown.write_text(text + "\n", encoding="utf-8")
    if args.json:
        data = {"meta": meta, "settings": asdict(s), "systems": args.systems,
                "models": [{**asdict(r), "ratios": ratios(r)} for r in results]}
        args.json.write_text(json.dumps(_clean(data), indent=2) + "\n", encoding="utf-8")
    if not args.quick and results:
        print(f"plot: {plot(results, args.plot or workdir / 'diffusion-latency.png')}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = settings(args)
    meta: dict[str, Any] = {"command": "python " + " ".join([f"benchmarks/{Path(__file__).name}", *sys.argv[1:]]),
                            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                            "machine": machine(), "versions": versions(), "revision": revision()}
    workdir = Path(tempfile.mkdtemp(prefix="tandem-diffusion-bench-"))
    print(f"diffusion benchmark: {meta['machine']['cpus']} CPUs ({meta['machine']['cpu_model']}); logs in {workdir}",
          flush=True)
    results, skipped = [], []
    for key in args.models:
        case = make_case(key, s, workdir)
        if case is None:
            skipped.append(f"{key}: skipped, no pipeline at {SHIPPED_PIPELINE} yet")
            print(f"\n== {skipped[-1]}", flush=True)
            continue
        results.append(model_run(case, s, args.systems, workdir))
        if case.folder.is_relative_to(workdir):
            shutil.rmtree(case.folder.parent, ignore_errors=True)  # generated weights; the logs stay
    text = report(results, skipped, s, meta)
    print("\n" + text)
    write_outputs(args, text, results, s, meta, workdir)
    failed = [f"{r.case.key}/{x}" for r in results for x, p in r.parity.items() if p.get("note", "") != "reference"
              and (p.get("psnr_db") is None or p["psnr_db"] < PSNR_MIN_DB)]
    if failed:
        print(f"image check failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
