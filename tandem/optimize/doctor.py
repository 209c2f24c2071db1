"""The precision doctor: find a small set of nodes to keep in FP32 so a converted model meets a tolerance.

1. Instrumented pass (once, `instrument.py`): every float tensor becomes an output; one run over
   the first calibration batches gives each node's propagated error and the error it adds by itself
   (`growth`: its converted form run on exact FP32 inputs). Candidates (the nodes the target
   converts) are ranked by what they add (`rank`), earliest first on ties.
2. Verified search: the un-instrumented model is rebuilt with the top-k ranked candidates in FP32 and
   judged on every calibration batch against the tolerance. k = 0 is tried first, then bisection on
   k, so the search needs at most ceil(log2 n) + 2 runs; up to `prune_runs` more runs then try to drop
   members of the set that the ranking over-included.
3. Confirmation: the chosen model is profiled in ONNX Runtime, and each FP32 node is looked up in
   what really ran (after fusions): it must not run as an integer or fp16/bf16 kernel.

If even the largest allowed set (every candidate, or `max_fp32_nodes`) fails the tolerance, the
closest model found is kept and the result says so.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from tandem.optimize.compare import output_errors, passes, worst_ratio
from tandem.optimize.instrument import accumulate, node_errors
from tandem.optimize.runtime import Feeds, make_session, profile_nodes, run_batches
from tandem.optimize.targets import QUANTIZED_OPS, Target
from tandem.optimize.types import NodeError, OutputError, SearchStep, Tolerance

__all__ = ["Diagnosis", "DoctorSettings", "Evaluation", "Search", "confirm_fp32", "diagnose", "errors_after",
           "evaluate", "instrumented_pass", "rank"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DoctorSettings:
    """How the doctor measures: tolerance, runtime, and how much of the calibration set each step uses."""

    tolerance: Tolerance = Tolerance()
    provider: str = "CPUExecutionProvider"
    threads: int = 0
    instrument_batches: int = 4  # calibration batches in the instrumented pass (all tensors are outputs)
    prune_runs: int = 2
    progress: bool = True
    max_fp32_nodes: int | None = None  # largest FP32 set worth having (None: every candidate)


@dataclass
class Evaluation:
    """One verification run: the model built with `keep` in FP32 and its errors on the calibration set."""

    keep: list[str]
    model: onnx.ModelProto
    errors: list[OutputError]
    worst: float
    seconds: float

    @property
    def passed(self) -> bool:
        return passes(self.errors)


def evaluate(model: onnx.ModelProto, target: Target, keep: Sequence[str], calib: Sequence[Feeds],
             refs: Sequence[Feeds], settings: DoctorSettings) -> Evaluation:
    """Build with `keep` in FP32, run every calibration batch un-instrumented, judge the outputs."""
    start = time.perf_counter()
    built = target.build(model, list(keep))
    session = make_session(built, settings.provider, settings.threads, precision=target.precision)
    got = run_batches(session, calib, list(refs[0]))
    errors = output_errors(refs, got, settings.tolerance)
    worst = worst_ratio(errors, settings.tolerance)
    return Evaluation(list(keep), built, errors, worst, time.perf_counter() - start)


def instrumented_pass(model: onnx.ModelProto, converted: onnx.ModelProto, candidates: Sequence[str],
                      calib: Sequence[Feeds], settings: DoctorSettings) -> list[NodeError]:
    """Each node's propagated error and the error it adds, over the first calibration batches."""
    batches = list(calib[: max(1, settings.instrument_batches)])
    return node_errors(model, converted, candidates, batches, settings.provider, settings.threads)


def rank(node_errors: Sequence[NodeError], candidates: Sequence[str]) -> list[str]:
    """Candidates by the error they add by themselves, largest first; earlier nodes win ties; candidates
    the pass did not see come last.

    A cost-aware order (growth^2 / weight elements, cheap projections first) was measured on MiniLM
    int8 and lost: at mean-abs 0.0035 it kept 26 of 39 nodes for 1.41x ORT FP32, where this order
    kept 8 for 1.71x. Many small FP32 islands each cost a quantize/dequantize boundary.
    """
    seen = {n.name: n for n in node_errors if n.candidate}
    scored = sorted(seen.values(), key=lambda n: (-n.growth, n.index))
    rest = [c for c in candidates if c not in seen]
    return [n.name for n in scored] + rest


