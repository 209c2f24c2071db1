"""Random-weight pipelines in the Stable Diffusion layout, for tests and benchmarks (no download).

`make_random_pipeline(folder, shape)` writes a folder that stock `StableDiffusionPipeline` and
Tandem both load: a character-level CLIP tokenizer, a CLIP text encoder, a UNet2DConditionModel
and an AutoencoderKL of the given widths, and a DPMSolverMultistep scheduler config as SD 2.1
ships it. `TINY` runs in milliseconds; `SD_SHAPED` is a Stable-Diffusion-shaped UNet scaled down
so that, as on real SD, the UNet dominates the request's time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["SD_SHAPED", "TINY", "PipelineShape", "make_random_pipeline"]


@dataclass(frozen=True)
class PipelineShape:
    unet_channels: tuple[int, ...]
    vae_channels: tuple[int, ...]
    text_hidden: int = 32
    text_layers: int = 2
    latent_channels: int = 4
    layers_per_block: int = 1
    attention_head_dim: int = 8
    max_length: int = 16
    sample_size: int = 64  # pixels


TINY = PipelineShape(unet_channels=(32, 64), vae_channels=(32, 32))
SD_SHAPED = PipelineShape(unet_channels=(64, 128, 256, 256), vae_channels=(32, 64, 64, 64), text_hidden=128,
                          text_layers=4, layers_per_block=2, attention_head_dim=8, max_length=77, sample_size=256)

_SCHEDULER = {"_class_name": "DPMSolverMultistepScheduler", "beta_start": 0.00085, "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
              "set_alpha_to_one": False, "steps_offset": 1, "skip_prk_steps": True, "clip_sample": False,
              "timestep_spacing": "leading", "algorithm_type": "dpmsolver++", "solver_order": 2}


def _byte_chars() -> list[str]:
    """The 256 printable characters byte-level BPE uses for bytes (GPT-2's reversible byte map)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _tokenizer(folder: Path, max_length: int) -> None:
    """A character-level CLIP BPE vocabulary (no merges): every byte, alone and as a word end."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    tok.save_pretrained(folder)


def make_random_pipeline(folder: Path, shape: PipelineShape = TINY, seed: int = 0) -> Path:
    """Write a random-weight SD-layout pipeline to `folder` (safetensors) and return it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    _tokenizer(folder / "tokenizer", shape.max_length)
    vocab = len(json.loads((folder / "tokenizer" / "vocab.json").read_text()))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=shape.text_hidden,
                                        intermediate_size=shape.text_hidden * 2, num_hidden_layers=shape.text_layers,
                                        num_attention_heads=4, max_position_embeddings=shape.max_length,
                                        bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1))
    n = len(shape.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=shape.sample_size // 2 ** (len(shape.vae_channels) - 1), in_channels=shape.latent_channels,
        out_channels=shape.latent_channels, block_out_channels=shape.unet_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        layers_per_block=shape.layers_per_block, cross_attention_dim=shape.text_hidden,
        attention_head_dim=shape.attention_head_dim, norm_num_groups=min(32, shape.unet_channels[0]))
    m = len(shape.vae_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=shape.latent_channels,
                        block_out_channels=shape.vae_channels, down_block_types=("DownEncoderBlock2D",) * m,
                        up_block_types=("UpDecoderBlock2D",) * m, norm_num_groups=min(32, shape.vae_channels[0]),
                        sample_size=shape.sample_size)
    models: dict[str, Any] = {"text_encoder": text, "unet": unet, "vae": vae}
    for name, model in models.items():
        model.save_pretrained(folder / name, safe_serialization=True)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(_SCHEDULER, indent=1))
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
             "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
             "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder
