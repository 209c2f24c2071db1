"""Loading a diffusers Stable Diffusion 1.x/2.x folder as three stages, and per-request schedulers.

    folder/model_index.json, tokenizer/ (fronts), text_encoder/, unet/, vae/, scheduler/ (worker)

Each stage is loaded on its own device and dtype (`StageConfig`); weights must be safetensors (no
pickle is ever loaded). A scheduler instance is made per request from the folder's scheduler
config, so no request shares step state with another (diffusers #3672, #5749, #7851, #9362).

A runtime other than eager torch (TensorRT, Neuron, OpenVINO) plugs in per stage by providing
the same callables: `encode(ids (B, L) long) -> (B, L, D)`, `denoise(x (B, C, h, w), t (B,),
cond (B, L, D)) -> (B, C, h, w)` and `decode(latents (B, C, h, w)) -> images (B, 3, H, W) in
[-1, 1]`, each for fixed shapes per size bucket (see `Stages`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tandem.config import SAMPLERS, DiffusionConfig, StageConfig
from tandem.errors import ConfigError

__all__ = ["SAMPLER_CLASSES", "Stages", "bucket_graphs", "check_folder", "load_stages", "make_scheduler",
           "make_unet_runtime", "stage_dtype"]

logger = logging.getLogger(__name__)

# Tandem's sampler names -> diffusers scheduler classes (by name, imported lazily).
SAMPLER_CLASSES = {"dpmpp_2m": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler",
                   "euler_a": "EulerAncestralDiscreteScheduler", "ddim": "DDIMScheduler"}
assert set(SAMPLER_CLASSES) == set(SAMPLERS)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NEEDED = ("model_index.json", "tokenizer", "text_encoder", "unet", "vae", "scheduler/scheduler_config.json")


def check_folder(folder: Path) -> None:
    """A clear ConfigError unless `folder` is an SD-layout pipeline with safetensors weights."""
    missing = [n for n in _NEEDED if not (folder / n).exists()]
    if missing:
        raise ConfigError(f"{folder}: not a Stable Diffusion pipeline folder, missing {', '.join(missing)} "
                          "(fix: point diffusion.path at a diffusers folder saved with save_pretrained)")
    for sub in ("text_encoder", "unet", "vae"):
        if not list((folder / sub).glob("*.safetensors")):
            raise ConfigError(f"{folder / sub}: no .safetensors weights (Tandem never loads pickled .bin files; "
                              "fix: re-save with save_pretrained(..., safe_serialization=True))")


def stage_device(stage: StageConfig, entry_device: str) -> str:
    return entry_device if stage.device == "auto" else stage.device


def stage_dtype(stage: StageConfig, device: str) -> torch.dtype:
    """bf16 on CUDA and fp32 on CPU unless the stage names a dtype."""
    if stage.dtype != "auto":
        return _DTYPES[stage.dtype]
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def make_scheduler(config: dict[str, Any], sampler: str) -> Any:
    """A fresh scheduler of `sampler`'s class from the folder's scheduler config (one per request)."""
    import diffusers

    return getattr(diffusers, SAMPLER_CLASSES[sampler]).from_config(config)


def step_kwargs(scheduler: Any, generator: torch.Generator) -> dict[str, Any]:
    """What `scheduler.step` takes besides the sample, as StableDiffusionPipeline passes it (eta 0)."""
    params = inspect.signature(scheduler.step).parameters
    kw: dict[str, Any] = {}
    if "eta" in params:
        kw["eta"] = 0.0
    if "generator" in params:
        kw["generator"] = generator
    return kw


@dataclass
class Stages:
    """The worker's sub-models: text encoder, UNet and VAE, each on its own device and dtype."""

    text_encoder: Any
    unet: Any
    vae: Any
    scheduler_config: dict[str, Any]
    devices: dict[str, str]
    dtypes: dict[str, torch.dtype]
    use_attention_mask: bool
    # (h, w) of the latents -> the UNet on another runtime (onnxruntime/openvino), else eager torch
    unet_runtimes: dict[tuple[int, int], Any] = field(default_factory=dict)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def scale_factor(self) -> int:
        """Pixels per latent cell: 2 ** (VAE blocks - 1), as StableDiffusionPipeline computes it."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def guidance_embedding(self) -> bool:
        return self.unet.config.time_cond_proj_dim is not None

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for m in (self.text_encoder, self.unet, self.vae)
                   for p in m.parameters())

    @torch.inference_mode()
    def encode(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) with real lengths (B,) -> text embeddings (B, L, D) on the UNet's device and dtype."""
        dev = self.devices["text_encoder"]
        mask = None
        if self.use_attention_mask:  # as the stock pipeline: the tokenizer's mask, only where the config asks
            mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long().to(dev)
        out = self.text_encoder(ids.to(dev), attention_mask=mask)[0]
        return out.to(self.devices["unet"], self.dtypes["unet"])

    @torch.inference_mode()
    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """One UNet call: x (B, C, h, w), per-row timesteps t (B,), cond (B, L, D) -> predicted noise."""
        runtime = self.unet_runtimes.get((x.shape[-2], x.shape[-1]))
        if runtime is not None:
            return runtime(x, t, cond)
        return self.unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, H, W, 3) uint8 on the CPU, as the stock pipeline rounds them."""
        z = latents.to(self.devices["vae"], self.dtypes["vae"]) / self.vae.config.scaling_factor
        image = self.vae.decode(z, return_dict=False)[0]
        image = (image.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu()
        return (image * 255).round().to(torch.uint8)


def _load(cls: Any, folder: Path, device: str, dtype: torch.dtype, stage: StageConfig) -> Any:
    model = cls.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True).to(device).eval()
    if stage.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def load_stages(folder: Path, cfg: DiffusionConfig, entry_device: str) -> Stages:
    """Load text encoder, UNet and VAE of `folder` per their stage settings (CUDA: SDPA is diffusers' default)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    check_folder(folder)
    settings = {"text_encoder": cfg.text_encoder, "unet": cfg.unet, "vae": cfg.vae}
    devices = {k: stage_device(s, entry_device) for k, s in settings.items()}
    dtypes = {k: stage_dtype(s, devices[k]) for k, s in settings.items()}
    te = _load(CLIPTextModel, folder / "text_encoder", devices["text_encoder"], dtypes["text_encoder"],
               cfg.text_encoder)
    unet = _load(UNet2DConditionModel, folder / "unet", devices["unet"], dtypes["unet"], cfg.unet)
    vae = _load(AutoencoderKL, folder / "vae", devices["vae"], dtypes["vae"], cfg.vae)
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    if cfg.unet.compile:
        unet.forward = torch.compile(unet.forward, dynamic=False, fullgraph=False)
    if cfg.vae.compile:
        vae.decode = torch.compile(vae.decode, dynamic=False)
    stages = Stages(te, unet, vae, sched, devices, dtypes, bool(getattr(te.config, "use_attention_mask", False)))
    if cfg.unet.runtime != "torch" and devices["unet"].startswith("cuda"):
        logger.warning("unet.runtime %s runs on the CPU only; on %s the UNet runs on torch", cfg.unet.runtime,
                       devices["unet"])
    elif cfg.unet.runtime != "torch":
        stages.unet_runtimes = unet_runtimes(stages, cfg, folder)
    return stages


def _weights_key(folder: Path) -> str:
    """A short digest of the UNet's config and weights (size, head and tail of each file): the cache key."""
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for f in sorted(folder.glob("*.safetensors")):
        with f.open("rb") as fh:
            h.update(str(f.stat().st_size).encode() + fh.read(1 << 20))
            fh.seek(max(0, f.stat().st_size - (1 << 20)))
            h.update(fh.read())
    return h.hexdigest()[:16]


def bucket_graphs(stages: Stages, cfg: DiffusionConfig, folder: Path) -> dict[tuple[int, int], Path]:
    """(h, w) of the latents -> the UNet exported to ONNX for that size bucket, once (cached under TANDEM_CACHE_DIR)."""
    from tandem.diffusion import runtimes
    from tandem.envs import cache_dir

    key, f = _weights_key(folder / "unet"), stages.scale_factor
    text = (2, stages.text_encoder.config.max_position_embeddings, stages.unet.config.cross_attention_dim)
    out: dict[tuple[int, int], Path] = {}
    for w, h in cfg.buckets():
        path = Path(cache_dir()) / "diffusion" / f"unet-{key}-{h // f}x{w // f}.onnx"
        if not path.exists():  # export beside, then rename: replicas starting together never read a partial file
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            runtimes.export_unet_onnx(stages.unet, tmp, (2, stages.latent_channels, h // f, w // f), text,
                                      dynamo=False)
            tmp.replace(path)
        out[(h // f, w // f)] = path
    return out


def make_unet_runtime(runtime: str, graph: Path, threads: int | None = None) -> Any:
    """The UNet of `graph` on `runtime` ("onnxruntime" or "openvino", fp32), called like `Stages.denoise`.

    ONNX Runtime's pool threads do not spin: in a worker they share the CPUs with the VAE-decode thread
    and the fronts, and spinning cost c=8 throughput (BENCHMARKS.md: 1.10x median by latency without it,
    3 interleaved rounds, sd-shaped on 2 CPUs; the same 44 ms per 2-row call alone).
    """
    from tandem.diffusion import runtimes

    if runtime == "onnxruntime":
        return runtimes.OnnxUNet(graph, threads=threads, spinning=False)
    if runtime == "openvino":
        return runtimes.OpenVinoUNet(graph, precision="f32", threads=threads, static_batch=True)
    raise ValueError(f"unknown UNet runtime {runtime!r} (onnxruntime or openvino)")


def unet_runtimes(stages: Stages, cfg: DiffusionConfig, folder: Path) -> dict[tuple[int, int], Any]:
    """The UNet on onnxruntime/openvino per size bucket, from the cached ONNX exports."""
    out: dict[tuple[int, int], Any] = {}
    for latent, graph in bucket_graphs(stages, cfg, folder).items():
        logger.info("UNet %dx%d latents on %s from %s", latent[1], latent[0], cfg.unet.runtime, graph)
        out[latent] = make_unet_runtime(cfg.unet.runtime, graph)
    return out
