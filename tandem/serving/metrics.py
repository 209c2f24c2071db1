"""Prometheus metrics, correct across processes (prometheus_client multiprocess mode).

The supervisor sets PROMETHEUS_MULTIPROC_DIR before it spawns anything; every process then writes
its samples to files there and `/metrics` (served by any front) aggregates them all. Kinds add
their own metric families next to their code (e.g. `tandem/llm/metrics.py`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from typing import Any

__all__ = ["LATENCY_BUCKETS", "Metrics", "metrics", "mark_dead", "render"]

LATENCY_BUCKETS = _LAT = (.001, .0025, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10, 30)
_BATCH = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256)


@dataclass(frozen=True)
class Metrics:
    requests: Any
    failures: Any
    latency: Any
    queue_time: Any
    preprocess_time: Any
    predict_time: Any
    postprocess_time: Any
    batch_size: Any
    in_flight: Any
    restarts: Any


@cache
def metrics() -> Metrics:
    """The process's metric objects (created on first use, after the multiprocess dir is set)."""
    from prometheus_client import Counter, Gauge, Histogram

    m = ("model",)
    return Metrics(
        requests=Counter("tandem_requests", "Requests answered", ["model", "endpoint", "status"]),
        failures=Counter("tandem_request_failures", "Requests answered with a 4xx/5xx", ["model", "status"]),
        latency=Histogram("tandem_request_latency_seconds", "End-to-end latency in the front", m, buckets=_LAT),
        queue_time=Histogram("tandem_queue_seconds", "Time from dispatch to batch start", m, buckets=_LAT),
        preprocess_time=Histogram("tandem_preprocess_seconds", "preprocess() time", m, buckets=_LAT),
        predict_time=Histogram("tandem_predict_seconds", "predict() time per batch", m, buckets=_LAT),
        postprocess_time=Histogram("tandem_postprocess_seconds", "postprocess() time", m, buckets=_LAT),
        batch_size=Histogram("tandem_batch_size", "Rows per predict() call", m, buckets=_BATCH),
        in_flight=Gauge("tandem_in_flight", "Requests being handled", m, multiprocess_mode="livesum"),
        restarts=Counter("tandem_worker_restarts", "Worker processes restarted", ["role", "model"]),
    )


def render() -> tuple[bytes, str]:
    """Aggregate every process's samples into the Prometheus text format."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:  # single process (tests): the default registry
        from prometheus_client import REGISTRY

        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST


def mark_dead(pid: int) -> None:
    """Drop a dead process's live gauges so in-flight does not count ghosts."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