class Search:
    """The verified bisection over k (the top-k ranked candidates kept in FP32), then pruning."""

    def __init__(self, model: onnx.ModelProto, target: Target, ranked: Sequence[str], calib: Sequence[Feeds],
                 refs: Sequence[Feeds], settings: DoctorSettings,
                 on_step: Callable[[SearchStep], None] | None = None) -> None:
        self.model, self.target, self.ranked = model, target, list(ranked)
        self.calib, self.refs, self.settings = calib, refs, settings
        self.on_step = on_step
        self.steps: list[SearchStep] = []
        self.tried: dict[tuple[str, ...], Evaluation] = {}

    @property
    def budget(self) -> int:
        """Most verification runs this search can take (for the progress bar)."""
        n = len(self.ranked)
        return 1 + (math.ceil(math.log2(n)) + 1 if n > 1 else n) + self.settings.prune_runs

    def run_set(self, keep: Sequence[str]) -> Evaluation:
        key = tuple(keep)
        if key not in self.tried:
            ev = evaluate(self.model, self.target, keep, self.calib, self.refs, self.settings)
            self.tried[key] = ev
            step = SearchStep(len(keep), ev.passed, ev.worst, ev.seconds)
            self.steps.append(step)
            if self.on_step is not None:
                self.on_step(step)
        return self.tried[key]

    def bisect(self) -> Evaluation:
        """The smallest k found to pass (k - 1 verified failing), or the closest if none passes."""
        first = self.run_set([])
        if first.passed or not self.ranked:
            return first
        lo, hi = 0, len(self.ranked)  # k = lo fails; k = hi is assumed to pass until checked
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.run_set(self.ranked[:mid]).passed:
                hi = mid
            else:
                lo = mid
        best = self.run_set(self.ranked[:hi])
        return best if best.passed else min(self.tried.values(), key=lambda e: (e.worst, len(e.keep)))

    def prune(self, best: Evaluation) -> Evaluation:
        """Drop what the ranking over-included, lowest-ranked first, in halving chunks.

        The last member added is proven needed (one fewer failed) and stays. A chunk whose removal
        still passes is gone for good; a failing chunk is halved; `prune_runs` bounds the runs.
        """
        if not best.passed or len(best.keep) < 2:
            return best
        keep = list(best.keep)
        droppable = list(reversed(keep[:-1]))
        chunk = max(1, len(droppable) // 2)
        for _ in range(self.settings.prune_runs):
            if not droppable:
                break
            part = set(droppable[:chunk])
            trial = self.run_set([k for k in keep if k not in part])
            if trial.passed:
                keep, best, droppable = trial.keep, trial, droppable[chunk:]
                chunk = min(chunk, max(1, len(droppable)))
            elif chunk > 1:
                chunk //= 2
            else:
                droppable = droppable[1:]
        return best


def confirm_fp32(target: Target, built: onnx.ModelProto, keep: Sequence[str], feed: Feeds,
                 settings: DoctorSettings) -> dict[str, str]:
    """For each kept node, what ONNX Runtime really ran for it; returns {node: problem} (empty: all FP32).

    A kept node is found in ORT's optimized graph by its output tensor, else by the node that reads
    its weights (fusions rename nodes but keep initializers), and its profiled kernel is checked.
    """
    if not keep:
        return {}
    if settings.provider == "TensorrtExecutionProvider":
        why = ("runs inside a TensorRT engine, whose layer precisions ONNX Runtime does not report; check the "
               "engine with trtexec --profilingVerbosity=detailed")
        return {name: why for name in keep}
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        # "extended": every fusion, but not the CPU's NCHWc layout pass, which renames Convs and their
        # weights after re-laying them out (in FP32: it cannot change a precision).
        session = make_session(built, settings.provider, settings.threads, level="extended",
                               optimized_path=optimized, profile_prefix=str(Path(tmp) / "profile"),
                               precision=target.precision)
        executed = profile_nodes(session, feed)
        opt = onnx.load(str(optimized), load_external_data=False)
    by_name = {n.name: n for n in built.graph.node}
    inits = {i.name for i in built.graph.initializer}
    problems: dict[str, str] = {}
    for name in keep:
        # The node itself, or what a rewrite left in its place (a Gemm becomes <name>_MatMul + <name>_Add).
        stand_ins = [by_name[name]] if name in by_name else [
            n for n in built.graph.node if n.name.startswith(f"{name}_")]
        converted = sorted({n.op_type for n in stand_ins if n.op_type in QUANTIZED_OPS or "Quantize" in n.op_type})
        if not stand_ins or converted:
            problems[name] = f"converted by the target: replaced by {', '.join(converted) or 'other nodes'}"
            continue
        found = [p for n in stand_ins if (p := _check_kept(n, inits, opt, executed, target))]
        if found:
            problems[name] = "; ".join(found)
    return problems


def _check_kept(node: onnx.NodeProto, inits: set[str], opt: onnx.ModelProto, executed: dict[str, Any],
                target: Target) -> str | None:
    outputs, weights = set(node.output), {i for i in node.input if i in inits}
    found = [n for n in opt.graph.node if outputs & set(n.output)]
    found = found or [n for n in opt.graph.node if weights & set(n.input)]
    if not found:
        return "not found in ONNX Runtime's optimized graph"
    ran = [(n.name, executed[n.name]) for n in found if n.name in executed]
    if not ran:
        return "no kernel of it ran (folded away?)"
    bad = [f"{name} ran as {info['op']} on {info['inputs']}" for name, info in ran if not target.ran_fp32(info)]
    return "; ".join(bad) or None


def _progress(settings: DoctorSettings, total: int) -> tuple[Any, Callable[[SearchStep], None]]:
    """A rich progress bar on stderr for the search (or a no-op when progress is off)."""
    if not settings.progress:
        return None, lambda step: None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]doctor[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=Console(stderr=True), transient=False)
    task = bar.add_task("verifying", total=total)

    def advance(step: SearchStep) -> None:
        verdict = "pass" if step.passed else "fail"
        bar.update(task, advance=1, description=f"k={step.k} {verdict} (worst {step.worst:.3g}x limit)")

    return bar, advance


