"""`optimize`: from an ONNX graph and calibration batches to measured artefacts and the one to serve.

For each target the doctor finds the FP32 set (or a precision.yaml plan is re-applied), then the
artefact is timed against the FP32 graph on the same runtime. An artefact that misses the
tolerance, or is not faster than FP32, is refused with its numbers; the fastest passing one is
chosen, and FP32 (which always passes) is kept when none is.

    out_dir/
      model.fp32.onnx                   the exported (or given) graph
      <target>/model.onnx               each target's artefact (the closest one if the tolerance was missed)
      <target>/precision.yaml           FP32 nodes, errors, timings, versions; re-apply with --plan
      <target>/report.md, node_errors.png
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from tandem.errors import OptimizeError
from tandem.optimize.doctor import Diagnosis, DoctorSettings, diagnose, errors_after, evaluate
from tandem.optimize.onnx_io import check_feeds, save_onnx, signature_of
from tandem.optimize.plan import node_keys, read_precision_yaml, resolve_nodes, write_precision_yaml
from tandem.optimize.report import write_report
from tandem.optimize.runtime import Feeds, available_providers, make_session, run_batches, time_session
from tandem.optimize.targets import get_target, host_int8_saturates
from tandem.optimize.types import Fp32Node, NodeError, PrecisionResult, Timing, Tolerance

__all__ = ["OptimizeOptions", "Outcome", "default_targets", "optimize_onnx", "versions"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimizeOptions:
    """What to try and how to judge it. `targets` empty means `default_targets(provider)`."""

    targets: tuple[str, ...] = ()
    tolerance: Tolerance = Tolerance()
    provider: str = "auto"
    threads: int = 0  # 0: ONNX Runtime's default (all cores)
    min_speedup: float = 1.05  # an artefact must beat FP32 throughput by this much to be chosen
    instrument_batches: int = 4
    prune_runs: int = 2
    plan: Path | None = None  # re-apply a precision.yaml instead of searching
    progress: bool = True
    max_fp32_nodes: int | None = None  # largest FP32 set worth having (None: no limit)


@dataclass
class Outcome:
    """Every target's result, the artefact chosen for serving, and why the others were refused."""

    out_dir: Path
    fp32_path: Path
    fp32_timing: Timing
    results: list[PrecisionResult] = field(default_factory=list)
    chosen: PrecisionResult | None = None  # None: FP32 stays the best
    refused: dict[str, str] = field(default_factory=dict)

    @property
    def artefact(self) -> Path:
        """The file to serve: the chosen target's model, or the FP32 graph."""
        return self.out_dir / self.chosen.target / "model.onnx" if self.chosen else self.fp32_path


def resolve_provider(provider: str) -> str:
    """`auto`: TensorRT, then CUDA, when ONNX Runtime has them; else CPU. Others must be available."""
    have = available_providers()
    if provider == "auto":
        for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
            if p in have:
                return p
        return "CPUExecutionProvider"
    if provider not in have:
        raise OptimizeError(f"execution provider {provider} is not available here (have: {', '.join(have)})")
    return provider


def default_targets(provider: str) -> tuple[str, ...]:
    """int8 (dynamic, plain and smoothed) on CPU, where VNNI makes it pay; fp16 on GPUs."""
    return ("int8-dynamic", "int8-smooth") if provider == "CPUExecutionProvider" else ("fp16",)


def versions() -> dict[str, str]:
    """Library versions, and the int8 weight width this CPU gets, that decide the numbers (precision.yaml)."""
    import onnxruntime
    import torch

    import tandem

    found = {"tandem": getattr(tandem, "__version__", "0"), "onnx": onnx.__version__,
             "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "numpy": np.__version__,
             "int8_weights": "7-bit (x86 CPU without VNNI)" if host_int8_saturates() else "8-bit"}
    return {k: str(v) for k, v in found.items()}  # torch's version is a str subclass YAML cannot write


