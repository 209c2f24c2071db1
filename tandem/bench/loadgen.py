"""Low-overhead async HTTP/1.1 load generator behind `tandem bench`.

The client usually shares a few CPU cores with the server under test, so it is built to be cheap
per request: plain `asyncio` streams (on uvloop when importable), one keep-alive connection per
in-flight request, request bytes built once per body, and response heads scanned with
`bytes.find` instead of a full HTTP parser. Bodies are read (Content-Length, chunked, or
until-close) and discarded.

Two modes:

* closed loop (`concurrency=N`): N connections each send requests back to back, so the offered
  load follows the server's speed.
* open loop (`rate=R`): requests are *scheduled* R times a second whatever the server does; by
  default at a fixed interval of 1/R seconds, or with exponential (Poisson) gaps when
  `arrival="poisson"`. They go out over a pool of connections that grows on demand up to
  `max_connections`; a request that finds no free connection is dropped and counted as an error
  (status 0), so overload shows up as errors, never as unbounded client-side queueing. Latency
  is measured from the *scheduled* send time, so a client that falls behind does not hide
  server delays (no coordinated omission).

Accounting: a request belongs to the measured window when it is sent (scheduled, in open loop)
within `[warmup_s, warmup_s + duration_s)` after the start. Such requests are counted in
`requests`, `status_counts` and `errors`, and when 2xx their latency goes to `latencies_ms`;
requests still in flight when the window closes are awaited at most `timeout_s`. `qps` is the
number of 2xx responses *completed* inside the window divided by `duration_s`. A non-2xx status
is an error counted under its status; a timeout, a connection failure, a malformed response or
an open-loop drop is an error counted under status 0.

Backpressure: a 503 or 429 is also counted in `rejected`. With `honour_retry_after` (the default)
a request answered 503/429 with a `Retry-After` header is retried on its connection after that
long (capped at `max_retry_after_s`, times a random 1-1.25 so that rejected clients do not come
back in lockstep), as a well-behaved client would; each retry is a request of its own in the
counts (`retries` says how many), and the latency of the eventual success runs from the first
attempt. Without it (or without the header) the next request goes out at once. `qps` is the
goodput: successful responses per second, whatever was rejected on the way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import itertools
import logging
import math
import random
import ssl
import time
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import numpy as np

__all__ = ["MAX_CONNECTIONS", "MAX_RETRY_AFTER_S", "LoadResult", "retry_wait", "run_load", "run_load_sync"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
Arrival = Literal["fixed", "poisson"]

MAX_CONNECTIONS = 512  # open-loop pool bound
_HEAD_END = b"\r\n\r\n"
_CRLF = b"\r\n"
_READ_LIMIT = 1 << 20  # longest response head / chunk-size line accepted
_ERROR_BACKOFF_S = 0.01  # closed loop: pause after a transport error; spares a dead server
_GRACE_S = 1.0  # extra wait past end + timeout before in-flight tasks are cancelled
_BODYLESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE"})
_NO_BODY_STATUSES = frozenset({204, 304})
_RESERVED_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})
_TRANSPORT_ERRORS = (TimeoutError, OSError, EOFError, ValueError, asyncio.LimitOverrunError)
_BACKPRESSURE = frozenset({429, 503})
MAX_RETRY_AFTER_S = 10.0  # longest Retry-After honoured
_RETRY_JITTER = 0.25  # a retry waits Retry-After x uniform(1, 1 + this)


@dataclass
class LoadResult:
    """Summary of one load level: one closed-loop concurrency or one open-loop rate."""

    label: str
    mode: str  # "closed" or "open"
    concurrency: int | None
    rate: float | None
    duration_s: float
    requests: int
    errors: int
    status_counts: dict[int, int]
    qps: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    rejected: int = 0  # 503 + 429 answers (backpressure) among `requests`
    retries: int = 0  # requests that were retries after a Retry-After wait

    @property
    def goodput(self) -> float:
        """Successful responses per second (same as `qps`)."""
        return self.qps

    @property
    def load(self) -> float:
        """Offered load: the concurrency (closed loop) or the rate in requests/s (open loop)."""
        value = self.concurrency if self.mode == "closed" else self.rate
        return float(value) if value is not None else math.nan

    def row(self) -> dict[str, Any]:
        """Everything but `latencies_ms`, JSON-friendly: NaN (no successful request) -> None."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "latencies_ms":
                continue
            value = getattr(self, f.name)
            if isinstance(value, float) and math.isnan(value):
                value = None
            elif isinstance(value, dict):
                value = dict(value)
            out[f.name] = value
        return out


