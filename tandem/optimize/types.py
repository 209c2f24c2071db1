"""Plain data the optimizer passes between its parts and writes into precision.yaml and the report.

Every number here was measured: errors over the calibration set, timings on the target runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "CheckStat", "Fp32Node", "NodeError", "OutputError", "PrecisionResult", "SearchStep", "Timing", "Tolerance",
]

CheckStat = Literal["mean", "median", "max"]


@dataclass(frozen=True)
class Tolerance:
    """Polygraphy's rule, per output: pass when stat(|a - b|) <= atol or stat(|a - b| / |b|) <= rtol.

    `stat` is taken over every element of the output across the whole calibration set.
    """

    atol: float = 1e-3
    rtol: float = 1e-2
    stat: CheckStat = "mean"


@dataclass
class OutputError:
    """How far one output of a converted model is from the FP32 model over the calibration set."""

    name: str
    abs_err: float  # tolerance.stat of |a - b|
    rel_err: float  # tolerance.stat of |a - b| / |b|
    max_abs: float
    passed: bool
    cosine_mean: float | None = None  # rows as vectors (set for float outputs with a batch dim)
    cosine_min: float | None = None


@dataclass
class NodeError:
    """One node of the instrumented pass: the error of its output when the whole graph is converted."""

    name: str
    op_type: str
    index: int  # position in topological order
    error: float  # relative L2 error of the node's output against FP32, mean over the calibration set
    growth: float  # the error this node adds by itself (see instrument.py)
    candidate: bool  # the target converts this node, so it may be kept in FP32


@dataclass
class Fp32Node:
    """A node the doctor keeps in FP32, and why."""

    name: str
    op_type: str
    reason: str
    error_before: float  # its output's error with the whole graph converted
    error_after: float | None = None  # its output's error in the final model
    ordinal: int = 0  # index among nodes of the same op_type (to re-apply after a re-export)
    weights: list[str] = field(default_factory=list)  # initializer inputs (to re-apply after a re-export)


@dataclass
class SearchStep:
    """One verification run on the un-instrumented model: keep the top `k` ranked nodes in FP32."""

    k: int
    passed: bool
    worst: float  # the largest error/limit ratio over the outputs (<= 1 passes)
    seconds: float


@dataclass
class Timing:
    """Latency at batch 1 and throughput at the batch size measured, on the target runtime."""

    batch: int
    latency_ms: float  # median, batch 1
    throughput: float  # items per second at `batch`


@dataclass
class PrecisionResult:
    """What the doctor found for one target: the FP32 set, the achieved errors, the speed."""

    target: str  # e.g. "int8-dynamic", "fp16", "bf16", "int8-static"
    provider: str  # ONNX Runtime execution provider the artefact was measured on
    tolerance: Tolerance
    met: bool  # every output within tolerance
    fp32_nodes: list[Fp32Node]
    excluded_ops: list[str]  # op types the target never converts
    outputs: list[OutputError]  # achieved, final model
    node_errors: list[NodeError]  # instrumented pass, for the ranking and the plot
    candidates: int  # nodes the target converts (n of the search)
    search: list[SearchStep]
    fp32_timing: Timing | None = None
    timing: Timing | None = None
    versions: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0
    instrumented_s: float = 0.0
    verified_fp32: bool = False  # every requested FP32 node was found running in FP32 after building
    note: str = ""  # e.g. why the tolerance could not be met, or why the artefact was refused

    @property
    def speedup(self) -> float | None:
        """Throughput of the artefact over FP32 on the same runtime."""
        if self.fp32_timing is None or self.timing is None or self.fp32_timing.throughput <= 0:
            return None
        return self.timing.throughput / self.fp32_timing.throughput
