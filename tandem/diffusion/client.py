"""Front side of a diffusion entry: validation, tokenization, replica sockets, one `ImageJob` per request.

    DiffusionClient.start(ImageRequest) ──Txt2Img──▶ UNet worker
    ImageJob.events()  ◀── ImageEvents (queued / step + preview) ... Images (routed here by the Router)

`start` returns after the first event (queue position, first step, or an error), so a request the
worker refuses becomes a proper 4xx/503 before any stream begins. A job closed early (client gone)
sends `CancelImage`, which frees its rows at the worker's next iteration.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq.asyncio

from tandem.config import SAMPLERS, DiffusionConfig
from tandem.diffusion.messages import CancelImage, ImageEvent, ImageEvents, ImageParams, Images, Txt2Img
from tandem.diffusion.metrics import diffusion_metrics
from tandem.diffusion.text import PromptTokenizer, invalid
from tandem.errors import ErrorKind, RequestTimeout, error_for
from tandem.serving.layout import RunLayout
from tandem.serving.messages import encoder
from tandem.serving.replicas import ReplicaSet, next_request_id
from tandem.serving.repository import ModelEntry

__all__ = ["DiffusionClient", "ImageJob", "ImageRequest", "Validator", "pixels_of"]

_MAX_PROMPT_CHARS = 4096  # before tokenizing: the token limit is the real one, this bounds the work


@dataclass
class ImageRequest:
    """A text-to-image request as every protocol parses it; None takes the model's default.

    `names` maps these fields to the protocol's own names (A1111's `cfg_scale`, OpenAI's `size`) so
    errors name the field the client sent.
    """

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    sampler: str | None = None
    seed: int | None = None  # None or -1: a random seed, reported back
    n: int = 1
    preview: bool = False
    names: dict[str, str] = field(default_factory=dict)

    def name(self, key: str) -> str:
        return self.names.get(key, key)


@dataclass
class ImageJob:
    """One running request: iterate `events()` (ImageEvent ... Images), or await `result()`; then `close()`."""

    client: DiffusionClient
    req_id: int
    replica: int
    params: ImageParams
    queue: asyncio.Queue[ImageEvent | Images] = field(default_factory=asyncio.Queue)
    first: ImageEvent | Images | None = None
    done: bool = False
    started: float = field(default_factory=time.perf_counter)

    async def _next(self) -> ImageEvent | Images:
        if self.first is not None:
            item, self.first = self.first, None
        else:
            try:
                item = await asyncio.wait_for(self.queue.get(), self.client.timeout_s)
            except TimeoutError:
                raise RequestTimeout(f"no progress from {self.client.key} within {self.client.timeout_s} s "
                                     "(timeout_s in tandem.yaml)") from None
        if isinstance(item, ImageEvent) and item.kind == "error":
            self.done = True
            raise error_for(item.error_kind or ErrorKind.INTERNAL, item.error)
        return item

    async def events(self) -> AsyncIterator[ImageEvent | Images]:
        while not self.done:
            item = await self._next()
            self.done = isinstance(item, Images)
            yield item

    async def result(self) -> Images:
        async for item in self.events():
            if isinstance(item, Images):
                return item
        raise RuntimeError("the job ended without images")  # unreachable: events() ends only on Images

    async def close(self) -> None:
        self.client.forget(self)
        if not self.done:
            self.done = True
            await self.client.replicas.send(self.replica, encoder.encode(CancelImage(req_id=self.req_id)))


class Validator:
    """A diffusion entry's request checks (sizes, steps, guidance, sampler, seed, images, prompt length)."""

    def __init__(self, cfg: DiffusionConfig, tokenizer: PromptTokenizer, name: str) -> None:
        self.cfg, self.tokenizer, self.name = cfg, tokenizer, name

    def params(self, req: ImageRequest) -> ImageParams:
        """The request's parameters checked against this model's settings; 400 naming the field otherwise."""
        return ImageParams(*self._size(req), steps=self._steps(req), guidance=self._guidance(req),
                           sampler=self._sampler(req), seed=self._seed(req), n=self._n(req), preview=req.preview,
                           progress=req.preview)  # streamed requests show every step

    def _size(self, req: ImageRequest) -> tuple[int, int]:
        buckets = self.cfg.buckets()
        w, h = req.width or buckets[0][0], req.height or buckets[0][1]
        if (w, h) not in buckets:
            allowed = ", ".join(f"{bw}x{bh}" for bw, bh in buckets)
            raise invalid(req.name("size"), f"{req.name('size')}: {w}x{h} is not served by {self.name}; sizes: "
                                            f"{allowed}")
        return w, h

    def _steps(self, req: ImageRequest) -> int:
        c, steps = self.cfg, req.steps if req.steps is not None else self.cfg.default_steps
        if not c.min_steps <= steps <= c.max_steps:
            raise invalid(req.name("steps"), f"{req.name('steps')} must be between {c.min_steps} and {c.max_steps}; "
                                             f"got {steps}")
        return steps

    def _guidance(self, req: ImageRequest) -> float:
        g = req.guidance if req.guidance is not None else self.cfg.default_guidance
        if not 0.0 <= g <= self.cfg.max_guidance:
            raise invalid(req.name("guidance"), f"{req.name('guidance')} must be between 0 and "
                                                f"{self.cfg.max_guidance:g}; got {g:g}")
        return g

    def _sampler(self, req: ImageRequest) -> str:
        sampler = req.sampler or self.cfg.scheduler
        if sampler not in SAMPLERS:
            raise invalid(req.name("sampler"), f"{req.name('sampler')}: unknown sampler {sampler!r}; samplers: "
                                               f"{', '.join(SAMPLERS)}")
        return sampler

    def _seed(self, req: ImageRequest) -> int:
        if req.seed is None or req.seed == -1:
            return secrets.randbelow(2**32)
        if not 0 <= req.seed < 2**63:
            raise invalid(req.name("seed"), f"{req.name('seed')} must be -1 (random) or in [0, 2**63); got {req.seed}")
        return req.seed

    def _n(self, req: ImageRequest) -> int:
        rows_each = 2 if (req.guidance if req.guidance is not None else self.cfg.default_guidance) > 1 else 1
        most = min(self.cfg.max_images, max(1, self.cfg.max_batch_rows // rows_each))
        if not 1 <= req.n <= most:
            raise invalid(req.name("n"), f"{req.name('n')} must be between 1 and {most} for {self.name}; got {req.n}")
        return req.n

    def tokens(self, req: ImageRequest) -> tuple[tuple[list[int], int], tuple[list[int], int]]:
        for key, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt)):
            if len(text) > _MAX_PROMPT_CHARS:
                raise invalid(req.name(key), f"{req.name(key)} is {len(text)} characters; at most "
                                             f"{self.tokenizer.max_length} tokens are read")
        return (self.tokenizer.encode(req.prompt, req.name("prompt"), allow_empty=False),
                self.tokenizer.encode(req.negative_prompt, req.name("negative_prompt")))