# --------------------------------------------------------------------------- request building


@dataclass(frozen=True)
class _Target:
    host: str
    port: int
    path: str
    host_header: str
    tls: ssl.SSLContext | None


def _parse_url(url: str) -> _Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL with a host, got {url!r}")
    tls = parts.scheme == "https"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target(
        host=parts.hostname,
        port=parts.port or (443 if tls else 80),
        path=path,
        host_header=parts.netloc.rpartition("@")[2],
        tls=ssl.create_default_context() if tls else None,
    )


def _build_request(
    target: _Target, method: str, body: bytes, content_type: str, headers: dict[str, str]
) -> bytes:
    fields: dict[str, tuple[str, str]] = {
        "host": ("Host", target.host_header),
        "user-agent": ("User-Agent", "tandem-bench"),
    }
    if body:
        fields["content-type"] = ("Content-Type", content_type)
    for name, value in headers.items():
        if name.lower() in _RESERVED_HEADERS:
            raise ValueError(f"header {name!r} is managed by the load generator")
        if any(c in name + value for c in "\r\n") or ":" in name:
            raise ValueError(f"invalid header {name!r}: {value!r}")
        fields[name.lower()] = (name, value)
    if body or method not in _BODYLESS_METHODS:
        fields["content-length"] = ("Content-Length", str(len(body)))
    lines = [f"{method} {target.path} HTTP/1.1", *(f"{n}: {v}" for n, v in fields.values())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _build_requests(
    target: _Target,
    method: str,
    bodies: bytes | Sequence[bytes],
    content_type: str,
    headers: dict[str, str] | None,
) -> list[bytes]:
    body_list = [bytes(bodies)] if isinstance(bodies, (bytes, bytearray)) else list(bodies)
    return [
        _build_request(target, method, bytes(b), content_type, headers or {})
        for b in body_list or [b""]
    ]


# --------------------------------------------------------------------------- response parsing


def _header(lower_head: bytes, name: bytes) -> bytes | None:
    """Value of header `name` (given as b"\\r\\nname:") in a lower-cased head, or None."""
    i = lower_head.find(name)
    if i < 0:
        return None
    start = i + len(name)
    return lower_head[start : lower_head.find(_CRLF, start)].strip()


def _parse_head(head: bytes) -> tuple[int, int | None, bool, bool]:
    """(status, content length, chunked?, close after?) from a response status line + headers."""
    eol = head.find(_CRLF)
    status_line = head[:eol]
    if not status_line.startswith(b"HTTP/1."):
        raise ValueError(f"not an HTTP/1.x response: {status_line[:60]!r}")
    status = int(status_line.split(None, 2)[1])
    lower = head[eol:].lower()
    encoding = _header(lower, b"\r\ntransfer-encoding:")
    chunked = encoding is not None and b"chunked" in encoding
    length = _header(lower, b"\r\ncontent-length:")
    connection = _header(lower, b"\r\nconnection:")
    if connection is not None and b"close" in connection:
        close = True
    elif connection is not None and b"keep-alive" in connection:
        close = False
    else:
        close = status_line.startswith(b"HTTP/1.0")
    return status, None if chunked or length is None else int(length), chunked, close


# --------------------------------------------------------------------------- connection


class _Conn:
    """One keep-alive HTTP/1.1 connection; (re)connects lazily."""

    __slots__ = ("_head_only", "_reader", "_target", "_writer", "retry_after")

    def __init__(self, target: _Target, head_only: bool = False) -> None:
        self._target = target
        self.retry_after: float | None = None  # seconds, from the last 503/429 answer's Retry-After
        self._head_only = head_only  # HEAD requests: responses carry no body
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        t = self._target
        self._reader, self._writer = await asyncio.open_connection(
            t.host, t.port, ssl=t.tls, limit=_READ_LIMIT
        )

    def close(self) -> None:
        """Drop the connection (not awaited: we abandon it, we do not tidy up)."""
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def exchange(self, request: bytes) -> int:
        """Send one request, read its whole response, return the status."""
        reused = self._writer is not None
        if not reused:
            await self._connect()
        try:
            head = await self._send(request)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            self.close()
            if not reused or bool(getattr(exc, "partial", b"")):
                raise
            # The server closed an idle keep-alive connection before reading: retry once.
            await self._connect()
            head = await self._send(request)
        return await self._read_rest(head)

    async def _send(self, request: bytes) -> bytes:
        assert self._writer is not None and self._reader is not None
        self._writer.write(request)
        await self._writer.drain()
        return await self._reader.readuntil(_HEAD_END)

    async def _read_rest(self, head: bytes) -> int:
        reader = self._reader
        assert reader is not None
        status, length, chunked, close = _parse_head(head)
        while 100 <= status < 200 and status != 101:  # interim responses (100 Continue, 103)
            head = await reader.readuntil(_HEAD_END)
            status, length, chunked, close = _parse_head(head)
        self.retry_after = _retry_after(head) if status in _BACKPRESSURE else None
        if status < 200:  # 101 Switching Protocols: nothing more we can speak here
            close = True
        elif self._head_only or status in _NO_BODY_STATUSES:
            pass
        elif chunked:
            await _read_chunked(reader)
        elif length is not None:
            await reader.readexactly(length)
        else:  # no framing: the body runs until the server closes
            await reader.read()
            close = True
        if close:
            self.close()
        return status


def _retry_after(head: bytes) -> float | None:
    """Seconds a response's Retry-After asks for (delta-seconds or an HTTP date), or None."""
    value = _header(head.lower(), b"\r\nretry-after:")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value.decode("latin-1"))
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def retry_wait(retry_after: float | None, cap: float = MAX_RETRY_AFTER_S,
               rng: random.Random | None = None) -> float | None:
    """How long to wait before retrying a request answered with `retry_after`; None: no header."""
    if retry_after is None:
        return None
    return min(retry_after, cap) * (1.0 + _RETRY_JITTER * (rng or random).random())


