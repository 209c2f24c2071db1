"""`tandem bench`: load an HTTP endpoint at several levels, print a table, plot latency."""

from __future__ import annotations

import json
import math
from enum import StrEnum
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from tandem.bench.loadgen import MAX_RETRY_AFTER_S, LoadResult, run_load_sync

__all__ = ["register"]

DEFAULT_PLOT = "tandem-bench.png"
DEFAULT_CONCURRENCY = "1,8,32"
_BODYLESS = ("GET", "HEAD")


class Arrival(StrEnum):
    """Open-loop inter-arrival schedule."""

    fixed = "fixed"
    poisson = "poisson"


def register(app: typer.Typer) -> None:
    """Add the `bench` command to `app`."""
    app.command("bench")(bench)


# Option declarations, kept out of the signature so that it stays readable.
_Url = Annotated[str, typer.Argument(
    help="Endpoint to load, e.g. http://127.0.0.1:8000/v2/models/m/infer")]
_Data = Annotated[list[Path] | None, typer.Option(
    "--data", "-d", exists=True, dir_okay=False, readable=True,
    help="File holding one request body; repeat to cycle through several bodies.")]
_Json = Annotated[str | None, typer.Option("--json", help="Inline JSON request body.")]
_ContentType = Annotated[str, typer.Option(help="Content-Type of the body.")]
_Method = Annotated[str, typer.Option(help="HTTP method.")]
_Header = Annotated[list[str] | None, typer.Option(
    "--header", "-H", help="Extra request header 'Name: value' (repeatable).")]
_Concurrency = Annotated[str | None, typer.Option(
    help=f"Closed-loop levels, comma-separated (default {DEFAULT_CONCURRENCY} without --rate).")]
_Rate = Annotated[str | None, typer.Option(
    help="Open-loop levels in requests/s, comma-separated, e.g. 50,100.")]
_Arrival = Annotated[Arrival, typer.Option(help="Open-loop inter-arrival schedule.")]
_Duration = Annotated[float, typer.Option(min=0.01, help="Measured seconds per level.")]
_Warmup = Annotated[float, typer.Option(min=0.0, help="Unmeasured warm-up seconds per level.")]
_Timeout = Annotated[float, typer.Option(min=0.001, help="Per-request timeout in seconds.")]
_Label = Annotated[str, typer.Option(help="Label for this run in the table, plot and JSON.")]
_Plot = Annotated[Path | None, typer.Option(help=f"PNG to write (default ./{DEFAULT_PLOT}).")]
_JsonOut = Annotated[Path | None, typer.Option("--json-out", help="Write results as JSON here.")]
_Honour = Annotated[bool, typer.Option(
    "--honour-retry-after/--no-honour-retry-after",
    help="On 503/429 with Retry-After, wait that long (capped, jittered) before retrying the request; "
         "without it, the next request goes out at once.")]
_MaxRetryAfter = Annotated[float, typer.Option(min=0.0, help="Longest Retry-After honoured, in seconds.")]


def bench(
    url: _Url,
    data: _Data = None,
    json_text: _Json = None,
    content_type: _ContentType = "application/json",
    method: _Method = "POST",
    header: _Header = None,
    concurrency: _Concurrency = None,
    rate: _Rate = None,
    arrival: _Arrival = Arrival.fixed,
    duration: _Duration = 10.0,
    warmup: _Warmup = 2.0,
    timeout: _Timeout = 30.0,
    label: _Label = "",
    plot: _Plot = None,
    json_out: _JsonOut = None,
    honour_retry_after: _Honour = True,
    max_retry_after: _MaxRetryAfter = MAX_RETRY_AFTER_S,
) -> None:
    """Benchmark an HTTP endpoint: closed-loop concurrency levels and/or open-loop rates."""
    method = method.upper()
    _check_url(url)
    bodies = _load_bodies(data, json_text, method)
    headers = _parse_headers(header or [])
    levels = _parse_levels(concurrency, rate)
    console = Console()
    results: list[LoadResult] = []
    for mode, load in levels:
        console.print(f"[dim]{mode} loop {_describe(mode, load)}: "
                      f"{warmup:g}s warm-up + {duration:g}s[/dim]")
        results.append(run_load_sync(
            url, bodies, content_type=content_type, headers=headers, method=method,
            concurrency=int(load) if mode == "closed" else None,
            rate=load if mode == "open" else None,
            duration_s=duration, warmup_s=warmup, timeout_s=timeout, label=label,
            arrival=arrival.value, honour_retry_after=honour_retry_after,
            max_retry_after_s=max_retry_after,
        ))
    console.print(_table(results, url))
    _write_outputs(results, url, plot or Path(DEFAULT_PLOT), json_out, console)
    if not any(r.latencies_ms for r in results):
        console.print("[red]no request succeeded[/red]")
        raise typer.Exit(1)


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise typer.BadParameter(f"expected an http:// or https:// URL, got {url!r}",
                                 param_hint="URL")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="URL") from exc


