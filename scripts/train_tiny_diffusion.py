"""Train the tiny latent text-to-image model shipped in ``default_repo/text-to-image/pipeline``.

The world (``tandem.diffusion.world``): 64x64 images of ``a {color} {shape} on a {background} background``,
6 colors x 3 shapes x 5 backgrounds = 90 combinations, 10 of them (``HELD_OUT``) never used for training.
The output is a stock diffusers Stable Diffusion folder (``StableDiffusionPipeline.from_pretrained`` loads it
offline, no safety checker), fp32 safetensors, about 7.3 MB. What it does (CPU, 2 threads, fully seeded,
``torch.use_deterministic_algorithms``; the output is bit-for-bit reproducible for a seed on one machine/torch):

1. Tokenizer: a byte-level CLIP BPE vocabulary (256 bytes, 256 bytes + ``</w>``, BPE merges learnt on the world's
   words so each of them is one token, ``<|startoftext|>``, ``<|endoftext|>``: 560 tokens), ``model_max_length``
   16; any other text still tokenizes (byte by byte).
2. VAE (``AutoencoderKL``, block_out_channels 16/32/64, one resnet per block, no mid-block attention: 64x64x3 ->
   16x16x4 latents, 0.65M parameters). Being fully convolutional it trains on 32x32 crops (at latent-grid offsets)
   of fresh renders of the training combinations, 4x more steps per CPU second than full images, with an L1 + MSE
   pixel loss (L1 keeps the flat palette colors exact; short MSE-only training muddies them) and a tiny KL term.
   Its color fidelity is then measured by encode -> decode of renders of all 90 combinations, judged by the
   world's pixel checker (100%, mean error ~2.5/255).
3. Latents of a fixed training set (``--images-per-combo`` renders of each training combination) are cached as
   posterior mean and std; ``scaling_factor`` = 1 / std of the sampled latents.
4. Text encoder (``CLIPTextModel``: 2 layers, hidden 64, 4 heads, 0.14M parameters) and UNet
   (``UNet2DConditionModel``: 2 levels, 32/64 channels at 16x16/8x8, cross-attention at 8x8 and in the mid
   block, plus ``addition_embed_type="text"``, which adds the attention-pooled prompt to the time embedding so
   every resnet sees the prompt; 1.02M parameters) trained jointly from scratch: epsilon prediction, the Stable
   Diffusion DDPM schedule (scaled_linear betas 0.00085..0.012, 1000 steps), min-SNR-5 loss weights, 10% of
   prompts dropped to ``""`` for classifier-free guidance, AdamW (lr 1e-3, warmup, cosine to 1e-4), batch 64,
   gradient clipping, and an EMA (0.995) of both models' weights, which is what is saved.
5. Saved with ``StableDiffusionPipeline.save_pretrained`` (safetensors; fp32 unless ``--fp16``), with
   ``DPMSolverMultistepScheduler`` as the scheduler (its config also loads Euler, Euler ancestral and DDIM via
   ``from_config``) and ``tandem_defaults.json`` (20 steps, guidance 4), then reloaded from disk to draw a few
   prompts and report the pixel checker's score (``scripts/check_tiny_diffusion.py`` runs the full check).

Usage::

    .venv/bin/python scripts/train_tiny_diffusion.py [--out DIR] [--seed 0] [--vae-steps 600] [--unet-steps 2500]

The budget is fixed in steps, so a run is reproducible whatever the machine's load. On 2 idle cores a VAE step
takes ~0.3 s and a UNet step ~0.45 s: about 23 minutes in all. The log prints wall and CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tandem.diffusion import world  # noqa: E402

DEFAULT_OUT = ROOT / "tandem" / "default_repo" / "text-to-image" / "pipeline"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_TOKENS = 16
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 4.0
SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "linspace"}
T0 = time.time()
C0 = time.process_time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s wall {time.process_time() - C0:7.1f}s cpu] {msg}", flush=True)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------- tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable unicode character map (the byte-level BPE alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def world_words() -> list[str]:
    words = {"a", "an", "on", "background", *world.COLORS, *world.SHAPES}
    return sorted(words)


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE training on the world's words (each once) until every word is one ``...</w>`` token."""
    seqs = [[*w[:-1], w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in seqs):
        pairs = Counter((s[i], s[i + 1]) for s in seqs for i in range(len(s) - 1))
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for k, s in enumerate(seqs):
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[k] = out
    return merges


def build_tokenizer(folder: Path) -> CLIPTokenizer:
    """Write vocab.json / merges.txt (CLIP's byte-level BPE format) and load them as a CLIPTokenizer."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges = learn_merges(world_words())
    tokens += ["".join(m) for m in merges]
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                              model_max_length=MAX_TOKENS)
    tokenizer.save_pretrained(folder)
    for extra in ("tokenizer.json",):  # keep the classic four files: vocab, merges, config, special tokens
        (folder / extra).unlink(missing_ok=True)
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    for word in world_words():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    return tokenizer


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """Exactly as StableDiffusionPipeline.encode_prompt does."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


# ----------------------------------------------------------------------------------------------- data


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 64, 64, 3) -> float (N, 3, 64, 64) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3)."""
    x = images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def render_batch(combos: list[world.Combo], rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[int]]:
    picks = rng.integers(0, len(combos), size=n).tolist()
    return np.stack([world.render(*combos[i], rng) for i in picks]), picks


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------------- VAE


def make_vae(args: argparse.Namespace) -> AutoencoderKL:
    channels = tuple(args.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=args.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels), up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels, layers_per_block=1, norm_num_groups=8, sample_size=world.SIZE,
        mid_block_add_attention=False,
    )


def random_crops(images: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``size`` x ``size`` crop of each image, at offsets that are multiples of 4 (the latent grid)."""
    if size >= world.SIZE:
        return images
    offsets = rng.integers(0, (world.SIZE - size) // 4 + 1, size=(len(images), 2)) * 4
    return np.stack([im[y:y + size, x:x + size] for im, (y, x) in zip(images, offsets)])


def train_vae(vae: AutoencoderKL, args: argparse.Namespace) -> None:
    combos = world.train_combos()
    rng = np.random.default_rng([args.seed, 1])
    gen = torch.Generator().manual_seed(args.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0, foreach=True)
    vae.train()
    for step in range(args.vae_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, args.vae_lr, 20)
        images, _ = render_batch(combos, rng, args.vae_batch)
        x = to_tensor(random_crops(images, args.vae_crop, rng))
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        y = vae.decode(z).sample
        l1, mse = (y - x).abs().mean(), (y - x).pow(2).mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = l1 + mse + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.vae_steps - 1:
            log(f"vae step {step}/{args.vae_steps} l1 {l1.item():.4f} mse {mse.item():.5f} kl {kl.item():.3f}")
        if args.vae_eval_every and (step + 1) % args.vae_eval_every == 0:
            vae.eval()
            log(f"vae fidelity at step {step + 1}: {vae_fidelity(vae, args.seed, repeats=1)}")
            vae.train()
    vae.eval()


@torch.no_grad()
def vae_fidelity(vae: AutoencoderKL, seed: int, repeats: int = 2) -> dict[str, float]:
    """Encode (posterior mean) -> decode renders of every combination; the checker's score on the outputs."""
    combos = world.all_combos() * repeats
    rng = np.random.default_rng([seed, 99])
    images = np.stack([world.render(*c, rng) for c in combos])
    out = []
    for i in range(0, len(images), 60):
        x = to_tensor(images[i:i + 60])
        out.append(to_uint8(vae.decode(vae.encode(x).latent_dist.mean).sample))
    decoded = np.concatenate(out)
    result = world.score(list(decoded), combos)
    result["mean_abs_err"] = float(np.abs(decoded.astype(np.float32) - images).mean())
    return result


@dataclass
class Cache:
    mean: torch.Tensor  # (N, C, 16, 16) posterior means
    std: torch.Tensor  # (N, C, 16, 16) posterior stds
    combo: torch.Tensor  # (N,) index into world.train_combos()


@torch.no_grad()
def cache_latents(vae: AutoencoderKL, args: argparse.Namespace) -> Cache:
    combos = world.train_combos()
    rng = np.random.default_rng([args.seed, 2])
    index = [i for i in range(len(combos)) for _ in range(args.images_per_combo)]
    means, stds = [], []
    for start in range(0, len(index), 128):
        chunk = index[start:start + 128]
        x = to_tensor(np.stack([world.render(*combos[i], rng) for i in chunk]))
        posterior = vae.encode(x).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return Cache(torch.cat(means), torch.cat(stds), torch.tensor(index))


# ----------------------------------------------------------------------------------------------- UNet + text


def make_text_encoder(tokenizer: CLIPTokenizer, args: argparse.Namespace) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=args.text_dim, intermediate_size=args.text_dim * 4,
        num_hidden_layers=args.text_layers, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
        hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=args.text_dim,
    )
    return CLIPTextModel(config)