class DiffusionClient:
    """Per-front connection to the replicas of one diffusion entry (the kind's `FrontClient`)."""

    kind = "diffusion"

    def __init__(self, entry: ModelEntry, ctx: zmq.asyncio.Context, layout: RunLayout, front: int) -> None:
        cfg = entry.config.diffusion
        assert cfg is not None
        self.entry, self.cfg, self.front = entry, cfg, front
        self.key, self.name = entry.key, entry.config.name
        self.validator = Validator(cfg, PromptTokenizer(cfg.pipeline_dir(entry.config.path)), self.name)
        self.timeout_s = entry.config.timeout_s
        endpoints = [layout.task_endpoint(entry.index, r) for r in range(entry.config.instances)]
        self.replicas = ReplicaSet(ctx, endpoints, entry.key)
        self.jobs: dict[int, ImageJob] = {}

    @property
    def ready(self) -> bool:
        return self.replicas.ready

    @property
    def in_flight(self) -> int:
        return len(self.jobs)

    async def close(self) -> None:
        """Nothing to release: the router destroys the sockets with its context."""

    # -- requests ----------------------------------------------------------------------------------
    def validate(self, req: ImageRequest) -> ImageParams:
        return self.validator.params(req)

    async def start(self, req: ImageRequest) -> ImageJob:
        """Validate, send, and wait for the first event; raises the mapped error if the worker refuses."""
        params = self.validator.params(req)
        (cond, cond_len), (uncond, uncond_len) = self.validator.tokens(req)
        replica = self.replicas.pick()
        job = ImageJob(self, next_request_id(), replica, params)
        self.jobs[job.req_id] = job
        self.replicas.outstanding[replica] += 1
        try:
            msg = Txt2Img(req_id=job.req_id, front=self.front, cond=cond, uncond=uncond, cond_len=cond_len,
                          uncond_len=uncond_len, params=params)
            await self.replicas.send(replica, encoder.encode(msg))
            job.first = await job._next()
        except BaseException:
            await job.close()
            raise
        return job

    def forget(self, job: ImageJob) -> None:
        if self.jobs.pop(job.req_id, None) is not None:
            self.replicas.outstanding[job.replica] -= 1
            diffusion_metrics().latency.labels(self.name, "endpoint").observe(time.perf_counter() - job.started)

    def on_message(self, msg: Any) -> None:
        if isinstance(msg, ImageEvents):
            for item in msg.items:
                job = self.jobs.get(item.req_id)
                if job is not None:
                    job.queue.put_nowait(item)  # bounded: at most one per step, plus heartbeats while queued
        elif isinstance(msg, Images):
            job = self.jobs.get(msg.req_id)
            if job is not None:
                diffusion_metrics().latency.labels(self.name, "model").observe(msg.timings.model_ms / 1000)
                job.queue.put_nowait(msg)

    # -- replica health ----------------------------------------------------------------------------
    def replica_down(self, replica: int) -> None:
        self.replicas.mark_down(replica)
        for job in self.jobs.values():
            if job.replica == replica:
                job.queue.put_nowait(ImageEvent(req_id=job.req_id, kind="error", error=(
                    f"diffusion worker {self.key}#{replica} died while running this request"),
                    error_kind=ErrorKind.DIED))

    def replica_up(self, replica: int) -> None:
        self.replicas.mark_up(replica)


def pixels_of(images: Images) -> np.ndarray:
    """The images' pixels as (n, H, W, 3) uint8."""
    return np.frombuffer(images.pixels, np.uint8).reshape(images.n, images.height, images.width, 3)
