"""`tandem optimize`: export, convert, run the precision doctor, and optionally write a serving entry."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from tandem.errors import OptimizeError

if TYPE_CHECKING:  # onnx, onnxruntime and torch load only when the command runs
    from tandem.optimize.api import Outcome
    from tandem.optimize.sources import Source

__all__ = ["register"]

console = Console(stderr=True, width=160)

_Src = Annotated[str, typer.Argument(
    help="A model-repository folder, a model of the built-in repository (e.g. embeddings), or a .onnx file")]
_Calib = Annotated[Path | None, typer.Option(
    help="Calibration data: JSONL request bodies or a folder of request files (entries; default: the "
         "entry's calibration.jsonl), or an .npz of inputs (.onnx files)")]
_Target = Annotated[list[str] | None, typer.Option(
    "--target", "-t", help="int8-dynamic, int8-smooth, int8-static, fp16, bf16 (repeatable; default: "
                           "int8-dynamic and int8-smooth on CPU, fp16 on GPU)")]
_Stat = Annotated[str, typer.Option(help="Statistic checked per output: mean, median or max")]
_Plan = Annotated[Path | None, typer.Option(help="Re-apply this precision.yaml instead of searching")]
_Entry = Annotated[Path | None, typer.Option(
    help="Also write a model-repository entry (runtime: onnxruntime) serving the chosen artefact here")]


def register(app: typer.Typer) -> None:
    """Add the `optimize` command to `app`."""
    app.command("optimize")(optimize)


def _source(src: str, calibration: Path | None, out: Path, batch_size: int, limit: int | None) -> Source:
    from tandem.optimize.sources import entry_source, onnx_source

    path = Path(src)
    if path.suffix == ".onnx":
        return onnx_source(path, calibration, batch_size)
    return entry_source(path, calibration, out, batch_size, limit)


def _table(outcome: Outcome) -> Table:
    fp32 = outcome.fp32_timing
    table = Table(box=box.SIMPLE_HEAD, title=f"FP32: {fp32.throughput:.1f} items/s at batch {fp32.batch}, "
                                            f"{fp32.latency_ms:.2f} ms at batch 1")
    for col in ("target", "verdict", "FP32 nodes", "error", "cosine mean/min", "speedup", "FP32 verified"):
        table.add_column(col, no_wrap=True)
    for r in outcome.results:
        worst = max(r.outputs, key=lambda e: e.abs_err)
        cos = f"{worst.cosine_mean:.4f}/{worst.cosine_min:.4f}" if worst.cosine_mean is not None else "-"
        verdict = "chosen" if outcome.chosen is r else "refused" if r.target in outcome.refused else "passed, slower"
        table.add_row(r.target, verdict, f"{len(r.fp32_nodes)} of {r.candidates}",
                      f"{r.tolerance.stat} abs {worst.abs_err:.3g} ({'met' if r.met else 'MISSED'})", cos,
                      f"{r.speedup or 0:.2f}x", "yes" if r.verified_fp32 else "NO")
    return table


def optimize(
    src: _Src,
    calibration: _Calib = None,
    out: Annotated[Path, typer.Option(help="Output folder")] = Path("optimized"),
    target: _Target = None,
    atol: Annotated[float, typer.Option(help="Absolute tolerance")] = 1e-3,
    rtol: Annotated[float, typer.Option(help="Relative tolerance")] = 1e-2,
    check_error_stat: _Stat = "mean",
    provider: Annotated[str, typer.Option(help="ONNX Runtime execution provider, or auto")] = "auto",
    threads: Annotated[int, typer.Option(help="Intra-op threads (0: ONNX Runtime's default)")] = 0,
    batch_size: Annotated[int, typer.Option(help="Calibration batch size (throughput is measured at it)")] = 32,
    limit: Annotated[int | None, typer.Option(help="Use at most this many calibration requests")] = None,
    plan: _Plan = None,
    write_entry: _Entry = None,
    entry_name: Annotated[str | None, typer.Option(help="Name of the written entry (default: its folder name)")] = None,
    max_fp32_nodes: Annotated[int | None, typer.Option(help="Largest FP32 set worth having")] = None,
    min_speedup: Annotated[float, typer.Option(help="Throughput over FP32 an artefact needs to be chosen")] = 1.05,
    instrument_batches: Annotated[int, typer.Option(help="Calibration batches in the instrumented pass")] = 4,
    prune_runs: Annotated[int, typer.Option(help="Verification runs spent dropping members of the set found")] = 2,
    progress: Annotated[bool, typer.Option(help="Show the search's progress bar")] = True,
) -> None:
    """Convert a model to int8/fp16/bf16 on ONNX Runtime, keeping just the nodes that must stay FP32."""
    from tandem.optimize.api import OptimizeOptions, optimize_onnx
    from tandem.optimize.types import Tolerance

    logging.basicConfig(level=logging.WARNING)
    from tandem.optimize.targets import TARGETS

    if check_error_stat not in ("mean", "median", "max"):
        raise typer.BadParameter("--check-error-stat must be mean, median or max")
    unknown = [t for t in target or () if t not in TARGETS]
    if unknown:
        console.print(f"[red]error:[/red] unknown target {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
        raise typer.Exit(2)
    try:
        source = _source(src, calibration, out, batch_size, limit)
        options = OptimizeOptions(tuple(target or ()), Tolerance(atol, rtol, check_error_stat),  # type: ignore[arg-type]
                                  provider, threads, plan=plan, progress=progress,
                                  max_fp32_nodes=max_fp32_nodes, instrument_batches=instrument_batches,
                                  prune_runs=prune_runs, min_speedup=min_speedup)
        outcome = optimize_onnx(source.model, source.calibration, out, options, source=source.name)
        console.print(_table(outcome))
        for name, why in outcome.refused.items():
            console.print(f"{name} refused: {why}")
        entry = _write_entry(outcome, source, write_entry, entry_name) if write_entry else None
    except OptimizeError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    chosen = outcome.chosen.target if outcome.chosen else "fp32 (no target passed and beat it)"
    console.print(f"chosen: {chosen} -> {outcome.artefact}")
    if entry is not None:
        console.print(f"entry written: {entry} (serve it with `tandem serve {entry.parent}`)")


def _write_entry(outcome: Outcome, source: Source, dest: Path, name: str | None) -> Path:
    from tandem.optimize.entry import write_entry

    if source.entry_dir is None or source.model_class is None:
        raise OptimizeError("--write-entry needs a model-repository entry as the source (its model.py does the "
                            "pre/post-processing)")
    chosen = outcome.chosen.target if outcome.chosen else "fp32"
    precision = outcome.out_dir / chosen / "precision.yaml" if outcome.chosen else None
    return write_entry(dest, name=name or dest.name, source_dir=source.entry_dir,
                       model_class=source.model_class, artefact=outcome.artefact, precision_yaml=precision)