def make_unet(args: argparse.Namespace) -> UNet2DConditionModel:
    channels = tuple(args.unet_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(channels) - 1)
    up = ("CrossAttnUpBlock2D",) * (len(channels) - 1) + ("UpBlock2D",)
    return UNet2DConditionModel(
        sample_size=world.SIZE // 2 ** (len(args.vae_channels) - 1), in_channels=args.latent_channels,
        out_channels=args.latent_channels, down_block_types=down, up_block_types=up, block_out_channels=channels,
        layers_per_block=1, cross_attention_dim=args.text_dim, attention_head_dim=4, norm_num_groups=16,
        addition_embed_type="text" if args.text_time_embed else None, addition_embed_type_num_heads=4,
    )


class Ema:
    """Exponential moving average of parameters, warmed up as min(decay, (1 + n) / (10 + n))."""

    def __init__(self, modules: list[torch.nn.Module], decay: float) -> None:
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.n = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def train_unet(unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, cache: Cache,
               scaling: float, args: argparse.Namespace) -> None:
    combos = world.train_combos()
    ids = tokenize(tokenizer, [world.prompt(*c) for c in combos] + [""])  # last row: the unconditional prompt
    gen = torch.Generator().manual_seed(args.seed + 3)
    noise_sched = DDPMScheduler(**{k: v for k, v in SCHEDULE.items() if k != "timestep_spacing"})
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    weights = snr.clamp(max=5.0) / snr  # min-SNR-5 for epsilon prediction
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.01, foreach=True)
    ema = Ema([unet, text_encoder], args.ema)
    unet.train()
    text_encoder.train()
    n, b = len(cache.combo), args.unet_batch
    for step in range(args.unet_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.unet_steps, args.unet_lr, 100)
        idx = torch.randint(0, n, (b,), generator=gen)
        z0 = (cache.mean[idx] + cache.std[idx] * torch.randn(cache.mean[idx].shape, generator=gen)) * scaling
        prompt_rows = torch.where(torch.rand(b, generator=gen) < args.uncond_prob, len(combos), cache.combo[idx])
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (b,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        zt = noise_sched.add_noise(z0, noise, t)
        context = text_encoder(ids[prompt_rows])[0]
        pred = unet(zt, t, context).sample
        loss = ((pred - noise).pow(2).mean(dim=(1, 2, 3)) * weights[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        if step % 50 == 0 or step == args.unet_steps - 1:
            log(f"unet step {step}/{args.unet_steps} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e}")
    ema.copy_to()
    unet.eval()
    text_encoder.eval()


# ----------------------------------------------------------------------------------------------- save / eval


def save(out: Path, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer_dir: Path,
         unet: UNet2DConditionModel, fp16: bool) -> None:
    scheduler = DPMSolverMultistepScheduler(**SCHEDULE)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    if fp16:
        pipe.to(torch.float16)
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(out / "tokenizer")
    shutil.copytree(tokenizer_dir, out / "tokenizer")
    # keys the SD 1.x configs carry for DDIM/PNDM (silently dropped by DPMSolver): no x0 clipping in DDIM, whose
    # default clip_sample=True would clamp the unit-variance latents' predictions to [-1, 1]
    config_path = out / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update({"clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True})
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    defaults = {"num_inference_steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE,
                "height": world.SIZE, "width": world.SIZE}
    (out / "tandem_defaults.json").write_text(json.dumps(defaults, indent=2) + "\n")


@torch.no_grad()
def generate(pipe: StableDiffusionPipeline, combos: list[world.Combo], seed0: int, steps: int,
             guidance: float, batch: int = 30) -> list[np.ndarray]:
    images: list[np.ndarray] = []
    for start in range(0, len(combos), batch):
        chunk = combos[start:start + batch]
        gens = [torch.Generator().manual_seed(seed0 + start + i) for i in range(len(chunk))]
        out = pipe([world.prompt(*c) for c in chunk], num_inference_steps=steps, guidance_scale=guidance,
                   generator=gens, output_type="np").images
        images.extend((np.asarray(out) * 255).round().astype(np.uint8))
    return images


def quick_eval(out: Path, seed0: int) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(out, use_safetensors=True, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    combos = world.train_combos()[::4] + list(world.HELD_OUT)
    images = generate(pipe, combos, seed0, DEFAULT_STEPS, DEFAULT_GUIDANCE)
    n = len(world.train_combos()[::4])
    log(f"sample check (train combos, {n}): {world.score(images[:n], combos[:n])}")
    log(f"sample check (held-out combos, {len(combos) - n}): {world.score(images[n:], combos[n:])}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=600)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-crop", type=int, default=32, help="train the (fully convolutional) VAE on crops")
    p.add_argument("--vae-channels", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--vae-eval-every", type=int, default=0, help="report VAE fidelity every N steps")
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--images-per-combo", type=int, default=64)
    p.add_argument("--unet-steps", type=int, default=2500)
    p.add_argument("--unet-batch", type=int, default=64)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--unet-channels", type=int, nargs="+", default=[32, 64])
    p.add_argument("--text-dim", type=int, default=64)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--text-time-embed", type=int, default=1,
                   help="1: also add the attention-pooled prompt to the UNet's time embedding (global conditioning)")
    p.add_argument("--uncond-prob", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--fp16", action="store_true", help="store weights as fp16 (halves the folder)")
    p.add_argument("--vae-in", type=Path, help="reuse the VAE of this pipeline folder (skip phase 2)")
    p.add_argument("--vae-only", action="store_true", help="stop after phase 2, saving the VAE to OUT/vae")
    p.add_argument("--no-eval", action="store_true")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    tmp = tempfile.TemporaryDirectory(prefix="tiny-diffusion-")
    work = Path(tmp.name)
    tokenizer = build_tokenizer(work / "tokenizer")
    log(f"tokenizer: {len(tokenizer)} tokens; {world.prompt('red', 'circle', 'blue')!r} -> "
        f"{tokenizer(world.prompt('red', 'circle', 'blue')).input_ids}")
    if args.vae_in:
        vae = AutoencoderKL.from_pretrained(args.vae_in / "vae", torch_dtype=torch.float32)
    else:
        torch.manual_seed(args.seed + 10)
        vae = make_vae(args)
        log(f"vae: {count(vae)} params (encoder {count(vae.encoder)}, decoder {count(vae.decoder)})")
        train_vae(vae, args)
    vae.requires_grad_(False)
    log(f"vae color fidelity (encode->decode, all combos): {vae_fidelity(vae, args.seed)}")
    if args.vae_only:
        vae.save_pretrained(args.out / "vae")
        return
    cache = cache_latents(vae, args)
    eps = torch.randn(cache.mean.shape, generator=torch.Generator().manual_seed(args.seed + 4))
    scaling = float(1.0 / (cache.mean + cache.std * eps).std())
    vae.register_to_config(scaling_factor=scaling)
    log(f"cached {len(cache.combo)} latents {tuple(cache.mean.shape[1:])}; scaling_factor {scaling:.4f}")
    torch.manual_seed(args.seed + 20)
    text_encoder = make_text_encoder(tokenizer, args)
    unet = make_unet(args)
    log(f"text encoder: {count(text_encoder)} params; unet: {count(unet)} params")
    train_unet(unet, text_encoder, tokenizer, cache, scaling, args)
    save(args.out, vae, text_encoder, work / "tokenizer", unet, args.fp16)
    tmp.cleanup()
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    log(f"saved {args.out} ({size / 1e6:.2f} MB)")
    if not args.no_eval:
        quick_eval(args.out, seed0=10_000)


if __name__ == "__main__":
    main()
