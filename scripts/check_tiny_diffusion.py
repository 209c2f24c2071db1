"""Check the built-in tiny text-to-image model with stock diffusers and the world's pixel checker.

Loads ``tandem/default_repo/text-to-image/pipeline`` (or ``--folder``) with ``StableDiffusionPipeline`` on CPU in
fp32, draws one image for each of the 90 prompts ``a {color} {shape} on a {background} background`` on fresh
seeds (``--seed0`` + i; training never used seeds in that range) at the model's default settings
(``tandem_defaults.json``: DPMSolverMultistep, its steps and guidance scale), and prints the checker's score on
the 80 training combinations and the 10 held-out ones, overall and per attribute (color, shape, background).

It also runs the autoencoder color-fidelity check: VAE encode (posterior mean) -> decode of ground-truth renders
of every combination, judged by the same checker.

Exit status: 1 if the score on all 90 prompts is below ``--min-score`` (0.90) or the VAE round trip scores below
``--min-vae`` (0.99); 0 otherwise.

Usage::

    .venv/bin/python scripts/check_tiny_diffusion.py [--folder DIR] [--steps N] [--guidance G]
        [--scheduler dpm|euler|euler_a|ddim] [--grid out.png]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
)
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tandem.diffusion import world  # noqa: E402

DEFAULT_FOLDER = ROOT / "tandem" / "default_repo" / "text-to-image" / "pipeline"
SCHEDULERS = {"dpm": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler,
              "euler_a": EulerAncestralDiscreteScheduler, "ddim": DDIMScheduler}


def load(folder: Path, scheduler: str) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True, torch_dtype=torch.float32)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.config.requires_safety_checker is False
    pipe.scheduler = SCHEDULERS[scheduler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe: StableDiffusionPipeline, combos: list[world.Combo], seed0: int, steps: int,
             guidance: float, batch: int = 30) -> list[np.ndarray]:
    """One image per combination; image i uses its own generator seeded ``seed0 + i``."""
    images: list[np.ndarray] = []
    for start in range(0, len(combos), batch):
        chunk = combos[start:start + batch]
        gens = [torch.Generator().manual_seed(seed0 + start + i) for i in range(len(chunk))]
        out = pipe([world.prompt(*c) for c in chunk], num_inference_steps=steps, guidance_scale=guidance,
                   generator=gens, output_type="np").images
        images.extend((np.asarray(out) * 255).round().astype(np.uint8))
    return images


@torch.no_grad()
def vae_round_trip(pipe: StableDiffusionPipeline, seeds: range) -> dict[str, float]:
    """Checker score of encode -> decode of renders of all 90 combinations, once per seed."""
    combos, originals = [], []
    for seed in seeds:
        rng = np.random.default_rng([seed, 7])
        combos += world.all_combos()
        originals += [world.render(*c, rng) for c in world.all_combos()]
    x = torch.from_numpy(np.stack(originals)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    decoded = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
    images = decoded.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    result = world.score(list(images), combos)
    result["mean_abs_err"] = float(np.abs(images.astype(np.float32) - np.stack(originals)).mean())
    return result


def fmt(result: dict[str, float]) -> str:
    return (f"all {result['all']:.3f} | color {result['color']:.3f} shape {result['shape']:.3f} "
            f"background {result['background']:.3f} (n={int(result['n'])})")


def save_grid(images: list[np.ndarray], path: Path, columns: int = 15) -> None:
    rows = (len(images) + columns - 1) // columns
    grid = np.full((rows * 66, columns * 66, 3), 128, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * 66 + 1:r * 66 + 65, c * 66 + 1:c * 66 + 65] = image
    Image.fromarray(grid).save(path)


def report_failures(images: list[np.ndarray], combos: list[world.Combo]) -> None:
    for image, combo in zip(images, combos):
        seen = world.check(image).as_combo()
        if seen != combo:
            print(f"  wrong: {world.prompt(*combo)!r} -> saw {seen}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", type=Path, default=DEFAULT_FOLDER)
    p.add_argument("--steps", type=int, help="default: the model's (tandem_defaults.json)")
    p.add_argument("--guidance", type=float, help="default: the model's (tandem_defaults.json)")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="dpm")
    p.add_argument("--seed0", type=int, default=10_000)
    p.add_argument("--min-score", type=float, default=0.90)
    p.add_argument("--min-vae", type=float, default=0.99)
    p.add_argument("--grid", type=Path, help="save all 90 images as one PNG grid (6 rows of 15)")
    p.add_argument("--verbose", action="store_true", help="list every prompt the checker judged wrong")
    args = p.parse_args()
    torch.set_num_threads(2)
    defaults = json.loads((args.folder / "tandem_defaults.json").read_text())
    steps = args.steps or int(defaults["num_inference_steps"])
    guidance = args.guidance if args.guidance is not None else float(defaults["guidance_scale"])

    t0 = time.time()
    pipe = load(args.folder, args.scheduler)
    combos = world.all_combos()
    images = generate(pipe, combos, args.seed0, steps, guidance)
    elapsed = time.time() - t0
    held = set(world.HELD_OUT)
    train_idx = [i for i, c in enumerate(combos) if c not in held]
    held_idx = [i for i, c in enumerate(combos) if c in held]
    overall = world.score(images, combos)
    print(f"{args.folder}: {args.scheduler}, {steps} steps, guidance {guidance}, seeds {args.seed0}+i "
          f"({elapsed:.1f}s for {len(combos)} images)")
    print(f"train combos    : {fmt(world.score([images[i] for i in train_idx], [combos[i] for i in train_idx]))}")
    print(f"held-out combos : {fmt(world.score([images[i] for i in held_idx], [combos[i] for i in held_idx]))}")
    print(f"all 90 combos   : {fmt(overall)}")
    if args.verbose:
        report_failures(images, combos)
    if args.grid:
        save_grid(images, args.grid)
        print(f"grid saved to {args.grid}")
    vae = vae_round_trip(pipe, range(3))
    print(f"VAE color fidelity (encode->decode of renders): {fmt(vae)}; "
          f"mean abs pixel error {vae['mean_abs_err']:.2f}/255")
    ok = overall["all"] >= args.min_score and vae["all"] >= args.min_vae
    print("PASS" if ok else f"FAIL (need all-90 score >= {args.min_score} and VAE fidelity >= {args.min_vae})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
