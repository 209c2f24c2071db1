"""Prometheus metrics of the diffusion kind (multiprocess mode, like the core's: see serving/metrics.py).

Stages: `text_encode`, `unet_iteration`, `vae_decode` (worker) and `image_encode` (front).
`model` latency is the worker's (queue + encode + denoise + decode); `endpoint` latency is the
front's, from request to response, so the difference is what the HTTP side costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from tandem.serving.metrics import LATENCY_BUCKETS

__all__ = ["DiffusionMetrics", "diffusion_metrics"]

_LONG_BUCKETS = (*LATENCY_BUCKETS, 60.0, 120.0, 300.0)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class DiffusionMetrics:
    stage_time: Any
    rows: Any
    active: Any
    waiting: Any
    cancelled: Any
    latency: Any


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
    )
