"""`tandem optimize` for a diffusion entry: which runtime runs its UNet fastest at image parity.

    tandem optimize text-to-image --write-entry my-repo/text-to-image-fast

The UNet is exported to ONNX once per size bucket, into TANDEM_CACHE_DIR: the same files that an
entry with `unet: {runtime: ...}` loads at start, so serving the written entry exports nothing.
Each calibration request (SageMaker bodies, `{"prompt": ..., "parameters": {...}}`, exactly as
`POST /invocations` takes them) runs whole -- text encoder, every UNet step, VAE decode -- on torch
eager (the reference) and on each candidate runtime. The variants take turns inside every
repetition, so load from other processes spreads over all of them. A candidate passes when each
of its images is within `min_psnr` dB of torch's image for the same seed. The fastest passing
candidate is chosen if it beats torch by `min_speedup`; otherwise the UNet stays on torch.

Only the UNet has other runtimes (fp32, CPU): the text encoder runs once per request and the VAE
once per image, so the UNet's steps are where the time goes (tandem/diffusion/runtimes.py).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tandem.config import DiffusionConfig, ModelConfig
from tandem.diffusion.engine import DenoiseEngine, Job, run_alone
from tandem.diffusion.messages import ImageParams
from tandem.diffusion.pipeline import Stages, bucket_graphs, load_stages, make_unet_runtime
from tandem.errors import OptimizeError, TandemError

__all__ = ["CANDIDATES", "DiffusionOutcome", "RuntimeResult", "calibration_jobs", "optimize_diffusion", "psnr",
           "write_diffusion_entry"]

CANDIDATES = ("onnxruntime", "openvino")
# Used when the entry has no calibration.jsonl and none is given: short, so small tokenizers take them.
DEFAULT_PROMPTS = ("a red circle", "a blue square", "a cat", "a tree")
REPORT = "diffusion-report.json"


@dataclass
class RuntimeResult:
    """One runtime's measurement: request time summed over the calibration set, worst image PSNR."""

    runtime: str
    seconds: float = 0.0  # per pass over the calibration requests: each request's median, summed
    psnr_min: float = float("inf")  # worst image against torch eager's (dB; inf = identical)
    speedup: float = 1.0  # torch's seconds / these
    refused: str = ""  # why this runtime could not run here ("" when it ran)
    passed: bool = False  # ran, and every image cleared min_psnr


@dataclass
class DiffusionOutcome:
    """What `optimize_diffusion` measured and chose; `report` is the JSON written beside the graphs."""

    name: str
    pipeline: Path
    results: list[RuntimeResult]
    chosen: str  # "torch" when no candidate passed and beat it
    requests: int
    repeats: int
    graphs: dict[str, str] = field(default_factory=dict)  # "WxH" pixels -> cached ONNX export
    report: Path | None = None


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(255.0**2 / mse))


@dataclass(frozen=True)
class _Spec:
    """A calibration request, ready to become a fresh engine Job for every run."""

    params: ImageParams
    cond: tuple[list[int], int]
    uncond: tuple[list[int], int]

    def job(self, req_id: int) -> Job:
        return Job(req_id, 0, self.params, self.cond[0], self.uncond[0], self.cond[1], self.uncond[1])


def _bodies(entry_dir: Path, cfg: DiffusionConfig, calibration: Path | None) -> list[tuple[str, dict[str, Any]]]:
    """(where, JSON body) of each calibration request; the default set has one prompt per size bucket."""
    from tandem.optimize.sources import load_requests

    path = calibration or entry_dir / "calibration.jsonl"
    if calibration is None and not path.exists():
        buckets = cfg.buckets()
        sizes = [buckets[i % len(buckets)] for i in range(max(len(DEFAULT_PROMPTS), len(buckets)))]
        return [(f"default prompt {i + 1}", {"prompt": DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)],
                                             "parameters": {"width": w, "height": h}})
                for i, (w, h) in enumerate(sizes)]
    out = []
    for i, request in enumerate(load_requests(path)):
        try:  # JSONL lines come parsed; a folder's files are raw bodies
            out.append((f"calibration request {i + 1} of {path}",
                        request.json if request.json is not None else json.loads(request.body)))
        except ValueError as e:
            raise OptimizeError(f"calibration request {i + 1} of {path}: not a JSON body: {e}") from None
    return out


