"""Prometheus metrics of the diffusion kind (multiprocess mode, like the core's: see serving/metrics.py).

Stages: `text_encode`, `unet_iteration`, `vae_decode` (worker) and `image_encode` (front).
`model` latency is the worker's (queue + encode + denoise + decode); `endpoint` latency is the
front's, from request to response, so the difference is what the HTTP side costs.

`tandem_diffusion_vae_stall_iterations` is what decoding costs the denoising of the others: over each
stretch of UNet iterations overlapped by VAE decodes, the iterations lost (each interval between
iteration starts against the recent decode-free interval at the same row count, minus one), per decode.
At most 1.0 means a decode never cost the loop more than one iteration.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from tandem.serving.metrics import LATENCY_BUCKETS

__all__ = ["DiffusionMetrics", "StallMeter", "diffusion_metrics"]

_LONG_BUCKETS = (*LATENCY_BUCKETS, 60.0, 120.0, 300.0)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_STALL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class DiffusionMetrics:
    stage_time: Any
    rows: Any
    active: Any
    waiting: Any
    cancelled: Any
    latency: Any
    stall: Any
    unmeasured: Any


@cache
def diffusion_metrics() -> DiffusionMetrics:
    """The process's diffusion metric objects (created on first use, after the multiprocess dir is set)."""
    from prometheus_client import Counter, Gauge, Histogram

    m = ("model",)
    return DiffusionMetrics(
        stage_time=Histogram("tandem_diffusion_stage_seconds", "Time per stage call", ["model", "stage"],
                             buckets=_LONG_BUCKETS),
        rows=Histogram("tandem_diffusion_unet_rows", "UNet rows per iteration (2 per image with guidance)", m,
                       buckets=_ROW_BUCKETS),
        active=Gauge("tandem_diffusion_active", "Requests being denoised", m, multiprocess_mode="livesum"),
        waiting=Gauge("tandem_diffusion_waiting", "Requests queued for UNet rows", m, multiprocess_mode="livesum"),
        cancelled=Counter("tandem_diffusion_cancelled", "Requests cancelled (client gone)", m),
        latency=Histogram("tandem_diffusion_latency_seconds", "Request latency: model (worker) or endpoint (front)",
                          ["model", "scope"], buckets=_LONG_BUCKETS),
        stall=Histogram("tandem_diffusion_vae_stall_iterations",
                        "UNet iterations lost to VAE decoding, per decode, over each decode-overlapped stretch", m,
                        buckets=_STALL_BUCKETS),
        unmeasured=Counter("tandem_diffusion_vae_stall_unmeasured",
                           "Decode-overlapped stretches with no decode-free baseline at their row counts", m),
    )


class StallMeter:
    """Iterations the denoising loop loses to VAE decodes running beside it (the loop thread's view).

    Feed it every interval between consecutive UNet iteration starts (text encoding taken out) with its
    row count and whether a decode was in flight during it; when a stretch of such intervals ends, it
    returns the iterations lost per decode, or None (no stretch ended, or one had no baseline).
    """

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.base: dict[int, float] = {}   # rows -> EWMA of decode-free intervals (s)
        self.lost = 0.0                    # iterations lost in the open stretch
        self.measured = True               # every interval of the open stretch had a baseline
        self.start_done: int | None = None  # decodes finished when the open stretch began
        self.unmeasured = 0

    def observe(self, interval_s: float, rows: int, busy: bool, done: int) -> float | None:
        """`done`: decodes finished so far (at the interval's start when busy, at its end when not)."""
        base = self.base.get(rows)
        if busy:
            if self.start_done is None:
                self.start_done, self.lost, self.measured = done, 0.0, True
            if base is None:
                self.measured = False
            else:
                self.lost += interval_s / base - 1.0
            return None
        self.base[rows] = interval_s if base is None else base + self.alpha * (interval_s - base)
        return self.close(done)

    def close(self, done: int) -> float | None:
        """End the open stretch (all its decodes finished by `done`)."""
        if self.start_done is None:
            return None
        decodes, self.start_done = done - self.start_done, None
        if not self.measured or decodes <= 0:
            self.unmeasured += 1
            return None
        return max(0.0, self.lost) / decodes

    def reset(self) -> None:
        """The loop went idle: an open stretch cannot be measured to its end."""
        if self.start_done is not None:
            self.unmeasured += 1
        self.start_done = None
