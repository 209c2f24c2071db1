"""The load generator's rates and time bounds against a local server (timing bands: marked slow).

The unit tier checks what `tandem bench` counts; this one checks that it keeps the rate and time it
was asked for, with broad bands because load generators share noisy machines.
"""
# ruff: noqa: F811  (pytest injects the imported fixture `server` by parameter name)

from __future__ import annotations

import time

import pytest

from tandem.bench import run_load_sync
from tests.unit.test_loadgen import quick, server  # noqa: F401

pytestmark = pytest.mark.slow


def test_closed_loop_rate_is_bounded_by_the_handler(server: str) -> None:
    r = run_load_sync(f"{server}/sleep", b"{}", concurrency=4, duration_s=1.0, warmup_s=0.3)
    # 4 connections x 20 ms handler -> at most ~200 req/s; noisy machines get a broad band.
    assert 50 <= r.qps <= 4 / 0.02 * 1.1
    assert 0.5 * r.requests <= r.qps * r.duration_s <= r.requests + 4
    assert r.p50_ms <= r.mean_ms * 2


def test_timeouts_bound_the_run(server: str) -> None:
    start = time.monotonic()
    quick(f"{server}/slow", timeout_s=0.2, duration_s=0.4)
    assert time.monotonic() - start < 3.0


def test_open_loop_respects_rate(server: str) -> None:
    r = run_load_sync(f"{server}/ok", b"{}", rate=100, duration_s=1.0, warmup_s=0.2)
    assert (r.mode, r.rate, r.concurrency) == ("open", 100, None)
    assert r.errors == 0
    assert 80 <= r.requests <= 101
    assert 60 <= r.qps <= 110


def test_open_loop_poisson(server: str) -> None:
    r = run_load_sync(f"{server}/ok", b"{}", rate=200, duration_s=0.5, warmup_s=0.0,
                      arrival="poisson")
    assert r.errors == 0 and 50 <= r.requests <= 160


def test_open_loop_drops_instead_of_queueing(server: str) -> None:
    start = time.monotonic()
    r = run_load_sync(f"{server}/slow", b"{}", rate=100, duration_s=0.5, warmup_s=0.0,
                      timeout_s=0.3, max_connections=4)
    assert time.monotonic() - start < 3.0
    assert r.requests >= 40 and r.errors == r.requests and set(r.status_counts) == {0}


