"""Load generator tests against real servers on loopback: uvicorn + Starlette, and a raw asyncio
server for the HTTP framing corner cases (chunked trailers, silent keep-alive closes, EOF bodies).

Nothing here asserts a rate or a duration (machines are noisy): those checks are in
tests/integration/test_loadgen_timing.py, marked slow.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import typer
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from typer.testing import CliRunner

from tandem.bench import LoadResult, plot_latency, run_load, run_load_sync
from tandem.bench.command import register

# --------------------------------------------------------------------------- uvicorn server

SEEN_BODIES: list[bytes] = []


async def ok(request: Request) -> Response:
    SEEN_BODIES.append(await request.body())
    return JSONResponse({"ok": True})


async def sleep20(request: Request) -> Response:
    await request.body()
    await asyncio.sleep(0.02)
    return JSONResponse({"ok": True})


async def fail(request: Request) -> Response:
    return JSONResponse({"error": "boom"}, status_code=500)


async def slow(request: Request) -> Response:
    await asyncio.sleep(1.0)
    return JSONResponse({"ok": True})


async def stream(request: Request) -> Response:
    async def parts() -> AsyncIterator[bytes]:
        for i in range(5):
            yield b"x" * (i * 1000 + 1)

    return StreamingResponse(parts(), media_type="application/octet-stream")


APP = Starlette(routes=[
    Route("/ok", ok, methods=["GET", "POST", "HEAD"]),
    Route("/sleep", sleep20, methods=["POST"]),
    Route("/fail", fail, methods=["POST"]),
    Route("/slow", slow, methods=["POST"]),
    Route("/stream", stream, methods=["POST"]),
])


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    config = uvicorn.Config(APP, host="127.0.0.1", port=0, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=1)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(5)


# --------------------------------------------------------------------------- raw asyncio server


@dataclass
class RawServer:
    """Hand-written HTTP/1.1 responses; counts the connections and requests it accepts."""

    url: str = ""
    connections: int = 0
    requests: int = 0  # over all connections: the flaky paths alternate on it
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)

    def response(self, path: str) -> bytes:
        """The canned answer to `path`; a flaky one is a 503 to every other request, else a 200."""
        if path in FLAKY_RESPONSES:
            return FLAKY_RESPONSES[path] if self.requests % 2 else FLAKY_OK
        return RAW_RESPONSES[path]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                for line in head.lower().split(b"\r\n"):
                    if line.startswith(b"content-length:"):
                        await reader.readexactly(int(line.split(b":")[1]))
                served += 1
                self.requests += 1
                writer.write(self.response(path.split("?")[0]))
                await writer.drain()
                if path == "/eof" or (path == "/close-every-2" and served % 2 == 0):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


RAW_RESPONSES = {
    "/chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"5;name=value\r\nhello\r\n1A\r\n" + b"y" * 26 + b"\r\n"
                 b"0\r\nX-Trailer: 1\r\nX-Other: 2\r\n\r\n"),
    "/close-every-2": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "/conn-close": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    "/eof": b"HTTP/1.1 200 OK\r\n\r\nbody until the connection closes",
    "/continue": (b"HTTP/1.1 100 Continue\r\n\r\n"
                  b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"),
    "/garbage": b"SMTP ready\r\n\r\n",
}
# Retry-After handling (test_loadgen_retry.py): 503s with and without the header, between 200s.
FLAKY_RESPONSES = {
    "/busy": b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\nRetry-After: 2\r\n\r\n{}",
    "/plain": b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\n{}",
}
FLAKY_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"


@pytest.fixture(scope="module")
def raw() -> Iterator[RawServer]:
    srv = RawServer()
    server = srv.loop.run_until_complete(asyncio.start_server(srv.handle, "127.0.0.1", 0))
    srv.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    thread = threading.Thread(target=srv.loop.run_forever, daemon=True)
    thread.start()
    yield srv
    srv.loop.call_soon_threadsafe(srv.loop.stop)
    thread.join(5)


def quick(url: str, **kwargs: object) -> LoadResult:
    """A short closed-loop run with small defaults."""
    opts: dict[str, object] = {"concurrency": 2, "duration_s": 0.3, "warmup_s": 0.1,
                               "timeout_s": 2.0}
    opts.update(kwargs)
    return run_load_sync(url, b'{"x": 1}', **opts)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- closed loop


def test_closed_loop_counts_requests_and_latencies(server: str) -> None:
    r = run_load_sync(f"{server}/sleep", b"{}", concurrency=4, duration_s=1.0, warmup_s=0.3,
                      label="sleep")
    assert (r.mode, r.concurrency, r.rate, r.label) == ("closed", 4, None, "sleep")
    assert r.errors == 0 and r.status_counts == {200: r.requests}
    assert len(r.latencies_ms) == r.requests
    assert min(r.latencies_ms) >= 19.0  # the handler sleeps 20 ms: a floor, not a timing band
    assert 19.0 <= r.p50_ms <= r.p90_ms <= r.p95_ms <= r.p99_ms


def test_bodies_cycle_round_robin(server: str) -> None:
    SEEN_BODIES.clear()
    r = run_load_sync(f"{server}/ok", [b'{"a": 1}', b'{"b": 2}', b'{"c": 3}'], concurrency=3,
                      duration_s=0.3, warmup_s=0.0)
    assert r.errors == 0 and r.requests > 6
    counts = {b: SEEN_BODIES.count(b) for b in set(SEEN_BODIES)}
    assert set(counts) == {b'{"a": 1}', b'{"b": 2}', b'{"c": 3}'}
    assert max(counts.values()) - min(counts.values()) <= 4


def test_get_and_head_without_body(server: str) -> None:
    for method in ("GET", "HEAD"):
        r = run_load_sync(f"{server}/ok", b"", method=method, concurrency=1, duration_s=0.2,
                          warmup_s=0.0)
        assert r.errors == 0 and r.requests > 2, method


def test_server_errors_are_counted(server: str) -> None:
    r = quick(f"{server}/fail")
    assert r.requests > 0 and r.errors == r.requests
    assert r.status_counts == {500: r.requests}
    assert r.qps == 0 and r.latencies_ms == [] and math.isnan(r.p50_ms)
    row = r.row()
    assert "latencies_ms" not in row and row["p99_ms"] is None
    json.dumps(row)


def test_timeouts_are_errors(server: str) -> None:
    r = quick(f"{server}/slow", timeout_s=0.2, duration_s=0.4)
    assert r.requests > 0 and r.errors == r.requests and set(r.status_counts) == {0}


def test_connection_refused_is_an_error(raw: RawServer) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = quick(f"http://127.0.0.1:{port}/", concurrency=1)
    assert r.requests > 0 and r.errors == r.requests and set(r.status_counts) == {0}
    assert r.requests < 0.3 / 0.01 + 5  # backs off instead of spinning


# --------------------------------------------------------------------------- HTTP framing


def test_chunked_streaming_response_keeps_connection(server: str) -> None:
    r = quick(f"{server}/stream")
    assert r.errors == 0 and r.requests > 4


@pytest.mark.parametrize("path", ["/chunked", "/close-every-2", "/conn-close", "/eof"])
def test_framing_and_reconnects(raw: RawServer, path: str) -> None:
    before = raw.connections
    # A longer window with no warm-up: a fresh loopback connect now and then waits out a 1 s SYN
    # retransmit (seen on CI); with 0.1 s of warm-up and a 0.3 s window that left nothing counted.
    r = quick(f"{raw.url}{path}", duration_s=1.5, warmup_s=0.0)
    assert r.requests > 4 and r.errors == 0, r.status_counts
    opened = raw.connections - before
    if path == "/chunked":  # keep-alive survived the chunked body, extensions and trailers
        assert opened == 2
    else:  # closes are noticed and connections re-opened
        assert opened > 2


def test_interim_and_malformed_responses(raw: RawServer) -> None:
    r = quick(f"{raw.url}/continue")
    assert r.errors == 0 and r.status_counts == {201: r.requests}
    bad = quick(f"{raw.url}/garbage")
    assert bad.requests > 0 and bad.errors == bad.requests and set(bad.status_counts) == {0}


# --------------------------------------------------------------------------- open loop


def test_open_loop_counts_and_drops(server: str) -> None:
    """Open loop: mode and counts are right; a slow server's requests time out instead of queueing."""
    r = run_load_sync(f"{server}/ok", b"{}", rate=100, duration_s=0.5, warmup_s=0.0)
    assert (r.mode, r.rate, r.concurrency) == ("open", 100, None) and r.errors == 0 and r.requests > 0
    r = run_load_sync(f"{server}/slow", b"{}", rate=100, duration_s=0.5, warmup_s=0.0,
                      timeout_s=0.3, max_connections=4)
    assert r.requests > 0 and r.errors == r.requests and set(r.status_counts) == {0}


