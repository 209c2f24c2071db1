"""UNet worker: one process per diffusion replica, running the denoising loop and the VAE stage.

    main thread:  drain Txt2Img / CancelImage ──▶ engine.step() (one UNet call) ──▶ ImageEvents per front
    decode thread: finished latents ──VAE──▶ Images (uint8) straight to the request's front

The VAE decode runs on its own thread with its own sockets, so a decode never holds the denoising
loop of the other requests (torch releases the GIL inside its kernels). Text encoding happens in
the loop as requests join, one batched call per join. When idle the loop blocks on its socket.
What decodes still cost the loop (CPU shared with the decode thread) is measured per iteration by a
StallMeter (see diffusion/metrics.py).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import zmq

from tandem.config import DiffusionConfig
from tandem.diffusion.engine import DenoiseEngine, Finished, Job, Progress
from tandem.diffusion.messages import CancelImage, ImageEvent, ImageEvents, Images, Timings, Txt2Img, worker_decoder
from tandem.diffusion.metrics import StallMeter, diffusion_metrics
from tandem.errors import ErrorKind
from tandem.serving.layout import RunLayout
from tandem.serving.messages import encoder
from tandem.serving.replicas import push_socket
from tandem.serving.repository import ModelEntry
from tandem.serving.worker_proc import run_worker

__all__ = ["build_engine", "run_diffusion_worker"]

logger = logging.getLogger(__name__)
_HEARTBEAT_S = 2.0  # a request hears news at least this often (or timeout_s / 4), which keeps fronts' timeouts


def build_engine(entry: ModelEntry, device: str) -> DenoiseEngine:
    """Load the stages of a diffusion entry, bound CUDA memory, fit the preview map, warm every bucket."""
    import torch

    from tandem.diffusion.pipeline import load_stages
    from tandem.diffusion.preview import fit_preview_map

    cfg = _cfg(entry)
    limit = entry.config.memory_limit
    if device.startswith("cuda") and limit:
        dev = torch.device(device)
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / torch.cuda.get_device_properties(dev).total_memory),
                                                   dev)
    stages = load_stages(cfg.pipeline_dir(entry.config.path), cfg, device)
    if limit and stages.nbytes() > limit:
        raise RuntimeError(f"{entry.key}: weights take {stages.nbytes() / 2**20:.0f} MiB, over memory_limit "
                           f"{limit / 2**20:.0f} MiB (fix: raise memory_limit, or bf16 stages)")
    preview = fit_preview_map(stages.vae, stages.scale_factor, stages.devices["vae"], stages.dtypes["vae"])
    engine = DenoiseEngine(stages, cfg, preview, pad_rows=cfg.max_batch_rows if cfg.unet.compile else 0)
    if entry.config.warmup:
        warm_up(engine, cfg.pipeline_dir(entry.config.path))
    logger.info("%s: text encoder on %s/%s, UNet on %s/%s, VAE on %s/%s; weights %.1f MiB; buckets %s",
                entry.key, stages.devices["text_encoder"], stages.dtypes["text_encoder"], stages.devices["unet"],
                stages.dtypes["unet"], stages.devices["vae"], stages.dtypes["vae"], stages.nbytes() / 2**20,
                ", ".join(cfg.sizes))
    return engine


def warm_up(engine: DenoiseEngine, folder: Path) -> None:
    """One 2-step request per size bucket (compiled stages capture their shapes here, not on a user)."""
    from tandem.diffusion.engine import run_alone
    from tandem.diffusion.messages import ImageParams
    from tandem.diffusion.text import PromptTokenizer

    cfg = engine.cfg
    ids, n = PromptTokenizer(folder).encode("", "prompt")
    jobs = [Job(-(i + 1), -1, ImageParams(w, h, 2, cfg.default_guidance, cfg.scheduler, 0), ids, ids, n, n)
            for i, (w, h) in enumerate(cfg.buckets())]
    run_alone(engine, jobs)


def _cfg(entry: ModelEntry) -> DiffusionConfig:
    cfg = entry.config.diffusion
    assert cfg is not None
    return cfg


class _Decoder(threading.Thread):
    """The VAE stage: decodes finished latents and sends each request's Images to its front."""

    def __init__(self, loop: _Loop) -> None:
        super().__init__(name="vae-decode", daemon=True)
        self.loop = loop
        self.jobs: queue.Queue[Finished | None] = queue.Queue()  # bounded by the engine's active rows
        self.done = 0  # decodes finished or failed (written by this thread only)

    def run(self) -> None:
        import torch

        # One intra-op thread here. A second thread with its own OpenMP team, even an idle one, made
        # every UNet call of the loop 2.5x slower on 2 CPUs (libgomp stops spinning at barriers once
        # it manages more threads than CPUs); the decode overlaps the denoising of other requests.
        torch.set_num_threads(1)
        m, name = diffusion_metrics(), self.loop.entry.config.name
        while (f := self.jobs.get()) is not None:
            job = f.job
            t0 = time.perf_counter()
            try:
                pixels = self.loop.engine.stages.decode(f.latents).numpy()  # (n, H, W, 3) uint8
            except Exception as e:  # noqa: BLE001 - one failed decode must not stop the others
                logger.exception("VAE decode failed")
                self.loop.fail_later(job, f"VAE decode failed: {type(e).__name__}: {e}")
                continue
            finally:
                self.done += 1
            decode_s = time.perf_counter() - t0
            m.stage_time.labels(name, "vae_decode").observe(decode_s)
            timings = Timings(queue_ms=(job.joined - job.received - job.encode_s) * 1000, encode_ms=job.encode_s * 1000,
                              denoise_ms=f.denoise_s * 1000, decode_ms=decode_s * 1000,
                              rows_mean=job.rows_sum / max(1, job.step))
            msg = Images(model=self.loop.entry.uid, req_id=job.req_id, width=job.params.width,
                         height=job.params.height, n=job.params.n, pixels=pixels.tobytes(), timings=timings)
            self.loop.send(job.front, encoder.encode(msg))


