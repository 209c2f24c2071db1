"""Error statistics between a converted model's outputs and the FP32 reference.

`output_errors` judges whole outputs against a `Tolerance` (Polygraphy's rule: an output passes
when the chosen statistic of the absolute error is within atol or that of the relative error is
within rtol). `NodeErrorAccumulator` keeps a running relative L2 error per tensor for the
instrumented pass without holding any tensor in memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tandem.optimize.types import OutputError, Tolerance

__all__ = ["NodeErrorAccumulator", "output_errors", "passes", "worst_ratio"]

_EPS = 1e-12


def _stat(values: np.ndarray, stat: str) -> float:
    if values.size == 0:
        return 0.0
    if stat == "mean":
        return float(values.mean())
    if stat == "median":
        return float(np.median(values))
    return float(values.max())


def _cosines(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row (the batch dim) treated as one vector."""
    r = ref.reshape(ref.shape[0], -1).astype(np.float64)
    g = got.reshape(got.shape[0], -1).astype(np.float64)
    num = (r * g).sum(axis=1)
    den = np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1)
    return np.where(den > 0, num / np.maximum(den, _EPS), 1.0)


def _one_output(name: str, refs: Sequence[np.ndarray], gots: Sequence[np.ndarray], tol: Tolerance) -> OutputError:
    ref = np.concatenate([r.reshape(-1) for r in refs]).astype(np.float64)
    got = np.concatenate([g.reshape(-1) for g in gots]).astype(np.float64)
    absdiff = np.abs(got - ref)
    absdiff = np.where(np.isnan(absdiff), np.inf, absdiff)
    reldiff = absdiff / np.maximum(np.abs(ref), _EPS)
    abs_err, rel_err = _stat(absdiff, tol.stat), _stat(reldiff, tol.stat)
    passed = abs_err <= tol.atol or rel_err <= tol.rtol
    error = OutputError(name, abs_err, rel_err, float(absdiff.max(initial=0.0)), passed)
    if refs and np.issubdtype(refs[0].dtype, np.floating) and refs[0].ndim >= 2:
        cos = np.concatenate([_cosines(r, g) for r, g in zip(refs, gots)])
        error.cosine_mean, error.cosine_min = float(cos.mean()), float(cos.min())
    return error


def output_errors(refs: Sequence[dict[str, np.ndarray]], gots: Sequence[dict[str, np.ndarray]],
                  tol: Tolerance) -> list[OutputError]:
    """Per output, the error of `gots` against `refs` (one dict per calibration batch)."""
    names = list(refs[0]) if refs else []
    return [_one_output(n, [r[n] for r in refs], [g[n] for g in gots], tol) for n in names]


def worst_ratio(errors: Sequence[OutputError], tol: Tolerance) -> float:
    """The largest error/limit over the outputs, taking the kinder of abs and rel (<= 1 passes)."""
    ratios = []
    for e in errors:
        r_abs = e.abs_err / tol.atol if tol.atol > 0 else (0.0 if e.abs_err == 0 else np.inf)
        r_rel = e.rel_err / tol.rtol if tol.rtol > 0 else (0.0 if e.rel_err == 0 else np.inf)
        ratios.append(min(r_abs, r_rel))
    return float(max(ratios, default=0.0))


def passes(errors: Sequence[OutputError]) -> bool:
    return all(e.passed for e in errors)


class NodeErrorAccumulator:
    """Running relative L2 error per tensor: sqrt(sum |a - b|^2 / sum |b|^2) over every batch."""

    def __init__(self) -> None:
        self.diff: dict[str, float] = {}
        self.norm: dict[str, float] = {}

    def add(self, name: str, ref: np.ndarray, got: np.ndarray) -> None:
        if ref.shape != got.shape:
            return  # a converted graph may reshape differently; such tensors are not comparable
        r = ref.astype(np.float64, copy=False)
        d = got.astype(np.float64) - r
        d = np.where(np.isfinite(d), d, 1e30)
        self.diff[name] = self.diff.get(name, 0.0) + float(np.square(d).sum())
        self.norm[name] = self.norm.get(name, 0.0) + float(np.square(r).sum())

    def error(self, name: str) -> float | None:
        if name not in self.diff:
            return None
        return float(np.sqrt(self.diff[name] / max(self.norm[name], _EPS)))
