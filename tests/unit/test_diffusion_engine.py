"""The denoising engine against stock diffusers: alone, batched with others, joined mid-flight.

Every job must give what `StableDiffusionPipeline` gives for the same seed and settings (PSNR >=
40 dB on the pixels, and its final latents within fp32 tolerance), whatever ran beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tandem.config import DiffusionConfig
from tandem.diffusion.engine import DenoiseEngine, Job, run_alone
from tandem.diffusion.messages import ImageParams
from tandem.diffusion.pipeline import SAMPLER_CLASSES, load_stages
from tandem.diffusion.preview import fit_preview_map
from tandem.diffusion.testing import make_random_pipeline
from tandem.diffusion.text import PromptTokenizer
from tests.parity import assert_close_to_reference, assert_same_image, psnr

SIZES = ["32x32", "16x16"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return make_random_pipeline(tmp_path_factory.mktemp("sd") / "pipeline")


@pytest.fixture(scope="module")
def cfg() -> DiffusionConfig:
    return DiffusionConfig(sizes=SIZES, max_batch_rows=16)


@pytest.fixture(scope="module")
def stages(folder: Path, cfg: DiffusionConfig) -> Any:
    return load_stages(folder, cfg, "cpu")


@pytest.fixture(scope="module")
def tok(folder: Path) -> PromptTokenizer:
    return PromptTokenizer(folder)


@pytest.fixture(scope="module")
def stock(folder: Path) -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


_ids = iter(range(1, 1_000_000))


def job(tok: PromptTokenizer, prompt: str, negative: str = "", **kw: Any) -> Job:
    params = {"width": 32, "height": 32, "steps": 6, "guidance": 5.0, "sampler": "dpmpp_2m", "seed": 7, **kw}
    (cond, cl), (uncond, ul) = tok.encode(prompt, "prompt"), tok.encode(negative, "negative_prompt")
    return Job(next(_ids), 0, ImageParams(**params), cond, uncond, cl, ul)


def stock_run(pipe: Any, j: Job, prompt: str, negative: str = "", output_type: str = "np") -> Any:
    import diffusers

    p = j.params
    pipe.scheduler = getattr(diffusers, SAMPLER_CLASSES[p.sampler]).from_config(pipe.scheduler.config)
    out = pipe(prompt, negative_prompt=negative or None, num_inference_steps=p.steps, guidance_scale=p.guidance,
               height=p.height, width=p.width, num_images_per_prompt=p.n,
               generator=torch.Generator().manual_seed(p.seed), output_type=output_type).images
    if output_type == "latent":
        return out
    return (np.asarray(out) * 255).round().astype(np.uint8)


def latents_of(engine: DenoiseEngine, jobs: list[Job]) -> dict[int, torch.Tensor]:
    for j in jobs:
        assert engine.submit(j) is None
    out: dict[int, torch.Tensor] = {}
    while engine.has_work:
        for f in engine.step()[1]:
            out[f.job.req_id] = f.latents
    return out


@pytest.mark.parametrize("sampler", sorted(SAMPLER_CLASSES))
def test_alone_equals_stock_pipeline(sampler: str, stages: Any, cfg: DiffusionConfig, tok: PromptTokenizer,
                                     stock: Any) -> None:
    j = job(tok, "a red circle", "blurry", sampler=sampler)
    want = stock_run(stock, j, "a red circle", "blurry")
    got = run_alone(DenoiseEngine(stages, cfg), [j])[j.req_id].numpy()
    assert_same_image(got, want, what=f"{sampler} alone vs StableDiffusionPipeline")
    j2 = job(tok, "a red circle", "blurry", sampler=sampler)
    lat = latents_of(DenoiseEngine(stages, cfg), [j2])[j2.req_id]
    assert_close_to_reference(lat, stock_run(stock, j2, "a red circle", "blurry", "latent"), "float32",
                              what=f"{sampler} final latents", atol=1e-4, rtol=1e-4)


def test_a_different_seed_is_a_different_image(stages: Any, cfg: DiffusionConfig, tok: PromptTokenizer) -> None:
    """Guard: the parity rule can fail (PSNR of unrelated images is far below 40 dB)."""
    a, b = job(tok, "a red circle", seed=1), job(tok, "a red circle", seed=2)
    images = run_alone(DenoiseEngine(stages, cfg), [a, b])
    assert psnr(images[a.req_id], images[b.req_id]) < 30


def test_batched_and_joined_mid_flight_equals_alone(stages: Any, cfg: DiffusionConfig, tok: PromptTokenizer,
                                                    stock: Any) -> None:
    """The target runs beside jobs of other samplers, steps, sizes, guidance and n, some joining later."""
    target = job(tok, "a blue square", "noise", sampler="euler_a", steps=8, seed=11)
    engine = DenoiseEngine(stages, cfg)
    early = [job(tok, "x", sampler="ddim", steps=5, seed=1, n=2), job(tok, "y", width=16, height=16, steps=4),
             job(tok, "z", guidance=1.0, steps=9, sampler="euler")]
    for j in early:
        engine.submit(j)
    engine.step()
    engine.step()  # the others are two steps in when the target joins
    late = [target, job(tok, "w", sampler="dpmpp_2m", steps=3, seed=5)]
    for j in late:
        engine.submit(j)
    images, rows_seen = {}, set()
    while engine.has_work:
        _, done = engine.step()
        rows_seen.add(engine.last_rows)
        for f in done:
            images[f.job.req_id] = stages.decode(f.latents).numpy()
    assert max(rows_seen) > target.rows, "the target never shared a UNet call"
    assert_same_image(images[target.req_id], stock_run(stock, target, "a blue square", "noise"),
                      what="batched euler_a vs StableDiffusionPipeline")
    assert_same_image(images[early[0].req_id], stock_run(stock, early[0], "x"), what="n=2 ddim batched")


def test_each_job_has_its_own_scheduler(stages: Any, cfg: DiffusionConfig, tok: PromptTokenizer) -> None:
    a, b = job(tok, "a", sampler="euler", steps=4), job(tok, "b", sampler="euler", steps=7)
    engine = DenoiseEngine(stages, cfg)
    engine.submit(a)
    engine.submit(b)
    for _ in range(4):
        engine.step()
    assert a.scheduler is not b.scheduler
    assert a.step == 4 and b.step == 4 and a not in engine.active and b in engine.active
    assert b.scheduler.step_index == 4 and len(b.timesteps) == 7


def test_guidance_rows_are_counted_and_admission_waits(stages: Any, tok: PromptTokenizer) -> None:
    engine = DenoiseEngine(stages, DiffusionConfig(sizes=SIZES, max_batch_rows=4))
    big, small, plain = job(tok, "a", n=2, steps=2), job(tok, "b", steps=2), job(tok, "c", guidance=1.0, n=2)
    assert (big.rows, small.rows, plain.rows) == (4, 2, 2)
    engine.submit(big)
    engine.submit(small)
    news, _ = engine.step()
    assert engine.last_rows == 4 and engine.active == [big]
    assert [(p.kind, p.job.position) for p in news if p.kind == "queued"] == [("queued", 0)]
    engine.step()  # big finishes
    engine.step()
    assert engine.last_rows == 2 and engine.active == [small]
    assert "max_batch_rows" in (engine.submit(job(tok, "d", n=3)) or "")


def test_cancel_frees_rows_and_queue_is_bounded(stages: Any, tok: PromptTokenizer) -> None:
    engine = DenoiseEngine(stages, DiffusionConfig(sizes=SIZES, max_batch_rows=2, max_waiting=2))
    a, b = job(tok, "a", steps=50), job(tok, "b", steps=2)
    assert engine.submit(a) is None and engine.submit(b) is None
    assert "max_waiting" in (engine.submit(job(tok, "c")) or "")
    engine.step()
    assert engine.active == [a]
    assert engine.cancel(a.req_id) and not engine.cancel(a.req_id)
    engine.step()
    assert engine.active == [b]


def test_sizes_take_turns(stages: Any, cfg: DiffusionConfig, tok: PromptTokenizer) -> None:
    engine = DenoiseEngine(stages, cfg)
    big, small = job(tok, "a", steps=3), job(tok, "b", width=16, height=16, steps=3)
    engine.submit(big)
    engine.submit(small)
    order = []
    while engine.has_work:
        before = (big.step, small.step)
        engine.step()
        order.append("big" if big.step > before[0] else "small")
    assert order == ["small", "big"] * 3  # (16, 16) sorts first


def test_padded_rows_give_the_same_result(stages: Any, cfg: DiffusionConfig, tok: PromptTokenizer) -> None:
    """Compiled stages run a fixed row count; padding must not change any job's result."""
    a, b = job(tok, "a", seed=3), job(tok, "a", seed=3)
    plain = latents_of(DenoiseEngine(stages, cfg), [a])[a.req_id]
    padded = latents_of(DenoiseEngine(stages, cfg, pad_rows=16), [b])[b.req_id]
    assert_close_to_reference(padded, plain, "float32", what="padded to 16 rows")