class _Loop:
    """The worker's message loop around one engine."""

    def __init__(self, entry: ModelEntry, engine: DenoiseEngine, layout: RunLayout, replica: int,
                 device: str) -> None:
        self.entry, self.engine, self.layout, self.device = entry, engine, layout, device
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.tasks = self.ctx.socket(zmq.PULL)
        self.tasks.bind(layout.task_endpoint(entry.index, replica))
        # One PUSH socket per front, shared by this loop and the decode thread (under `send_lock`), so that a
        # request's messages reach its front in the order they were sent: from two sockets, the front's PULL
        # fair-queues, and a request's Images could overtake its last step event (and its preview)
        self.results: dict[int, zmq.Socket[Any]] = {}
        self.send_lock = threading.Lock()
        self.failed: queue.Queue[tuple[Job, str]] = queue.Queue()
        self.decoder = _Decoder(self)
        self.stopping = False
        self.m = diffusion_metrics()
        self.stall = StallMeter()
        self.queued = 0  # decodes handed to the decode thread
        self.heartbeat_s = min(_HEARTBEAT_S, entry.config.timeout_s / 4)
        self.last: tuple[float, int, int] | None = None  # last iteration: (start less encode, rows, decodes done)

    def stop(self) -> None:
        self.stopping = True

    def fail_later(self, job: Job, error: str) -> None:
        """From the decode thread: the loop reports the error on its own socket."""
        self.failed.put((job, error))

    def run(self) -> None:
        self.decoder.start()
        while not self.stopping:
            if self.tasks.poll(0 if self.engine.has_work else 100):
                self._drain()
            while not self.failed.empty():
                job, error = self.failed.get()
                self._emit([ImageEvent(req_id=job.req_id, kind="error", error=error, error_kind=ErrorKind.FAILED)],
                           job.front)
            if self.engine.has_work:
                self._iterate()
            elif self.last is not None:
                self._clock(None)
        self.decoder.jobs.put(None)
        self.decoder.join(timeout=5)
        with self.send_lock:
            for sock in self.results.values():
                sock.close(linger=1000)  # images decoded before the stop still go out
        self.ctx.destroy(linger=0)

    def _drain(self) -> None:
        while True:
            try:
                raw = self.tasks.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            msg = worker_decoder.decode(raw)
            if isinstance(msg, Txt2Img):
                job = Job(msg.req_id, msg.front, msg.params, msg.cond, msg.uncond, msg.cond_len, msg.uncond_len)
                if (err := self.engine.submit(job)) is not None:
                    kind = ErrorKind.OVERLOADED if "max_waiting" in err else ErrorKind.INVALID
                    self._emit([ImageEvent(req_id=job.req_id, kind="error", error=err, error_kind=kind)], job.front)
            elif isinstance(msg, CancelImage) and self.engine.cancel(msg.req_id):
                self.m.cancelled.labels(self.entry.config.name).inc()
                self.m.active.labels(self.entry.config.name).set(len(self.engine.active))
                self.m.waiting.labels(self.entry.config.name).set(len(self.engine.waiting))

    def _iterate(self) -> None:
        name = self.entry.config.name
        t0 = time.perf_counter()
        self._clock(t0)
        try:
            news, done = self.engine.step(heartbeat_s=self.heartbeat_s)
        except Exception as e:  # noqa: BLE001 - fail the running requests, keep serving new ones
            logger.exception("denoising iteration failed")
            for job in self.engine.drop_active():
                self._emit([ImageEvent(req_id=job.req_id, kind="error", error=f"{type(e).__name__}: {e}",
                                       error_kind=ErrorKind.FAILED)], job.front)
            return
        if self.engine.last_encode_s:
            self.m.stage_time.labels(name, "text_encode").observe(self.engine.last_encode_s)
        if self.engine.last_rows:
            unet_s = time.perf_counter() - t0 - self.engine.last_encode_s
            self.m.stage_time.labels(name, "unet_iteration").observe(unet_s)
            self.m.rows.labels(name).observe(self.engine.last_rows)
        self.last = (t0 + self.engine.last_encode_s, self.engine.last_rows, self.decoder.done) \
            if self.engine.last_rows else None
        self.m.active.labels(name).set(len(self.engine.active))
        self.m.waiting.labels(name).set(len(self.engine.waiting))
        self._send_news(news)
        self.queued += len(done)
        for f in done:
            self.decoder.jobs.put(f)

    def _clock(self, now: float | None) -> None:
        """Give the stall meter the interval since the last iteration began (None: the loop went idle)."""
        last, self.last = self.last, None
        unmeasured, lost = self.stall.unmeasured, None
        if last is None or now is None:
            self.stall.reset()  # no interval to measure: an open stretch ends unmeasured
        else:
            start, rows, done0 = last
            busy = self.queued > done0  # a decode was pending at its start or was handed over during it
            lost = self.stall.observe(now - start, rows, busy, done0 if busy else self.decoder.done)
        name = self.entry.config.name
        if lost is not None:
            self.m.stall.labels(name).observe(lost)
        if self.stall.unmeasured != unmeasured:
            self.m.unmeasured.labels(name).inc(self.stall.unmeasured - unmeasured)

    def _send_news(self, news: list[Progress]) -> None:
        by_front: dict[int, list[ImageEvent]] = defaultdict(list)
        for p in news:
            job = p.job
            if p.kind == "queued":
                item = ImageEvent(req_id=job.req_id, kind="queued", position=job.position, steps=job.params.steps)
            else:
                preview, shape = (b"", (0, 0, 0, 0)) if p.preview is None else (p.preview.tobytes(), p.preview.shape)
                item = ImageEvent(req_id=job.req_id, kind="step", step=job.step, steps=len(job.timesteps),
                                  preview=preview, preview_shape=shape)  # type: ignore[arg-type]
            by_front[job.front].append(item)
        for front, items in by_front.items():
            self._emit(items, front)

    def _emit(self, items: list[ImageEvent], front: int) -> None:
        if front >= 0:  # < 0: warm-up jobs
            self.send(front, encoder.encode(ImageEvents(model=self.entry.uid, items=items)))

    def send(self, front: int, payload: bytes) -> None:
        """Send to a front's result socket (from the loop or the decode thread)."""
        with self.send_lock:
            sock = self.results.get(front)
            if sock is None:
                sock = self.results[front] = push_socket(self.ctx, self.layout.result_endpoint(front))
            sock.send(payload)


def run_diffusion_worker(entry: ModelEntry, replica: int, layout: RunLayout, parent_pid: int, log_level: str) -> None:
    """Process entry point (spawned by the supervisor)."""

    def build() -> _Loop:
        import torch

        torch.set_num_threads(entry.threads())
        device = entry.device()
        return _Loop(entry, build_engine(entry, device), layout, replica, device)

    run_worker(entry, replica, layout, parent_pid, log_level, "diffusion", build)
