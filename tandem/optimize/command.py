"""`tandem optimize`: export, convert, run the precision doctor, and optionally write a serving entry."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from tandem.errors import OptimizeError

if TYPE_CHECKING:  # onnx, onnxruntime and torch load only when the command runs
    from tandem.diffusion.optimize import DiffusionOutcome
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
                           "int8-dynamic and int8-smooth on CPU, fp16 on GPU); for diffusion entries the "
                           "UNet runtimes onnxruntime, openvino (default: both)")]
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
    min_psnr: Annotated[float, typer.Option(help="Diffusion entries: worst image PSNR (dB) against torch")] = 40.0,
    repeats: Annotated[int, typer.Option(help="Diffusion entries: timed passes over the calibration set")] = 3,
) -> None:
    """Convert a model to int8/fp16/bf16 on ONNX Runtime, keeping just the nodes that must stay FP32.

    For a diffusion entry: measure its UNet on torch, ONNX Runtime and OpenVINO over whole requests
    and choose the fastest runtime whose images stay within --min-psnr of torch's.
    """
    from tandem.optimize.api import OptimizeOptions, optimize_onnx
    from tandem.optimize.types import Tolerance

    logging.basicConfig(level=logging.WARNING)
    from tandem.optimize.targets import TARGETS

    diffusion = _diffusion_folder(src)
    if diffusion is not None:
        _optimize_diffusion(diffusion, calibration, out, target, threads, limit, repeats, min_psnr, min_speedup,
                            write_entry, entry_name, progress)
        return

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


def _diffusion_folder(src: str) -> Path | None:
    """The entry folder when `src` names a `kind: diffusion` entry, else None (the ONNX path handles it)."""
    from tandem.config import load_model_config
    from tandem.errors import ConfigError
    from tandem.serving.repository import default_repository

    path = Path(src)
    folder = path if path.is_dir() else default_repository() / src
    if path.suffix == ".onnx" or not (folder / "tandem.yaml").is_file():
        return None
    try:
        return folder if load_model_config(folder).kind == "diffusion" else None
    except ConfigError:
        return None


def _diffusion_table(outcome: DiffusionOutcome) -> Table:
    table = Table(box=box.SIMPLE_HEAD, title=f"{outcome.name}: UNet runtimes over {outcome.requests} whole "
                                            f"requests, median of {outcome.repeats} passes")
    for col in ("runtime", "verdict", "requests s", "vs torch", "worst PSNR dB"):
        table.add_column(col, no_wrap=True)
    for r in outcome.results:
        if r.refused:
            table.add_row(r.runtime, f"refused: {r.refused}", "-", "-", "-")
            continue
        verdict = "chosen" if r.runtime == outcome.chosen else "reference" if r.runtime == "torch" else \
            "passed, slower" if r.passed else "MISSED parity"
        db = "identical" if r.psnr_min == float("inf") else f"{r.psnr_min:.1f}"
        table.add_row(r.runtime, verdict, f"{r.seconds:.2f}", f"{r.speedup:.2f}x", db)
    return table


def _optimize_diffusion(folder: Path, calibration: Path | None, out: Path, target: list[str] | None, threads: int,
                        limit: int | None, repeats: int, min_psnr: float, min_speedup: float,
                        write_entry: Path | None, entry_name: str | None, progress: bool) -> None:
    from tandem.diffusion.optimize import CANDIDATES, optimize_diffusion, write_diffusion_entry
    from tandem.optimize.entry import claim_folder

    status = console.status("measuring the UNet on each runtime") if progress else contextlib.nullcontext()
    try:
        if write_entry:  # before minutes of measuring, not after
            claim_folder(write_entry)
        with status:
            outcome = optimize_diffusion(folder, out, calibration=calibration, candidates=tuple(target or CANDIDATES),
                                         threads=threads, repeats=repeats, min_psnr=min_psnr,
                                         min_speedup=min_speedup, limit=limit)
        console.print(_diffusion_table(outcome))
        entry = write_diffusion_entry(write_entry, outcome, folder, entry_name or write_entry.name) \
            if write_entry else None
    except OptimizeError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    console.print(f"chosen: unet.runtime {outcome.chosen}; report {outcome.report}")
    if entry is not None:
        console.print(f"entry written: {entry} (serve it with `tandem serve {entry.parent}`)")