async def _pause(seconds: float) -> None:
    """The wait before a retry (a seam for tests)."""
    await asyncio.sleep(seconds)


async def _read_chunked(reader: asyncio.StreamReader) -> None:
    """Consume a chunked body, chunk extensions and trailers included."""
    while True:
        size = int((await reader.readuntil(_CRLF)).split(b";", 1)[0], 16)
        if size == 0:
            break
        await reader.readexactly(size + 2)  # data + CRLF
    while await reader.readuntil(_CRLF) != _CRLF:  # trailer fields, then the empty line
        pass


async def _timed_exchange(conn: _Conn, request: bytes, timeout_s: float) -> int:
    """`conn.exchange` bounded by `timeout_s`; transport failures are reported as status 0."""
    try:
        async with asyncio.timeout(timeout_s):
            return await conn.exchange(request)
    except _TRANSPORT_ERRORS as exc:
        conn.close()
        logger.debug("request failed: %r", exc)
        return 0


# --------------------------------------------------------------------------- accounting


class _Stats:
    """Measured-window bookkeeping (single event loop, so no locking)."""

    __slots__ = ("completed_ok", "end", "errors", "latencies", "rejected", "requests", "retries", "start",
                 "status_counts", "warm_end")

    def __init__(self, start: float, warmup_s: float, duration_s: float) -> None:
        self.start = start
        self.warm_end = start + warmup_s
        self.end = self.warm_end + duration_s
        self.latencies: list[float] = []
        self.status_counts: dict[int, int] = {}
        self.requests = 0
        self.errors = 0
        self.completed_ok = 0
        self.rejected = 0
        self.retries = 0

    def record(self, sent: float, done: float, status: int, origin: float | None = None,
               retry: bool = False) -> None:
        """Account one finished request sent at `sent`, completed at `done` (perf_counter s).

        `origin` is when its first attempt went out (latency runs from there); `retry` marks a retry.
        """
        ok = 200 <= status < 300
        if ok and self.warm_end <= done <= self.end:
            self.completed_ok += 1
        if not self.warm_end <= sent < self.end:
            return  # warm-up (or after the window): sent, not counted
        self.requests += 1
        self.retries += retry
        self.status_counts[status] = self.status_counts.get(status, 0) + 1
        if ok:
            self.latencies.append((done - (sent if origin is None else origin)) * 1000.0)
        else:
            self.errors += 1
            self.rejected += status in _BACKPRESSURE


