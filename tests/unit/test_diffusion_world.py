"""The tiny text-to-image model's synthetic world (tandem.diffusion.world) and its shipped diffusers folder.

The pixel checker must score ground-truth renders of all 90 combinations perfectly and call a render of another
combination wrong on exactly the attribute that differs; the shipped folder must load with stock
``StableDiffusionPipeline`` and draw what its prompts ask for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tandem.diffusion import world

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PIPELINE = Path(__file__).resolve().parents[2] / "tandem" / "default_repo" / "text-to-image" / "pipeline"


def test_world_has_90_combinations_and_held_out_ones_are_covered_by_training() -> None:
    combos = world.all_combos()
    assert len(combos) == len(set(combos)) == 90
    assert all(c != b for c, _, b in combos)
    held, train = set(world.HELD_OUT), world.train_combos()
    assert len(held) == 10 and held <= set(combos) and len(train) == 80
    # every attribute value, and every pair of attribute values of a held-out combo, appears in training
    for i, j in ((0, 1), (0, 2), (1, 2)):
        seen = {(c[i], c[j]) for c in train}
        assert all((h[i], h[j]) in seen for h in held), (i, j)
    assert {c for c, _, _ in train} == set(world.COLORS) == {b for _, _, b in train}
    assert {s for _, s, _ in train} == set(world.SHAPES)


@pytest.mark.parametrize("seed", range(4))
def test_checker_scores_ground_truth_renders_perfectly(seed: int) -> None:
    rng = np.random.default_rng(seed)
    combos = world.all_combos()
    images = [world.render(*c, rng) for c in combos]
    assert all(im.shape == (64, 64, 3) and im.dtype == np.uint8 for im in images)
    assert world.score(images, combos) == {"n": 90.0, "all": 1.0, "color": 1.0, "shape": 1.0, "background": 1.0}


def test_renders_vary_and_stay_inside_the_image() -> None:
    rng = np.random.default_rng(0)
    bg = np.array(world.COLORS["black"])
    boxes = set()
    for _ in range(50):
        image = world.render("white", "square", "black", rng)
        mask = (image != bg).any(-1)
        assert not mask[:2].any() and not mask[-2:].any() and not mask[:, :2].any() and not mask[:, -2:].any()
        rows, cols = np.nonzero(mask)
        side = rows.max() - rows.min() + 1
        assert world.MIN_SHAPE <= side <= world.MAX_SHAPE
        boxes.add((rows.min(), cols.min(), side))
    assert len(boxes) > 40


def test_checker_rejects_wrong_images_on_the_right_attribute() -> None:
    rng = np.random.default_rng(1)
    for color, shape, background in world.all_combos():
        other_color = next(c for c in world.COLORS if c not in (color, background))
        other_shape = next(s for s in world.SHAPES if s != shape)
        other_bg = next(c for c in world.COLORS if c not in (color, background))
        v = world.check(world.render(other_color, shape, background, rng))
        assert (v.color, v.shape, v.background) == (other_color, shape, background)
        v = world.check(world.render(color, other_shape, background, rng))
        assert (v.color, v.shape, v.background) == (color, other_shape, background)
        v = world.check(world.render(color, shape, other_bg, rng))
        assert (v.color, v.shape, v.background) == (color, shape, other_bg)
    wrong = [world.render("red", "square", "blue", rng), world.render("red", "circle", "green", rng)]
    result = world.score(wrong, [("red", "circle", "blue"), ("red", "circle", "blue")])
    assert result == {"n": 2.0, "all": 0.0, "color": 1.0, "shape": 0.5, "background": 0.5}


def test_checker_on_blank_and_noisy_images() -> None:
    blank = np.zeros((64, 64, 3), dtype=np.uint8)
    assert world.check(blank) == world.Verdict(world.NONE, world.NONE, "black")
    rng = np.random.default_rng(2)
    image = world.render("yellow", "triangle", "blue", rng).astype(np.int16)
    noisy = np.clip(image + rng.integers(-60, 61, size=image.shape), 0, 255).astype(np.uint8)
    assert world.check(noisy) == world.Verdict("yellow", "triangle", "blue")


def test_prompt_round_trip() -> None:
    for combo in world.all_combos():
        assert world.parse_prompt(world.prompt(*combo)) == combo
    assert world.prompt("red", "circle", "blue") == "a red circle on a blue background"
    assert world.parse_prompt("  A Red circle on a BLUE background ") == ("red", "circle", "blue")
    for bad in ("a red circle", "a purple circle on a blue background", "a red hexagon on a blue background"):
        with pytest.raises(ValueError):
            world.parse_prompt(bad)


def test_shipped_folder_layout() -> None:
    index = json.loads((PIPELINE / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (PIPELINE / "tokenizer" / name).is_file()
    for path in ("text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"):
        assert (PIPELINE / path).is_file()
    assert not list(PIPELINE.rglob("*.bin"))
    size = sum(f.stat().st_size for f in PIPELINE.rglob("*") if f.is_file())
    assert size <= 8 * 1024 * 1024


@pytest.fixture(scope="module")
def pipe():  # type: ignore[no-untyped-def]
    diffusers = pytest.importorskip("diffusers")
    import torch

    torch.set_num_threads(2)
    pipeline = diffusers.StableDiffusionPipeline.from_pretrained(PIPELINE, use_safetensors=True,
                                                                  torch_dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_shipped_pipeline_loads_without_safety_checker(pipe) -> None:  # type: ignore[no-untyped-def]
    import diffusers

    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.config.requires_safety_checker is False
    assert isinstance(pipe.scheduler, diffusers.DPMSolverMultistepScheduler)
    for cls in (diffusers.EulerDiscreteScheduler, diffusers.EulerAncestralDiscreteScheduler,
                diffusers.DDIMScheduler):
        scheduler = cls.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(10)
        assert len(scheduler.timesteps) == 10
    plain = diffusers.StableDiffusionPipeline.from_pretrained(PIPELINE)
    assert plain.safety_checker is None
    explicit = diffusers.StableDiffusionPipeline.from_pretrained(PIPELINE, safety_checker=None)
    assert explicit.safety_checker is None


def test_shipped_vae_round_trip_keeps_colors(pipe) -> None:  # type: ignore[no-untyped-def]
    import torch

    rng = np.random.default_rng(3)
    combos = world.all_combos()
    images = np.stack([world.render(*c, rng) for c in combos])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    with torch.no_grad():
        y = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
    decoded = y.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert world.score(list(decoded), combos)["all"] == 1.0


def test_shipped_pipeline_draws_what_is_asked(pipe) -> None:  # type: ignore[no-untyped-def]
    import torch

    defaults = json.loads((PIPELINE / "tandem_defaults.json").read_text())
    combos = [("red", "circle", "white"), ("blue", "square", "yellow"), ("yellow", "triangle", "black"),
              ("green", "circle", "red")]
    gens = [torch.Generator().manual_seed(20_000 + i) for i in range(len(combos))]
    with torch.no_grad():
        out = pipe([world.prompt(*c) for c in combos], num_inference_steps=10,
                   guidance_scale=defaults["guidance_scale"], generator=gens, output_type="np").images
    images = [(np.asarray(im) * 255).round().astype(np.uint8) for im in out]
    assert [world.check(im).as_combo() for im in images] == combos