@dataclass
class Diagnosis:
    """What the doctor found, before it is measured for speed and written out."""

    best: Evaluation
    node_errors: list[NodeError]
    ranked: list[str]
    candidates: int
    steps: list[SearchStep]
    instrumented_s: float
    problems: dict[str, str]  # kept nodes that did not run in FP32


def diagnose(model: onnx.ModelProto, target: Target, calib: Sequence[Feeds], refs: Sequence[Feeds],
             settings: DoctorSettings) -> Diagnosis:
    """Instrumented pass, verified search and FP32 confirmation for one target (see the module doc)."""
    start = time.perf_counter()
    converted = target.build(model, [])
    candidates = target.candidates(model, converted)
    node_errors = instrumented_pass(model, converted, candidates, calib, settings)
    ranked = rank(node_errors, candidates)
    instrumented_s = time.perf_counter() - start
    logger.info("instrumented pass: %d candidates of %d nodes in %.1f s", len(candidates),
                len(model.graph.node), instrumented_s)
    bar, on_step = _progress(settings, 1)
    budget = len(ranked) if settings.max_fp32_nodes is None else settings.max_fp32_nodes
    search = Search(model, target, ranked[:budget], calib, refs, settings, on_step)
    if bar is not None:
        bar.update(bar.task_ids[0], total=search.budget)
        bar.start()
    try:
        best = search.prune(search.bisect())
    finally:
        if bar is not None:
            bar.stop()
    problems = confirm_fp32(target, best.model, best.keep, calib[0], settings)
    return Diagnosis(best, node_errors, ranked, len(candidates), search.steps, instrumented_s, problems)


def errors_after(model: onnx.ModelProto, built: onnx.ModelProto, names: Sequence[str], calib: Sequence[Feeds],
                 settings: DoctorSettings) -> dict[str, float]:
    """Each named node's output error in the final model (one instrumented run over few batches)."""
    by_name = {n.name: n for n in model.graph.node}
    tensors = [t for name in names if name in by_name for t in by_name[name].output]
    acc = accumulate(model, built, tensors, list(calib[: max(1, settings.instrument_batches)]), settings.provider,
                     settings.threads)
    out = {}
    for name in names:
        errs = [e for t in by_name[name].output if (e := acc.error(t)) is not None] if name in by_name else []
        if errs:
            out[name] = max(errs)
    return out