def test_async_api_and_argument_checks(server: str) -> None:
    r = asyncio.run(run_load(f"{server}/ok", b"{}", concurrency=1, duration_s=0.2, warmup_s=0))
    assert r.requests > 0 and r.errors == 0
    with pytest.raises(ValueError, match="exactly one"):
        run_load_sync(f"{server}/ok", b"{}", concurrency=1, rate=5.0)
    with pytest.raises(ValueError, match="exactly one"):
        run_load_sync(f"{server}/ok", b"{}")
    with pytest.raises(ValueError, match="URL"):
        run_load_sync("ftp://example.com/", b"{}", concurrency=1)
    with pytest.raises(ValueError, match="managed"):
        run_load_sync(f"{server}/ok", b"{}", concurrency=1, headers={"Content-Length": "3"})


# --------------------------------------------------------------------------- plot and CLI


def _result(label: str, mode: str, load: float, p50: float) -> LoadResult:
    return LoadResult(
        label=label, mode=mode, concurrency=int(load) if mode == "closed" else None,
        rate=load if mode == "open" else None, duration_s=1.0, requests=100, errors=0,
        status_counts={200: 100}, qps=load * 10, p50_ms=p50, p90_ms=p50 * 1.5,
        p95_ms=p50 * 1.8, p99_ms=p50 * 3, mean_ms=p50 * 1.1,
    )


