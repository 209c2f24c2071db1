"""precision.yaml: what the precision doctor found, written for people and read back to re-apply it.

`write_precision_yaml` records a `PrecisionResult` (the FP32 set, the achieved errors, the timings, the search).
`read_precision_yaml` reads back the part needed to rebuild the artefact (a `PrecisionPlan`), and
`resolve_nodes` maps the plan's FP32 nodes onto a model that may have been re-exported since, where node names
and even weight names can change:

    1. by node name;
    2. else by the set of weight inputs, when exactly one node of the same op type has that set;
    3. else by (op type, ordinal): the index among nodes of that op type in graph order.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast, get_args

import onnx
import yaml

from tandem.errors import OptimizeError
from tandem.optimize.types import CheckStat, Fp32Node, PrecisionResult, SearchStep, Timing, Tolerance

__all__ = ["PrecisionPlan", "node_keys", "read_precision_yaml", "resolve_nodes", "write_precision_yaml"]

PathLike = str | os.PathLike[str]

_HEADER = (
    "# precision.yaml: written by `tandem optimize`; the nodes kept in FP32 for target {target}, the errors and\n"
    "# speed they gave. Re-apply with: tandem optimize MODEL --plan precision.yaml\n"
)


# ---------------------------------------------------------------------------------------------------------- write


def _num(x: float | None) -> float | None:
    """Round to 6 significant digits so the file stays readable; None, inf and nan pass through."""
    if x is None or not math.isfinite(x):
        return x
    return float(f"{x:.6g}")


def _node_dict(node: Fp32Node) -> dict[str, Any]:
    return {
        "name": node.name, "op_type": node.op_type, "ordinal": node.ordinal, "weights": list(node.weights),
        "reason": node.reason, "error_before": _num(node.error_before), "error_after": _num(node.error_after),
    }


def _timing_dict(t: Timing | None) -> dict[str, Any] | None:
    if t is None:
        return None
    return {"batch": t.batch, "latency_ms": _num(t.latency_ms), "throughput": _num(t.throughput)}


def _step_dict(s: SearchStep) -> dict[str, Any]:
    return {"k": s.k, "passed": s.passed, "worst": _num(s.worst), "seconds": _num(s.seconds)}


def _result_dict(result: PrecisionResult, model_path: str, source: str) -> dict[str, Any]:
    """The whole result as plain YAML-able data, in reading order."""
    tol = result.tolerance
    return {
        "target": result.target,
        "provider": result.provider,
        "tolerance": {"atol": _num(tol.atol), "rtol": _num(tol.rtol), "check_error_stat": tol.stat},
        "met": result.met,
        "fp32_nodes": [_node_dict(n) for n in result.fp32_nodes],
        "excluded_ops": list(result.excluded_ops),
        "outputs": [
            {"name": o.name, "abs_err": _num(o.abs_err), "rel_err": _num(o.rel_err), "max_abs": _num(o.max_abs),
             "cosine_mean": _num(o.cosine_mean), "cosine_min": _num(o.cosine_min), "passed": o.passed}
            for o in result.outputs
        ],
        "timing": {
            "fp32": _timing_dict(result.fp32_timing),
            "optimized": _timing_dict(result.timing),
            "speedup": _num(result.speedup),
        },
        "search": {
            "candidates": result.candidates,
            "verification_runs": len(result.search),
            "instrumented_s": _num(result.instrumented_s),
            "wall_s": _num(result.wall_s),
            "steps": [_step_dict(s) for s in result.search],
        },
        "verified_fp32": result.verified_fp32,
        "note": result.note,
        "versions": dict(result.versions),
        "model": model_path,
        "source": source,
    }


def write_precision_yaml(result: PrecisionResult, path: PathLike, *, model_path: str, source: str) -> None:
    """Write `result` to `path` as a commented, human-readable precision.yaml."""
    body = yaml.safe_dump(
        _result_dict(result, model_path, source), sort_keys=False, default_flow_style=False, allow_unicode=True,
        width=120,
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_HEADER.format(target=result.target) + body, encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------- read


@dataclass
class PrecisionPlan:
    """The part of a precision.yaml needed to rebuild the artefact: target, tolerance and the FP32 set.

    An FP32 node read without an `ordinal` gets -1: it is then matched by name or weights only.
    """

    target: str
    tolerance: Tolerance
    fp32_nodes: list[Fp32Node]
    excluded_ops: list[str] = field(default_factory=list)


class _Fields:
    """Typed access to one mapping of the YAML; each error names the field and the file."""

    def __init__(self, data: Mapping[str, Any], where: str, path: Path) -> None:
        self.data, self.where, self.path = data, where, path

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, want: str) -> OptimizeError:
        value = self.data.get(key)
        got = "nothing" if value is None else type(value).__name__
        return OptimizeError(
            f"{self.path}: field `{self._name(key)}` must be {want}, got {got}; "
            "fix the file or write it again with `tandem optimize`"
        )

    def get(self, key: str, kinds: tuple[type, ...], want: str, default: Any = ...) -> Any:
        """The value at `key`, checked against `kinds` (bool is never taken for a number)."""
        if key not in self.data or self.data[key] is None:
            if default is ...:
                raise self.fail(key, want)
            return default
        value = self.data[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise self.fail(key, want)
        return value

    def str_list(self, key: str) -> list[str]:
        value = self.get(key, (list,), "a list of strings", default=[])
        if not all(isinstance(v, str) for v in value):
            raise self.fail(key, "a list of strings")
        return list(value)

    def mapping(self, key: str) -> _Fields:
        return _Fields(self.get(key, (dict,), "a mapping"), self._name(key), self.path)

    def mappings(self, key: str) -> list[_Fields]:
        items = self.get(key, (list,), "a list of mappings")
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise OptimizeError(f"{self.path}: `{self._name(key)}[{i}]` must be a mapping with name and op_type")
        return [_Fields(item, f"{self._name(key)}[{i}]", self.path) for i, item in enumerate(items)]


def _read_tolerance(f: _Fields) -> Tolerance:
    stat = f.get("check_error_stat", (str,), "one of mean, median, max", default="mean")
    if stat not in get_args(CheckStat):
        raise f.fail("check_error_stat", "one of mean, median, max")
    return Tolerance(
        atol=float(f.get("atol", (int, float), "a number")),
        rtol=float(f.get("rtol", (int, float), "a number")),
        stat=cast(CheckStat, stat),
    )


def _read_node(f: _Fields) -> Fp32Node:
    after = f.get("error_after", (int, float), "a number or null", default=None)
    return Fp32Node(
        name=f.get("name", (str,), "a string"),
        op_type=f.get("op_type", (str,), "a string"),
        reason=f.get("reason", (str,), "a string", default=""),
        error_before=float(f.get("error_before", (int, float), "a number", default=0.0)),
        error_after=None if after is None else float(after),
        ordinal=f.get("ordinal", (int,), "an integer", default=-1),
        weights=f.str_list("weights"),
    )


def read_precision_yaml(path: PathLike) -> PrecisionPlan:
    """Read the plan part of a precision.yaml; raises OptimizeError naming the file and the bad field."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OptimizeError(f"precision plan {p} does not exist; write one with `tandem optimize`") from None
    except (OSError, UnicodeDecodeError) as e:
        raise OptimizeError(f"cannot read precision plan {p}: {e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise OptimizeError(f"{p} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise OptimizeError(f"{p}: a precision plan must be a YAML mapping with target, tolerance and fp32_nodes")
    top = _Fields(data, "", p)
    return PrecisionPlan(
        target=top.get("target", (str,), "a string"),
        tolerance=_read_tolerance(top.mapping("tolerance")),
        fp32_nodes=[_read_node(f) for f in top.mappings("fp32_nodes")],
        excluded_ops=top.str_list("excluded_ops"),
    )


# -------------------------------------------------------------------------------------------------------- resolve


def _weight_names(model: onnx.ModelProto) -> set[str]:
    """Tensors that are weights: initializers and outputs of Constant nodes."""
    graph = model.graph
    names = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    names.update(out for n in graph.node if n.op_type == "Constant" for out in n.output)
    return names


def _keys(model: onnx.ModelProto) -> list[tuple[str, str, int, frozenset[str]]]:
    """(name, op_type, ordinal, weight inputs) for every node of the main graph, in graph order."""
    weights = _weight_names(model)
    seen: dict[str, int] = {}
    keys = []
    for node in model.graph.node:
        ordinal = seen.get(node.op_type, 0)
        seen[node.op_type] = ordinal + 1
        keys.append((node.name, node.op_type, ordinal, frozenset(i for i in node.input if i in weights)))
    return keys


def node_keys(model: onnx.ModelProto, names: Sequence[str]) -> list[tuple[str, int, list[str]]]:
    """(op_type, ordinal, sorted weight inputs) for each named node; these let a plan survive a re-export."""
    by_name = {k[0]: k for k in _keys(model) if k[0]}
    out = []
    for name in names:
        if name not in by_name:
            raise OptimizeError(f"node {name!r} is not in the model's graph")
        _, op_type, ordinal, weights = by_name[name]
        out.append((op_type, ordinal, sorted(weights)))
    return out


def _describe(node: Fp32Node) -> str:
    weights = ", ".join(node.weights) or "none"
    return f"{node.name} ({node.op_type} #{node.ordinal}, weights: {weights})"


def resolve_nodes(model: onnx.ModelProto, nodes: list[Fp32Node]) -> tuple[list[str], list[str]]:
    """Map plan nodes onto `model`: by name, else unique weight set, else (op_type, ordinal).

    Each rule runs over the whole plan before the next one, and a model node is matched at most once, so the
    result does not depend on the order of the plan. Unnamed model nodes are never matched: the converters
    exclude nodes by name. Returns (model node names in plan order, unmatched entries
    described for a message).
    """
    keys = _keys(model)
    names = {k[0] for k in keys if k[0]}
    found: dict[int, str] = {}  # plan index -> model node name
    used: set[str] = set()

    def take(i: int, name: str) -> None:
        found[i] = name
        used.add(name)

    for i, node in enumerate(nodes):
        if node.name in names and node.name not in used:
            take(i, node.name)
    for i, node in enumerate(nodes):
        if i in found or not node.weights:
            continue
        hits = [k[0] for k in keys if k[1] == node.op_type and k[3] == frozenset(node.weights)]
        if len(hits) == 1 and hits[0] and hits[0] not in used:
            take(i, hits[0])
    for i, node in enumerate(nodes):
        if i in found or node.ordinal < 0:
            continue
        hits = [k[0] for k in keys if k[1] == node.op_type and k[2] == node.ordinal]
        if hits and hits[0] and hits[0] not in used:
            take(i, hits[0])
    matched = [found[i] for i in sorted(found)]
    unmatched = [_describe(n) for i, n in enumerate(nodes) if i not in found]
    return matched, unmatched
