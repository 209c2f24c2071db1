"""Prometheus metrics of the LLM kind (multiprocess mode, like the core's: see serving/metrics.py)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from tandem.serving.metrics import LATENCY_BUCKETS

__all__ = ["LLMMetrics", "llm_metrics"]


@dataclass(frozen=True)
class LLMMetrics:
    llm_running: Any
    llm_waiting: Any
    llm_tokens: Any
    llm_step_time: Any
    llm_cancelled: Any
    llm_ttft: Any


@cache
def llm_metrics() -> LLMMetrics:
    """The process's LLM metric objects (created on first use, after the multiprocess dir is set)."""
    from prometheus_client import Counter, Gauge, Histogram

    m = ("model",)
    return LLMMetrics(
        llm_running=Gauge("tandem_llm_running", "Sequences in the KV cache", m, multiprocess_mode="livesum"),
        llm_waiting=Gauge("tandem_llm_waiting", "Requests queued for a KV slot", m, multiprocess_mode="livesum"),
        llm_tokens=Counter("tandem_llm_tokens", "Tokens processed", ["model", "phase"]),
        llm_step_time=Histogram("tandem_llm_step_seconds", "Engine step time", ["model", "phase"],
                                buckets=LATENCY_BUCKETS),
        llm_cancelled=Counter("tandem_llm_cancelled", "Requests cancelled (client gone or stop sequence)", m),
        llm_ttft=Histogram("tandem_llm_time_to_first_token_seconds", "From request to first token", m,
                           buckets=LATENCY_BUCKETS),
    )