def calibration_jobs(entry_dir: Path, cfg: DiffusionConfig, calibration: Path | None = None,
                     limit: int | None = None, name: str = "") -> list[_Spec]:
    """Calibration requests checked as the server checks them; a request without a seed gets 1000 + its index."""
    from tandem.diffusion.client import Validator
    from tandem.diffusion.routes import parse_invocation
    from tandem.diffusion.text import PromptTokenizer

    validator = Validator(cfg, PromptTokenizer(cfg.pipeline_dir(entry_dir)), name or entry_dir.name)
    specs = []
    for i, (where, body) in enumerate(_bodies(entry_dir, cfg, calibration)[:limit]):
        try:
            if not isinstance(body, dict):
                raise OptimizeError("the body must be a JSON object like {\"prompt\": \"...\", \"parameters\": {}}")
            req, _ = parse_invocation(body)
            if req.seed is None or req.seed == -1:
                req.seed = 1000 + i  # reproducible: every runtime draws the same noise
            specs.append(_Spec(validator.params(req), *validator.tokens(req)))
        except TandemError as e:
            raise OptimizeError(f"{where}: {e} (fix the request, or pass --calibration with requests this model "
                                "takes)") from None
    if not specs:
        raise OptimizeError("no calibration requests to run (check --limit)")
    return specs


def _candidates(names: Sequence[str], graphs: dict[tuple[int, int], Path],
                threads: int | None) -> tuple[dict[str, dict[tuple[int, int], Any]], dict[str, str]]:
    """Runtime name -> its UNet per latent size; and the refused ones with why."""
    made: dict[str, dict[tuple[int, int], Any]] = {"torch": {}}  # no override: Stages.denoise runs eager torch
    refused: dict[str, str] = {}
    for name in names:
        try:
            made[name] = {latent: make_unet_runtime(name, graph, threads) for latent, graph in graphs.items()}
        except ImportError as e:
            refused[name] = f"{e.name or name} is not installed (pip install {name})"
    return made, refused


def _measure(stages: Stages, cfg: DiffusionConfig, specs: Sequence[_Spec],
             variants: dict[str, dict[tuple[int, int], Any]], repeats: int,
             tick: Callable[[], None]) -> tuple[dict[str, list[list[float]]], dict[str, list[np.ndarray]]]:
    """Every request on every variant, variants taking turns: seconds[variant][request] and first images."""
    seconds: dict[str, list[list[float]]] = {v: [[] for _ in specs] for v in variants}
    images: dict[str, list[np.ndarray]] = {v: [] for v in variants}
    req_id = 0
    for rep in range(repeats):
        for i, spec in enumerate(specs):
            for name, unets in variants.items():
                engine = DenoiseEngine(replace(stages, unet_runtimes=unets), cfg)
                req_id += 1
                t0 = time.perf_counter()
                out = run_alone(engine, [spec.job(req_id)])[req_id].numpy()
                seconds[name][i].append(time.perf_counter() - t0)
                if rep == 0:
                    images[name].append(out)
                tick()
    return seconds, images


def _results(seconds: dict[str, list[list[float]]], images: dict[str, list[np.ndarray]], refused: dict[str, str],
             min_psnr: float) -> list[RuntimeResult]:
    total = {name: sum(statistics.median(s) for s in per) for name, per in seconds.items()}
    out = []
    for name in seconds:
        worst = min((psnr(a, b) for a, b in zip(images[name], images["torch"])), default=float("inf"))
        out.append(RuntimeResult(name, total[name], worst, total["torch"] / total[name],
                                 passed=name == "torch" or worst >= min_psnr))
    return out + [RuntimeResult(name, refused=why) for name, why in refused.items()]


def _load(entry_dir: Path) -> ModelConfig:
    from tandem.config import load_model_config
    from tandem.errors import ConfigError

    try:
        config = load_model_config(entry_dir)
    except ConfigError as e:
        raise OptimizeError(str(e)) from None
    if config.kind != "diffusion" or config.diffusion is None:
        raise OptimizeError(f"{entry_dir}: not a diffusion entry (kind: {config.kind})")
    if config.diffusion.unet.device.startswith("cuda") or config.device.startswith("cuda"):
        raise OptimizeError(f"{entry_dir}: its UNet runs on CUDA; the optimizer's UNet runtimes are CPU-only (on "
                            "GPUs use unet.compile and dtype bfloat16 instead)")
    return config


