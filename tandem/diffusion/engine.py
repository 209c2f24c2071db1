"""Step-level continuous batching of denoising: one UNet call per iteration over every active request.

Each request (`Job`) owns its scheduler instance, its seeded generator, its steps, guidance and
size. An iteration takes the active jobs of one latent size (sizes take turns), stacks their rows
(2 per image with classifier-free guidance: uncond then cond, as StableDiffusionPipeline does),
gives every row its own timestep, runs the UNet once, and steps each job's scheduler on its slice.
New jobs join at the next iteration (their text is encoded in one batched call as they join);
finished ones leave for the VAE stage. A job's result equals the stock pipeline's for its seed and
settings whether it ran alone or beside others (tests/unit/test_diffusion_engine.py).

    waiting (FIFO, bounded) ──admit: rows fit──▶ active ──all steps done──▶ finished (to decode)
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tandem.config import DiffusionConfig
from tandem.diffusion.messages import ImageParams
from tandem.diffusion.pipeline import Stages, make_scheduler, step_kwargs
from tandem.diffusion.preview import PreviewMap

__all__ = ["DenoiseEngine", "Finished", "Job", "Progress"]


@dataclass(eq=False)
class Job:
    """One request inside the engine."""

    req_id: int
    front: int
    params: ImageParams
    cond: list[int]
    uncond: list[int]
    cond_len: int = 0
    uncond_len: int = 0
    received: float = field(default_factory=time.perf_counter)
    # filled when it joins
    scheduler: Any = None
    timesteps: list[torch.Tensor] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    latents: torch.Tensor | None = None  # (n, C, h, w)
    embeds: torch.Tensor | None = None  # (rows, L, D): uncond rows then cond rows with guidance
    step: int = 0
    joined: float = 0.0
    encode_s: float = 0.0
    rows_sum: int = 0
    last_preview: float = float("-inf")
    position: int = -1
    told: float = 0.0  # when it last heard news (queue position, or a step while running)

    @property
    def cfg(self) -> bool:
        return self.params.guidance > 1.0

    @property
    def rows(self) -> int:
        return self.params.n * (2 if self.cfg else 1)

    @property
    def size(self) -> tuple[int, int]:
        return self.params.width, self.params.height


@dataclass(frozen=True)
class Progress:
    """A job's news from one iteration: queue position, a finished step (maybe with a preview)."""

    job: Job
    kind: str  # "queued" | "step"
    preview: np.ndarray | None = None  # (n, h, w, 3) uint8


@dataclass(frozen=True)
class Finished:
    """A job whose denoising is done: its final latents go to the VAE stage."""

    job: Job
    latents: torch.Tensor
    denoise_s: float


