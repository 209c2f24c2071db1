"""`tandem bench` honours Retry-After: waits are checked through a fake pause, never by timing.

The server is test_loadgen.py's raw one: its flaky paths answer 503 to every other request,
`/busy` with `Retry-After: 2`, `/plain` without it.
"""
# ruff: noqa: F811  (pytest injects the imported fixture `raw` by parameter name)

from __future__ import annotations

import asyncio
import random

import pytest

from tandem.bench import loadgen
from tandem.bench.loadgen import MAX_RETRY_AFTER_S, retry_wait, run_load_sync
from tests.unit.test_loadgen import RawServer, raw  # noqa: F401


@pytest.fixture
def pauses(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record every retry wait instead of sleeping it."""
    seen: list[float] = []

    async def fake_pause(seconds: float) -> None:
        seen.append(seconds)
        await asyncio.sleep(0.001)

    monkeypatch.setattr(loadgen, "_pause", fake_pause)
    return seen


def test_retry_wait_is_capped_and_jittered_upwards() -> None:
    rng = random.Random(0)
    waits = [retry_wait(2.0, rng=rng) for _ in range(200)]
    assert all(w is not None and 2.0 <= w <= 2.5 for w in waits)
    assert len(set(waits)) > 100  # jitter: clients do not return in lockstep
    assert retry_wait(3600.0) is not None and retry_wait(3600.0) <= MAX_RETRY_AFTER_S * 1.25  # type: ignore[operator]
    assert retry_wait(None) is None


def test_retry_after_is_parsed_as_seconds_or_a_date() -> None:
    assert loadgen._retry_after(b"HTTP/1.1 503 X\r\nRetry-After: 3\r\n\r\n") == 3.0
    assert loadgen._retry_after(b"HTTP/1.1 503 X\r\nretry-after: Wed, 21 Oct 2015 07:28:00 GMT\r\n\r\n") == 0.0
    assert loadgen._retry_after(b"HTTP/1.1 503 X\r\nContent-Length: 0\r\n\r\n") is None


def test_a_503_with_retry_after_is_retried_after_the_wait(raw: RawServer, pauses: list[float]) -> None:
    # Retry-After: 2, capped at 0.05 s so that retries fall inside the short window
    r = run_load_sync(f"{raw.url}/busy", b"{}", concurrency=1, duration_s=0.3, warmup_s=0.0,
                      max_retry_after_s=0.05)
    assert r.rejected > 0 and r.retries > 0 and r.status_counts.get(200, 0) > 0
    # every wait is the capped Retry-After with upward jitter, or (near the window's end) what is left of it
    assert sum(0.05 <= p <= 0.0625 for p in pauses) >= r.retries > 0
    assert all(p <= 0.0625 for p in pauses)
    assert r.goodput == r.qps > 0
    assert r.row()["rejected"] == r.rejected


def test_not_honouring_sends_again_at_once(raw: RawServer, pauses: list[float]) -> None:
    r = run_load_sync(f"{raw.url}/busy", b"{}", concurrency=1, duration_s=0.3, warmup_s=0.0,
                      honour_retry_after=False)
    assert r.rejected > 0 and r.retries == 0 and pauses == []


def test_a_503_without_the_header_is_not_waited_on(raw: RawServer, pauses: list[float]) -> None:
    r = run_load_sync(f"{raw.url}/plain", b"{}", concurrency=1, duration_s=0.3, warmup_s=0.0)
    assert r.rejected > 0 and r.retries == 0 and pauses == []


def test_a_wait_past_the_window_sits_it_out(raw: RawServer, pauses: list[float]) -> None:
    r = run_load_sync(f"{raw.url}/busy", b"{}", concurrency=1, duration_s=0.3, warmup_s=0.0)
    assert r.rejected > 0 and r.retries == 0 and pauses and all(p <= 0.3 for p in pauses)


def test_open_loop_retries_too(raw: RawServer, pauses: list[float]) -> None:
    r = run_load_sync(f"{raw.url}/busy", b"{}", rate=50, duration_s=0.3, warmup_s=0.0, max_retry_after_s=0.05)
    assert r.rejected > 0 and r.retries > 0 and any(0.05 <= p <= 0.0625 for p in pauses)