def optimize_diffusion(entry_dir: Path, out: Path, *, calibration: Path | None = None,
                       candidates: Sequence[str] = CANDIDATES, threads: int = 0, repeats: int = 3,
                       min_psnr: float = 40.0, min_speedup: float = 1.05, limit: int | None = None,
                       tick: Callable[[], None] = lambda: None) -> DiffusionOutcome:
    """Measure the entry's UNet on torch and each candidate runtime over whole requests; choose one."""
    import torch

    unknown = [c for c in candidates if c not in CANDIDATES]
    if unknown:
        raise OptimizeError(f"unknown UNet runtime {', '.join(unknown)} for a diffusion entry; choose from "
                            f"{', '.join(CANDIDATES)}")
    config = _load(entry_dir)
    assert config.diffusion is not None
    cfg = config.diffusion.model_copy(update={"unet": config.diffusion.unet.model_copy(update={"runtime": "torch"})})
    if threads:
        torch.set_num_threads(threads)
    specs = calibration_jobs(entry_dir, cfg, calibration, limit, config.name)
    pipeline = cfg.pipeline_dir(entry_dir)
    stages = load_stages(pipeline, cfg, "cpu")
    graphs = bucket_graphs(stages, cfg, pipeline)
    variants, refused = _candidates(candidates, graphs, threads or None)
    seconds, images = _measure(stages, cfg, specs, variants, max(1, repeats), tick)
    results = _results(seconds, images, refused, min_psnr)
    passing = [r for r in results if r.passed and r.runtime != "torch" and r.speedup >= min_speedup]
    chosen = max(passing, key=lambda r: r.speedup).runtime if passing else "torch"
    f = stages.scale_factor
    outcome = DiffusionOutcome(config.name, pipeline, results, chosen, len(specs), max(1, repeats),
                               {f"{w * f}x{h * f}": str(p) for (h, w), p in graphs.items()})
    outcome.report = _write_report(out, outcome, threads or torch.get_num_threads(), min_psnr, min_speedup)
    return outcome


def _write_report(out: Path, outcome: DiffusionOutcome, threads: int, min_psnr: float, min_speedup: float) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / REPORT
    body = {"model": outcome.name, "pipeline": str(outcome.pipeline), "chosen": outcome.chosen,
            "requests": outcome.requests, "repeats": outcome.repeats, "threads": threads, "min_psnr_db": min_psnr,
            "min_speedup": min_speedup, "graphs": outcome.graphs,
            "results": [{"runtime": r.runtime, "seconds": round(r.seconds, 4), "speedup": round(r.speedup, 3),
                         "psnr_min_db": None if r.psnr_min == float("inf") else round(r.psnr_min, 2),
                         "passed": r.passed, "refused": r.refused or None} for r in outcome.results]}
    path.write_text(json.dumps(body, indent=1) + "\n")
    return path


def write_diffusion_entry(dest: Path, outcome: DiffusionOutcome, source_dir: Path, name: str) -> Path:
    """A model folder serving the source's pipeline (by path, not copied) with the chosen UNet runtime."""
    from tandem.optimize.entry import claim_folder

    claim_folder(dest)
    path = source_dir / "tandem.yaml"
    settings: dict[str, Any] = dict(yaml.safe_load(path.read_text()) or {})
    section = dict(settings.get("diffusion") or {})
    section["path"] = str(outcome.pipeline)
    section["unet"] = {**dict(section.get("unet") or {}), "runtime": outcome.chosen}
    settings.update(name=name, diffusion=section)
    header = (f"# Written by `tandem optimize` from {source_dir.name}: the UNet on {outcome.chosen} "
              f"(measurements in {REPORT}).\n")
    (dest / "tandem.yaml").write_text(header + yaml.safe_dump(settings, sort_keys=False))
    if outcome.report is not None:
        (dest / REPORT).write_text(outcome.report.read_text())
    (dest / ".tandem-optimized").write_text("")
    return dest
