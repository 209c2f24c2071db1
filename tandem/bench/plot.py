"""Latency-against-load plot for `tandem bench` results (matplotlib, Agg; no pyplot state)."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from tandem.bench.loadgen import LoadResult

__all__ = ["plot_latency"]

_PERCENTILES = (("p50_ms", "p50", "-"), ("p90_ms", "p90", "--"), ("p99_ms", "p99", ":"))
_X_LABELS = {"closed": "concurrency (connections)", "open": "offered rate (requests/s)"}
_TITLES = {"closed": "closed loop", "open": "open loop"}


def plot_latency(results: list[LoadResult], path: str | Path, title: str = "") -> Path:
    """Write a PNG of p50/p90/p99 latency against offered load, achieved QPS on a second axis.

    One panel per mode present (closed loop: x is concurrency; open loop: x is the offered
    rate), one colour per label. Axes switch to log scale when they span more than 10x
    (x) or 100x (latency). Returns the path written.
    """
    if not results:
        raise ValueError("no results to plot")
    modes = [m for m in ("closed", "open") if any(r.mode == m for r in results)]
    fig = Figure(figsize=(7.5 * len(modes), 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(modes), squeeze=False)[0]
    for ax, mode in zip(axes, modes, strict=True):
        _plot_mode(ax, [r for r in results if r.mode == mode], mode)
    if title:
        fig.suptitle(title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def _group_by_label(results: list[LoadResult]) -> dict[str, list[LoadResult]]:
    groups: dict[str, list[LoadResult]] = {}
    for r in results:
        groups.setdefault(r.label, []).append(r)
    for rows in groups.values():
        rows.sort(key=lambda r: r.load)
    return groups


def _plot_mode(ax: Axes, results: list[LoadResult], mode: str) -> None:
    groups = _group_by_label(results)
    qps_ax = ax.twinx()
    for i, (label, rows) in enumerate(groups.items()):
        color = f"C{i % 10}"
        prefix = f"{label or 'run'} " if len(groups) > 1 else ""
        x = [r.load for r in rows]
        for attr, name, style in _PERCENTILES:
            y = [getattr(r, attr) for r in rows]
            ax.plot(x, y, linestyle=style, marker="o", color=color, label=f"{prefix}{name}")
        qps_ax.plot(x, [r.qps for r in rows], linestyle="-.", marker="s", color=color,
                    alpha=0.45, linewidth=2.5, label=f"{prefix}QPS")
    if mode == "open":  # what a server keeping up would achieve
        loads = sorted({r.load for r in results})
        qps_ax.plot(loads, loads, color="grey", linewidth=0.8, linestyle=":", label="offered")
    _scale_axes(ax, results)
    ax.set_xlabel(_X_LABELS[mode])
    ax.set_ylabel("latency (ms)")
    qps_ax.set_ylabel("achieved QPS")
    qps_ax.set_ylim(bottom=0)
    ax.set_title(_TITLES[mode])
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    qps_handles, qps_labels = qps_ax.get_legend_handles_labels()
    ax.legend(handles + qps_handles, labels + qps_labels, fontsize="small", loc="upper left")


def _spans(values: list[float], factor: float) -> bool:
    finite = [v for v in values if math.isfinite(v) and v > 0]
    return bool(finite) and max(finite) > factor * min(finite)


def _scale_axes(ax: Axes, results: list[LoadResult]) -> None:
    loads = sorted({r.load for r in results if math.isfinite(r.load)})
    if _spans(loads, 10):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    if len(loads) <= 12:  # tick exactly the measured levels, in plain numbers
        ax.set_xticks(loads, [f"{v:g}" for v in loads])
    latencies = [getattr(r, attr) for r in results for attr, _, _ in _PERCENTILES]
    if _spans(latencies, 100):
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