def test_plot_writes_png(tmp_path: Path) -> None:
    results = [_result(lbl, "closed", c, c * f) for lbl, f in (("a", 1.0), ("b", 2.0))
               for c in (1, 8, 64)]
    results += [_result("a", "open", r, 5.0) for r in (10.0, 50.0)]
    results.append(_result("a", "open", 80.0, math.nan))
    out = plot_latency(results, tmp_path / "sub" / "lat.png", title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    single = plot_latency(results[:1], tmp_path / "one.png")
    assert single.stat().st_size > 0


def _cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """Test app."""

    register(app)
    return app


def test_cli_runs_levels_and_writes_outputs(server: str, tmp_path: Path) -> None:
    body = tmp_path / "body.json"
    body.write_text('{"x": 1}')
    png, out = tmp_path / "lat.png", tmp_path / "res.json"
    res = CliRunner().invoke(_cli(), [
        "bench", f"{server}/ok", "--data", str(body), "--concurrency", "1,2", "--rate", "20",
        "--duration", "0.2", "--warmup", "0.1", "--plot", str(png), "--json-out", str(out),
        "-H", "X-Test: yes",
    ])
    assert res.exit_code == 0, res.output
    assert "p99" in res.output and png.stat().st_size > 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["mode"], r["concurrency"], r["rate"]) for r in rows] == [
        ("closed", 1, None), ("closed", 2, None), ("open", None, 20.0)]
    assert all(r["errors"] == 0 and r["requests"] > 0 for r in rows)


def test_cli_get_default_plot(server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(_cli(), ["bench", f"{server}/ok", "--method", "GET",
                                      "--concurrency", "1", "--duration", "0.2", "--warmup", "0"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "tandem-bench.png").stat().st_size > 0


@pytest.mark.parametrize(("args", "message"), [
    ([], "needs a body"),
    (["--json", "{}", "--data", "body.json"], "not both"),
    (["--json", "{nope"], "not valid JSON"),
    (["--json", "{}", "--concurrency", "1,x"], "comma-separated"),
    (["--json", "{}", "--rate", "0"], "positive"),
    (["--json", "{}", "-H", "NoColon"], "Name: value"),
])
def test_cli_rejects_bad_parameters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "body.json").write_text("{}")
    res = CliRunner().invoke(_cli(), ["bench", "http://127.0.0.1:9/x", *args])
    assert res.exit_code == 2
    assert message in " ".join(res.output.split())


def test_cli_bad_url_and_dead_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(_cli(), ["bench", "localhost:8000", "--json", "{}"])
    assert res.exit_code == 2 and "URL" in res.output
    res = CliRunner().invoke(_cli(), ["bench", "http://127.0.0.1:9/", "--json", "{}",
                                      "--concurrency", "1", "--duration", "0.1", "--warmup", "0"])
    assert res.exit_code == 1 and "no request succeeded" in res.output
