"""The precision doctor's report: report.md for people, with node_errors.png, the per-node error plot.

The plot draws the instrumented pass (every node's output error with the whole graph converted) along the
graph, with the nodes kept in FP32 marked in red, before and after. Matplotlib is used through its object API
on the Agg canvas, so no display and no global pyplot state are touched.
"""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tandem.optimize.types import NodeError, PrecisionResult, Timing

__all__ = ["write_report"]

PathLike = str | os.PathLike[str]

PNG_NAME = "node_errors.png"
MD_NAME = "report.md"
_TOP_GROWTH = 15
_MAX_LABELS = 10


# ----------------------------------------------------------------------------------------------------------- plot


def _short(name: str, limit: int = 28) -> str:
    """A short label for an ONNX node name like /model/layers.3/mlp/down_proj/MatMul: its last parts."""
    parts = [p for p in name.split("/") if p]
    label = "/".join(parts[-2:]) if parts else name
    return label if len(label) <= limit else "…" + label[-(limit - 1):]


def _floor(errors: list[float]) -> float:
    """A small positive value for zero errors on the log axis: a decade under the smallest positive one."""
    positive = [e for e in errors if e > 0]
    # Exact nodes (integer paths, FP32-kept inputs) have zero error; drawing them at a tiny positive value
    # would stretch the axis over dozens of decades, so the floor is 1e-6 at the lowest.
    return max(min(positive) / 10, 1e-6) if positive else 1e-6


def _tolerance_text(result: PrecisionResult) -> str:
    tol = result.tolerance
    return f"{tol.stat} abs ≤ {tol.atol:g} or rel ≤ {tol.rtol:g}"


def _plot_fp32(ax: Axes, result: PrecisionResult, by_name: dict[str, NodeError], clip: float) -> None:
    """Red markers for the FP32 nodes (before, and after when measured) with short labels on the worst ones."""
    kept = [(n, by_name[n.name]) for n in result.fp32_nodes if n.name in by_name]
    if not kept:
        return
    xs = [e.index for _, e in kept]
    ax.scatter(xs, [max(e.error, clip) for _, e in kept], s=36, c="red", zorder=4,
               label="kept FP32 (before)")
    after = [(e.index, max(n.error_after, clip)) for n, e in kept if n.error_after is not None]
    if after:
        ax.scatter([a[0] for a in after], [a[1] for a in after], s=36, marker="v",
                   facecolors="none", edgecolors="red", zorder=4, label="kept FP32 (after)")
    worst = sorted(kept, key=lambda k: -k[1].error)[:_MAX_LABELS]
    for node, err in worst:
        ax.annotate(_short(node.name), (err.index, max(err.error, clip)),
                    textcoords="offset points", xytext=(4, 4), fontsize=6, color="darkred")