def test_previews_are_throttled_and_follow_the_latents(stages: Any, tok: PromptTokenizer) -> None:
    preview = fit_preview_map(stages.vae, stages.scale_factor, "cpu", torch.float32)
    cfg = DiffusionConfig(sizes=SIZES, preview_interval_ms=1e9)
    engine = DenoiseEngine(stages, cfg, preview)
    j = job(tok, "a", steps=4, n=2)
    j.params = ImageParams(**{**{f: getattr(j.params, f) for f in j.params.__struct_fields__}, "preview": True})
    engine.submit(j)
    shots = []
    while engine.has_work:
        news, _ = engine.step()
        shots += [p.preview for p in news if p.kind == "step" and p.preview is not None]
    assert len(shots) == 2  # the first step, then (throttled) only the last
    assert shots[-1].shape == (2, 16, 16, 3) and shots[-1].dtype == np.uint8
    no_preview = job(tok, "a", steps=2)
    engine.submit(no_preview)
    assert all(p.preview is None for _ in range(2) for p in engine.step()[0])


def test_unwatched_jobs_hear_their_first_step_and_heartbeats_only(stages: Any, cfg: DiffusionConfig,
                                                                 tok: PromptTokenizer) -> None:
    """A job nobody streams (progress False) is told its first step, then one step per heartbeat; same image."""
    def steps_heard(j: Job, heartbeat_s: float | None) -> tuple[list[int], torch.Tensor]:
        engine, heard, finished = DenoiseEngine(stages, cfg), [], []
        engine.submit(j)
        while engine.has_work:
            news, done = engine.step(heartbeat_s=heartbeat_s)
            heard += [p.job.step for p in news if p.kind == "step"]
            finished += done
        return heard, finished[0].latents

    watched, watched_latents = steps_heard(job(tok, "a", seed=5), None)
    assert watched == [1, 2, 3, 4, 5, 6]
    quiet, quiet_latents = steps_heard(job(tok, "a", seed=5, progress=False), None)
    assert quiet == [1]  # the first step: the front's start() returns on it
    beats, _ = steps_heard(job(tok, "a", seed=5, progress=False), 0.0)
    assert beats == [1, 2, 3, 4, 5, 6]  # a heartbeat due at every step: every step is sent
    assert torch.equal(quiet_latents, watched_latents)