def _load_bodies(data: list[Path] | None, json_text: str | None, method: str) -> list[bytes]:
    if data and json_text is not None:
        raise typer.BadParameter("give either --data or --json, not both", param_hint="--data")
    if json_text is not None:
        try:
            json.loads(json_text)
        except ValueError as exc:
            raise typer.BadParameter(f"not valid JSON: {exc}", param_hint="--json") from exc
        return [json_text.encode()]
    if data:
        return [p.read_bytes() for p in data]
    if method not in _BODYLESS:
        raise typer.BadParameter(f"{method} needs a body: give --data FILE or --json TEXT "
                                 "(or use --method GET)", param_hint="--data")
    return [b""]


def _parse_headers(raw: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for item in raw:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise typer.BadParameter(f"expected 'Name: value', got {item!r}", param_hint="--header")
        headers[name.strip()] = value.strip()
    return headers


def _parse_list(text: str, kind: type[int | float], hint: str) -> list[float]:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}",
                                 param_hint=hint) from exc
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise typer.BadParameter(f"expected positive numbers, got {text!r}", param_hint=hint)
    return [float(v) for v in values]


def _parse_levels(concurrency: str | None, rate: str | None) -> list[tuple[str, float]]:
    """(mode, load) pairs: closed-loop levels first, then open-loop ones."""
    if concurrency is None and rate is None:
        concurrency = DEFAULT_CONCURRENCY
    levels: list[tuple[str, float]] = []
    if concurrency is not None:
        levels += [("closed", c) for c in _parse_list(concurrency, int, "--concurrency")]
    if rate is not None:
        levels += [("open", r) for r in _parse_list(rate, float, "--rate")]
    return levels


def _describe(mode: str, load: float) -> str:
    return f"c={int(load)}" if mode == "closed" else f"{load:g}/s"


def _ms(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _errors(r: LoadResult) -> str:
    if not r.errors:
        return "0"
    detail = ", ".join(f"{s or 'conn'}:{n}" for s, n in r.status_counts.items()
                       if not 200 <= s < 300)
    return f"{r.errors} ({detail})"


def _table(results: list[LoadResult], url: str) -> Table:
    table = Table(title=f"tandem bench {url}  (latency in ms)", box=box.SIMPLE_HEAD)
    # QPS is the goodput (2xx/s); rejected = 503/429 answers (also under errors), retries after Retry-After
    for name in ("run", "load", "requests", "errors", "rejected", "retries", "QPS", "p50", "p90", "p95", "p99"):
        table.add_column(name, justify="left" if name in ("run", "errors") else "right")
    for r in results:
        table.add_row(
            f"{r.label}/{r.mode}" if r.label else r.mode,
            _describe(r.mode, r.load), str(r.requests), _errors(r), str(r.rejected), str(r.retries),
            f"{r.qps:.1f}",
            _ms(r.p50_ms), _ms(r.p90_ms), _ms(r.p95_ms), _ms(r.p99_ms),
        )
    return table


def _write_outputs(
    results: list[LoadResult], url: str, plot: Path, json_out: Path | None, console: Console
) -> None:
    from tandem.bench.plot import plot_latency  # lazy: matplotlib is slow to import

    written = plot_latency(results, plot, title=f"tandem bench {url}")
    console.print(f"plot: {written}")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"url": url, "results": [r.row() for r in results]}
        json_out.write_text(json.dumps(payload, indent=2) + "\n")
        console.print(f"results: {json_out}")