class DenoiseEngine:
    """The UNet loop's state; `step()` runs one iteration. Not thread-safe: one loop owns it."""

    def __init__(self, stages: Stages, cfg: DiffusionConfig, preview: PreviewMap | None = None,
                 pad_rows: int = 0) -> None:
        self.stages, self.cfg, self.preview = stages, cfg, preview
        self.pad_rows = pad_rows  # >0: every UNet call has this many rows (compiled stages: one shape per bucket)
        self.waiting: deque[Job] = deque()
        self.active: list[Job] = []
        self.last_rows = 0
        self.last_encode_s = 0.0  # the text-encoder call of the last iteration's joins (0: none joined)
        self._turn = 0  # which size bucket runs next when several are active

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.active)

    @property
    def active_rows(self) -> int:
        return sum(j.rows for j in self.active)

    def submit(self, job: Job) -> str | None:
        """Queue a job; an error message when the queue is full or the job can never fit."""
        if job.rows > self.cfg.max_batch_rows:
            return (f"{job.params.n} image(s) with guidance need {job.rows} UNet rows; this model runs at most "
                    f"{self.cfg.max_batch_rows} (max_batch_rows)")
        if len(self.waiting) >= self.cfg.max_waiting:
            return f"{len(self.waiting)} requests already wait (max_waiting); retry shortly"
        self.waiting.append(job)
        return None

    def cancel(self, req_id: int) -> bool:
        for queue in (self.active, self.waiting):
            for job in queue:
                if job.req_id == req_id:
                    queue.remove(job)
                    return True
        return False

    def drop_active(self) -> list[Job]:
        """Remove and return the running jobs (after a failed iteration)."""
        jobs, self.active = self.active, []
        return jobs

    def step(self, heartbeat_s: float | None = None) -> tuple[list[Progress], list[Finished]]:
        """Admit what fits, run one UNet iteration over one size group, report progress and finished jobs.

        Waiting jobs hear their queue position when it changes, and at least every `heartbeat_s`; running
        jobs hear every step, or (`params.progress` False) their first step and then one every `heartbeat_s`.
        """
        self.last_encode_s = 0.0
        news = self._admit(heartbeat_s)
        if not self.active:
            self.last_rows = 0
            return news, []
        group = self._next_group()
        self.last_rows = sum(j.rows for j in group)
        noise = self._unet(group)
        done: list[Finished] = []
        now = time.perf_counter()
        for job, eps in zip(group, noise):
            self._advance(job, eps)
            if job.params.progress or job.step == 1 or (heartbeat_s is not None and now - job.told >= heartbeat_s):
                job.told = now
                news.append(Progress(job, "step", self._maybe_preview(job, now)))
            if job.step >= len(job.timesteps):
                self.active.remove(job)
                assert job.latents is not None
                done.append(Finished(job, job.latents, now - job.joined))
        return news, done

    # -- joining -----------------------------------------------------------------------------------
    def _admit(self, heartbeat_s: float | None) -> list[Progress]:
        joining: list[Job] = []
        rows = self.active_rows
        while self.waiting and rows + self.waiting[0].rows <= self.cfg.max_batch_rows:
            job = self.waiting.popleft()
            rows += job.rows
            joining.append(job)
        if joining:
            self._join(joining)
        news = []
        now = time.perf_counter()
        for pos, job in enumerate(self.waiting):
            if job.position != pos or (heartbeat_s is not None and now - job.told >= heartbeat_s):
                job.position, job.told = pos, now
                news.append(Progress(job, "queued"))
        return news

    def _join(self, jobs: list[Job]) -> None:
        """Encode the jobs' prompts in one text-encoder call, then give each its scheduler and noise."""
        t0 = time.perf_counter()
        ids = torch.tensor([ids for j in jobs for ids in (j.uncond, j.cond)], dtype=torch.long)
        lens = torch.tensor([n for j in jobs for n in (j.uncond_len, j.cond_len)], dtype=torch.long)
        embeds = self.stages.encode(ids, lens)  # (2 * jobs, L, D)
        self.last_encode_s = time.perf_counter() - t0
        encode_s = self.last_encode_s / len(jobs)
        for i, job in enumerate(jobs):
            uncond, cond = embeds[2 * i: 2 * i + 1], embeds[2 * i + 1: 2 * i + 2]
            n = job.params.n
            job.embeds = torch.cat([uncond.repeat(n, 1, 1), cond.repeat(n, 1, 1)]) if job.cfg else cond.repeat(n, 1, 1)
            self._prepare(job)
            job.encode_s, job.joined = encode_s, time.perf_counter()
            self.active.append(job)

    def _prepare(self, job: Job) -> None:
        """Scheduler, timesteps and initial noise exactly as StableDiffusionPipeline makes them for one seed."""
        st, p = self.stages, job.params
        device, dtype = st.devices["unet"], st.dtypes["unet"]
        job.scheduler = make_scheduler(st.scheduler_config, p.sampler)
        job.scheduler.set_timesteps(p.steps, device=device)
        job.timesteps = list(job.scheduler.timesteps)
        generator = torch.Generator("cpu").manual_seed(p.seed)  # CPU noise: the same image on every device
        job.kwargs = step_kwargs(job.scheduler, generator)
        shape = (p.n, st.latent_channels, p.height // st.scale_factor, p.width // st.scale_factor)
        noise = torch.randn(shape, generator=generator, dtype=dtype)
        job.latents = noise.to(device) * job.scheduler.init_noise_sigma

    # -- one iteration -----------------------------------------------------------------------------
    def _next_group(self) -> list[Job]:
        sizes = sorted({j.size for j in self.active})
        size = sizes[self._turn % len(sizes)]
        self._turn += 1
        return [j for j in self.active if j.size == size]

    def _unet(self, group: list[Job]) -> list[torch.Tensor]:
        """One UNet call over the group's rows; each job's guided noise prediction (n, C, h, w)."""
        xs, ts = [], []
        for job in group:
            assert job.latents is not None
            t = job.timesteps[job.step]
            x = torch.cat([job.latents] * 2) if job.cfg else job.latents
            xs.append(job.scheduler.scale_model_input(x, t))
            ts.append(t.float().reshape(1).expand(x.shape[0]))
        x_all = torch.cat(xs)  # (rows, C, h, w)
        t_all = torch.cat(ts).to(x_all.device)  # (rows,): every row at its own job's step
        cond = torch.cat([j.embeds for j in group if j.embeds is not None])  # (rows, L, D)
        rows = x_all.shape[0]
        if self.pad_rows > rows:  # zero rows up to the compiled shape; their outputs are dropped
            x_all, t_all, cond = (torch.cat([a, a.new_zeros((self.pad_rows - rows, *a.shape[1:]))])
                                  for a in (x_all, t_all, cond))
        eps_all = self.stages.denoise(x_all, t_all, cond)[:rows]
        out, start = [], 0
        for job in group:
            eps = eps_all[start:start + job.rows]
            start += job.rows
            job.rows_sum += self.last_rows
            if job.cfg:
                uncond, text = eps.chunk(2)
                eps = uncond + job.params.guidance * (text - uncond)
            out.append(eps)
        return out

    def _advance(self, job: Job, eps: torch.Tensor) -> None:
        t = job.timesteps[job.step]
        job.latents = job.scheduler.step(eps, t, job.latents, **job.kwargs, return_dict=False)[0]
        job.step += 1

    def _maybe_preview(self, job: Job, now: float) -> np.ndarray | None:
        if self.preview is None or not job.params.preview:
            return None
        if (now - job.last_preview) * 1000 < self.cfg.preview_interval_ms and job.step < len(job.timesteps):
            return None
        job.last_preview = now
        assert job.latents is not None
        return self.preview.rgb(job.latents)


def run_alone(engine: DenoiseEngine, jobs: Iterable[Job]) -> dict[int, torch.Tensor]:
    """Run jobs to completion in this thread (tests, benchmarks): req_id -> decoded uint8 images (n, H, W, 3)."""
    for job in jobs:
        err = engine.submit(job)
        if err:
            raise ValueError(err)
    images: dict[int, torch.Tensor] = {}
    while engine.has_work:
        _, done = engine.step()
        for f in done:
            images[f.job.req_id] = engine.stages.decode(f.latents)
    return images