def _timing_feeds(calib: Sequence[Feeds]) -> tuple[Feeds, Feeds]:
    """Batch-1 and full-batch feeds from the calibration set (the largest batch measures throughput)."""
    big = max(calib, key=lambda f: next(iter(f.values())).shape[0])
    one = {k: v[:1] for k, v in calib[0].items()}
    return one, big


def module_of(node: onnx.NodeProto) -> str | None:
    """The torch module a node was exported from (the dynamo exporter's name scopes), e.g.
    `encoder.layer.3.output.dense`; the export wrappers' own prefixes are dropped."""
    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
    if not scopes:
        return None
    parts = [s.strip(" '\"") for s in scopes.strip("[]").split(",")]
    path = parts[-2] if len(parts) >= 2 else ""
    path = re.sub(r"^(inner\.)?(held\.\d+\.)?", "", path)
    return path or None


def _fp32_nodes(model: onnx.ModelProto, keep: Sequence[str], errors: Sequence[NodeError], ranked: Sequence[str],
                after: dict[str, float]) -> list[Fp32Node]:
    by_name = {e.name: e for e in errors}
    nodes_by_name = {n.name: n for n in model.graph.node}
    keys = node_keys(model, list(keep))
    nodes = []
    for name, (op, ordinal, weights) in zip(keep, keys):
        e = by_name.get(name)
        rank = ranked.index(name) + 1 if name in ranked else 0
        module = module_of(nodes_by_name[name])
        where = f"{module}: " if module else ""
        reason = where + (f"adds {e.growth:.3g} relative error by itself (rank {rank} of {len(ranked)})" if e
                          else "kept by the plan")
        nodes.append(Fp32Node(name, op, reason, e.error if e else float("nan"), after.get(name), ordinal, weights))
    return nodes


class _Run:
    """One optimize call: the FP32 reference, then each target in turn."""

    def __init__(self, model: onnx.ModelProto, calib: Sequence[Feeds], out_dir: Path,
                 options: OptimizeOptions) -> None:
        if not calib:
            raise OptimizeError("no calibration batches: pass --calibration with a few hundred real inputs")
        signature = signature_of(model)
        for feed in calib:
            check_feeds(signature, feed)
        self.model, self.calib, self.out_dir, self.options = model, list(calib), out_dir, options
        self.provider = resolve_provider(options.provider)
        self.settings = DoctorSettings(options.tolerance, self.provider, options.threads,
                                       options.instrument_batches, options.prune_runs, options.progress,
                                       options.max_fp32_nodes)
        self.refs = run_batches(make_session(model, self.provider, options.threads), self.calib)
        self.one, self.big = _timing_feeds(self.calib)
        self.fp32_timing = self.time(model)

    def time(self, model: onnx.ModelProto, precision: str = "fp32") -> Timing:
        session = make_session(model, self.provider, self.settings.threads, precision=precision)
        return time_session(session, self.one, self.big)

    def search(self, name: str) -> tuple[Diagnosis, onnx.ModelProto]:
        target = get_target(name, self.calib)
        d = diagnose(self.model, target, self.calib, self.refs, self.settings)
        return d, d.best.model

    def apply_plan(self, name: str, keep: list[str]) -> tuple[Diagnosis, onnx.ModelProto]:
        from tandem.optimize.doctor import confirm_fp32

        target = get_target(name, self.calib)
        ev = evaluate(self.model, target, keep, self.calib, self.refs, self.settings)
        problems = confirm_fp32(target, ev.model, keep, self.calib[0], self.settings)
        return Diagnosis(ev, [], list(keep), len(keep), [], 0.0, problems), ev.model

    def result(self, name: str, d: Diagnosis, wall: float) -> PrecisionResult:
        keep = d.best.keep
        after = errors_after(self.model, d.best.model, keep, self.calib, self.settings) if keep else {}
        target = get_target(name)  # the registry's instance: precision and op lists need no calibration
        res = PrecisionResult(
            target=name, provider=self.provider, tolerance=self.options.tolerance, met=d.best.passed,
            fp32_nodes=_fp32_nodes(self.model, keep, d.node_errors, d.ranked, after),
            excluded_ops=target.excluded_ops(self.model), outputs=d.best.errors,
            node_errors=d.node_errors, candidates=d.candidates, search=d.steps, fp32_timing=self.fp32_timing,
            timing=self.time(d.best.model, target.precision), versions=versions(), wall_s=wall,
            instrumented_s=d.instrumented_s, verified_fp32=not d.problems)
        notes = [f"FP32 node {n} did not run in FP32: {p}" for n, p in d.problems.items()]
        if not res.met:
            notes.append(f"tolerance not met: the closest model (k={len(keep)}) is "
                         f"{d.best.worst:.3g}x the limit; kept as the closest result")
        res.note = "; ".join(notes)
        return res