async def _await_bounded(tasks: set[asyncio.Task[None]], deadline: float) -> None:
    """Wait for `tasks` until `deadline` (+ grace), then cancel whatever is left."""
    if not tasks:
        return
    remaining = max(0.0, deadline - time.perf_counter()) + _GRACE_S
    _, pending = await asyncio.wait(tasks, timeout=remaining)
    for task in pending:
        task.cancel()
    if pending:
        logger.warning("abandoning %d request(s) still in flight", len(pending))
        await asyncio.wait(pending)


# --------------------------------------------------------------------------- closed loop


async def _attempts(conn: _Conn, request: bytes, sent: float, stats: _Stats, timeout_s: float,
                    retry_cap: float | None) -> int:
    """Send `request` (sent at `sent`), retrying after each Retry-After while the window lasts."""
    clock, origin, retry = time.perf_counter, sent, False
    while True:
        status = await _timed_exchange(conn, request, timeout_s)
        done = clock()
        stats.record(sent, done, status, origin, retry)
        wait = retry_wait(conn.retry_after, retry_cap) if retry_cap is not None and status in _BACKPRESSURE \
            else None
        if wait is None:
            return status
        if done + wait >= stats.end:  # no retry inside the window: sit it out, do not hammer
            await _pause(stats.end - done)
            return status
        await _pause(wait)
        sent, retry = clock(), True


async def _closed_worker(
    conn: _Conn, requests: list[bytes], counter: Iterator[int], stats: _Stats, timeout_s: float,
    retry_cap: float | None = None,
) -> None:
    n = len(requests)
    clock = time.perf_counter
    try:
        while (sent := clock()) < stats.end:
            status = await _attempts(conn, requests[next(counter) % n], sent, stats, timeout_s, retry_cap)
            if status == 0:
                await asyncio.sleep(_ERROR_BACKOFF_S)
    finally:
        conn.close()


async def _run_closed(
    target: _Target, requests: list[bytes], concurrency: int, stats: _Stats, timeout_s: float,
    head_only: bool, retry_cap: float | None = None,
) -> None:
    counter = itertools.count()  # shared: bodies go round-robin across all connections
    tasks = {
        asyncio.create_task(
            _closed_worker(_Conn(target, head_only), requests, counter, stats, timeout_s, retry_cap)
        )
        for _ in range(concurrency)
    }
    await _await_bounded(tasks, stats.end + timeout_s)


# --------------------------------------------------------------------------- open loop


def _arrivals(start: float, end: float, rate: float, arrival: Arrival) -> Iterator[float]:
    """Scheduled send times in [start, end): every 1/rate s, or Poisson with mean rate."""
    if arrival == "poisson":
        rng = random.Random()
        t = start
        while t < end:
            yield t
            t += rng.expovariate(rate)
        return
    for k in itertools.count():
        t = start + k / rate
        if t >= end:
            return
        yield t


async def _open_request(
    conn: _Conn, request: bytes, scheduled: float, stats: _Stats, timeout_s: float,
    idle: list[_Conn], retry_cap: float | None = None,
) -> None:
    try:  # a retry keeps its connection while it waits
        await _attempts(conn, request, scheduled, stats, timeout_s, retry_cap)
    finally:
        idle.append(conn)


async def _run_open(
    target: _Target, requests: list[bytes], rate: float, arrival: Arrival, stats: _Stats,
    timeout_s: float, head_only: bool, max_connections: int, retry_cap: float | None = None,
) -> None:
    idle: list[_Conn] = []  # LIFO: keeps the warmest connections busy
    opened = 0
    tasks: set[asyncio.Task[None]] = set()
    for i, scheduled in enumerate(_arrivals(stats.start, stats.end, rate, arrival)):
        await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))  # always yields
        if idle:
            conn = idle.pop()
        elif opened < max_connections:
            conn, opened = _Conn(target, head_only), opened + 1
        else:
            stats.record(scheduled, scheduled, 0)  # no free connection: dropped, never queued
            continue
        request = requests[i % len(requests)]
        task = asyncio.create_task(_open_request(conn, request, scheduled, stats, timeout_s, idle,
                                                 retry_cap))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await _await_bounded(set(tasks), stats.end + timeout_s)
    for conn in idle:
        conn.close()


# --------------------------------------------------------------------------- public API