def _plot(result: PrecisionResult, path: Path) -> None:
    """Draw node_errors.png."""
    fig = Figure(figsize=(10, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    errors = sorted(result.node_errors, key=lambda e: e.index)
    if errors:
        clip = _floor([e.error for e in errors])
        ax.plot([e.index for e in errors], [max(e.error, clip) for e in errors], color="0.6", lw=0.6,
                marker=".", ms=2, label="all nodes")
        cands = [e for e in errors if e.candidate]
        ax.scatter([e.index for e in cands], [max(e.error, clip) for e in cands], s=10, color="tab:blue",
                   zorder=3, label="candidates")
        _plot_fp32(ax, result, {e.name: e for e in errors}, clip)
        ax.set_yscale("log")
        ax.legend(loc="best", fontsize=7)
    else:
        ax.text(0.5, 0.5, "no instrumented pass", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("node index (graph order)")
    ax.set_ylabel("relative L2 error of the node's output")
    ax.set_title(f"{result.target}: per-node error, tolerance {_tolerance_text(result)}", fontsize=10)
    ax.grid(True, which="major", lw=0.3, alpha=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ------------------------------------------------------------------------------------------------------- markdown


def _g(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}g}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _summary(result: PrecisionResult, title: str) -> list[str]:
    status = "met" if result.met else "**not met**"
    lines = [
        f"# {title}", "",
        f"- target: `{result.target}` on `{result.provider}`",
        f"- tolerance: {_tolerance_text(result)} (per output, over the calibration set): {status}",
        f"- kept in FP32: {len(result.fp32_nodes)} of {result.candidates} candidate nodes"
        + ("" if not result.fp32_nodes else f" (verified running in FP32: {'yes' if result.verified_fp32 else 'no'})"),
    ]
    if result.excluded_ops:
        lines.append(f"- op types the target never converts: {', '.join(result.excluded_ops)}")
    if result.note:
        lines.append(f"- note: {result.note}")
    return lines + [""]


def _outputs(result: PrecisionResult) -> list[str]:
    rows = [[f"`{o.name}`", _g(o.abs_err), _g(o.rel_err), _g(o.max_abs), _g(o.cosine_mean, 6),
             _g(o.cosine_min, 6), "yes" if o.passed else "**no**"] for o in result.outputs]
    head = ["output", "abs err", "rel err", "max abs", "cosine mean", "cosine min", "pass"]
    return ["## Outputs", ""] + _table(head, rows)


def _timing_row(label: str, t: Timing | None) -> list[str]:
    if t is None:
        return [label, "–", "–", "–"]
    return [label, _g(t.latency_ms), str(t.batch), _g(t.throughput)]


def _timings(result: PrecisionResult) -> list[str]:
    rows = [_timing_row("fp32", result.fp32_timing), _timing_row(result.target, result.timing)]
    head = ["model", "latency ms (batch 1, median)", "batch", "throughput (items/s)"]
    speedup = "–" if result.speedup is None else f"{result.speedup:.2f}×"
    return ["## Speed", ""] + _table(head, rows) + [f"Throughput speedup over FP32: {speedup}", ""]


def _fp32_nodes(result: PrecisionResult) -> list[str]:
    if not result.fp32_nodes:
        return ["## Nodes kept in FP32", "", "None.", ""]
    rows = [[f"`{n.name}`", n.op_type, n.reason, f"{_g(n.error_before)} → {_g(n.error_after)}"]
            for n in result.fp32_nodes]
    return ["## Nodes kept in FP32", ""] + _table(["node", "op", "reason", "error before → after"], rows)


def _search(result: PrecisionResult) -> list[str]:
    lines = [
        "## Search", "",
        f"{len(result.search)} verification runs over {result.candidates} candidates; "
        f"instrumented pass {result.instrumented_s:.1f} s; total {result.wall_s:.1f} s.", "",
    ]
    rows = [[str(s.k), "yes" if s.passed else "no", _g(s.worst), f"{s.seconds:.2f}"] for s in result.search]
    return lines + _table(["k (FP32 nodes)", "passed", "worst error/limit", "seconds"], rows)


def _ranking(result: PrecisionResult) -> list[str]:
    top = sorted(result.node_errors, key=lambda e: (-e.growth, e.index))[:_TOP_GROWTH]
    rows = [[f"`{e.name}`", e.op_type, _g(e.error), _g(e.growth)] for e in top]
    title = f"## Top {len(top)} nodes by error growth (instrumented pass)"
    return [title, ""] + _table(["node", "op", "error", "growth"], rows)


def _versions(result: PrecisionResult) -> list[str]:
    return ["## Versions", ""] + [f"- {k}: {v}" for k, v in result.versions.items()] + [""]


def write_report(result: PrecisionResult, out_dir: PathLike, *, title: str) -> tuple[Path, Path]:
    """Write report.md and node_errors.png into `out_dir`; returns (markdown path, png path)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png, md = out / PNG_NAME, out / MD_NAME
    _plot(result, png)
    lines = (
        _summary(result, title) + _outputs(result) + _timings(result) + _fp32_nodes(result) + _search(result)
        + _ranking(result) + _versions(result) + [f"![per-node error]({PNG_NAME})", ""]
    )
    md.write_text("\n".join(lines), encoding="utf-8")
    return md, png