def _judge(outcome: Outcome, res: PrecisionResult, min_speedup: float) -> None:
    speed = res.speedup or 0.0
    if not res.met or not res.verified_fp32:  # the note says which
        outcome.refused[res.target] = res.note
    elif speed < min_speedup:
        assert res.timing is not None
        outcome.refused[res.target] = (
            f"not faster than FP32 on {res.provider}: {res.timing.throughput:.1f} vs "
            f"{outcome.fp32_timing.throughput:.1f} items/s at batch {res.timing.batch} ({speed:.2f}x, "
            f"needs {min_speedup:.2f}x)")
        res.note = (res.note + "; " if res.note else "") + "refused: " + outcome.refused[res.target]
    elif outcome.chosen is None or speed > (outcome.chosen.speedup or 0.0):
        outcome.chosen = res


def optimize_onnx(model: onnx.ModelProto, calib: Sequence[Feeds], out_dir: Path, options: OptimizeOptions,
                  *, source: str = "") -> Outcome:
    """Run every target (or re-apply `options.plan`) on `model`; write artefacts, plans and reports."""
    out_dir.mkdir(parents=True, exist_ok=True)
    run = _Run(model, calib, out_dir, options)
    fp32_path = out_dir / "model.fp32.onnx"
    save_onnx(model, fp32_path)
    outcome = Outcome(out_dir, fp32_path, run.fp32_timing)
    jobs = _jobs(model, options, run.provider)
    for name, keep in jobs:
        start = time.perf_counter()
        try:
            d, built = run.apply_plan(name, keep) if keep is not None else run.search(name)
        except OptimizeError as e:  # e.g. no kernels for this precision on this provider
            outcome.refused[name] = f"cannot run on {run.provider}: {e}"
            logger.warning("%s refused: %s", name, e)
            continue
        res = run.result(name, d, time.perf_counter() - start)
        folder = out_dir / name
        folder.mkdir(exist_ok=True)
        save_onnx(built, folder / "model.onnx")
        _judge(outcome, res, options.min_speedup)
        write_precision_yaml(res, folder / "precision.yaml", model_path="model.onnx", source=source)
        write_report(res, folder, title=f"{source or 'model'}: {name}")
        outcome.results.append(res)
    return outcome


def _jobs(model: onnx.ModelProto, options: OptimizeOptions, provider: str) -> list[tuple[str, list[str] | None]]:
    """(target, FP32 set) pairs: the plan's resolved set, or None (search) for each target."""
    if options.plan is None:
        return [(t, None) for t in options.targets or default_targets(provider)]
    plan = read_precision_yaml(options.plan)
    keep, missing = resolve_nodes(model, plan.fp32_nodes)
    if missing:
        raise OptimizeError(f"{options.plan}: {len(missing)} FP32 node(s) have no match in this model: "
                            f"{', '.join(missing[:5])} (was it exported from another model?)")
    return [(plan.target, keep)]