def _check_args(
    concurrency: int | None, rate: float | None, duration_s: float, warmup_s: float,
    timeout_s: float, arrival: str, max_connections: int,
) -> None:
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency (closed loop) or rate (open loop)")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if rate is not None and not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if not duration_s > 0 or not warmup_s >= 0 or not timeout_s > 0:
        raise ValueError("need duration_s > 0, warmup_s >= 0 and timeout_s > 0")
    if arrival not in ("fixed", "poisson"):
        raise ValueError(f"arrival must be 'fixed' or 'poisson', got {arrival!r}")
    if max_connections < 1:
        raise ValueError(f"max_connections must be >= 1, got {max_connections}")


def _summarize(
    stats: _Stats, label: str, concurrency: int | None, rate: float | None, duration_s: float
) -> LoadResult:
    lat = stats.latencies
    if lat:
        p50, p90, p95, p99 = (float(v) for v in np.percentile(lat, [50, 90, 95, 99]))
        mean = float(np.mean(lat))
    else:
        p50 = p90 = p95 = p99 = mean = math.nan
    return LoadResult(
        label=label, mode="closed" if concurrency is not None else "open",
        concurrency=concurrency, rate=rate, duration_s=duration_s,
        requests=stats.requests, errors=stats.errors,
        status_counts=dict(sorted(stats.status_counts.items())),
        qps=stats.completed_ok / duration_s,
        p50_ms=p50, p90_ms=p90, p95_ms=p95, p99_ms=p99, mean_ms=mean, latencies_ms=lat,
        rejected=stats.rejected, retries=stats.retries,
    )


async def run_load(
    url: str,
    bodies: bytes | list[bytes],
    *,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
    method: str = "POST",
    concurrency: int | None = None,
    rate: float | None = None,
    duration_s: float = 10.0,
    warmup_s: float = 2.0,
    timeout_s: float = 30.0,
    label: str = "",
    arrival: Arrival = "fixed",
    max_connections: int = MAX_CONNECTIONS,
    honour_retry_after: bool = True,
    max_retry_after_s: float = MAX_RETRY_AFTER_S,
) -> LoadResult:
    """Drive `url` for `warmup_s + duration_s` seconds and summarise the measured window.

    Give exactly one of `concurrency` (closed loop: that many connections sending back to
    back) or `rate` (open loop: requests/s on a fixed or Poisson `arrival` schedule, over at
    most `max_connections` connections; requests finding none free are errors). `bodies` are
    cycled round-robin. Each request is bounded by `timeout_s`, and so is the wait for requests
    in flight when the window closes. With `honour_retry_after`, a 503/429 carrying Retry-After
    is retried after that wait (at most `max_retry_after_s`, with jitter). See the module
    docstring for the exact accounting.
    """
    _check_args(concurrency, rate, duration_s, warmup_s, timeout_s, arrival, max_connections)
    if not max_retry_after_s >= 0:
        raise ValueError(f"max_retry_after_s must be >= 0, got {max_retry_after_s}")
    retry_cap = max_retry_after_s if honour_retry_after else None
    method = method.upper()
    target = _parse_url(url)
    requests = _build_requests(target, method, bodies, content_type, headers)
    head_only = method == "HEAD"
    stats = _Stats(time.perf_counter(), warmup_s, duration_s)
    if concurrency is not None:
        await _run_closed(target, requests, concurrency, stats, timeout_s, head_only, retry_cap)
    else:
        assert rate is not None
        await _run_open(target, requests, rate, arrival, stats, timeout_s, head_only,
                        max_connections, retry_cap)
    return _summarize(stats, label, concurrency, rate, duration_s)


def _run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run`, on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def run_load_sync(
    url: str,
    bodies: bytes | list[bytes],
    *,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
    method: str = "POST",
    concurrency: int | None = None,
    rate: float | None = None,
    duration_s: float = 10.0,
    warmup_s: float = 2.0,
    timeout_s: float = 30.0,
    label: str = "",
    arrival: Arrival = "fixed",
    max_connections: int = MAX_CONNECTIONS,
    honour_retry_after: bool = True,
    max_retry_after_s: float = MAX_RETRY_AFTER_S,
) -> LoadResult:
    """Blocking `run_load` on a fresh event loop (uvloop if importable); not from inside a loop."""
    return _run_coroutine(run_load(
        url, bodies, content_type=content_type, headers=headers, method=method,
        concurrency=concurrency, rate=rate, duration_s=duration_s, warmup_s=warmup_s,
        timeout_s=timeout_s, label=label, arrival=arrival, max_connections=max_connections,
        honour_retry_after=honour_retry_after, max_retry_after_s=max_retry_after_s,
    ))
