"""The doctor's instrumented pass: where error appears along the graph, and what each node adds.

Two graphs run over the same calibration batches:

- the fully converted graph with every float tensor as an output: compared with the FP32 graph's
  tensors, it gives the error as it accumulates along the graph (the report's plot);
- a "local" graph: the FP32 graph plus, for every candidate node, a copy of the subgraph the target
  replaced it with, fed by the FP32 tensors. Comparing each copy's output with the FP32 output gives
  the error the node adds by itself, free of what its inputs inherited. That is the ranking key:
  propagated error would blame a node for its parents' error (a GELU output already noisy makes
  the FFN's second MatMul look harmless, while quantizing its outlier-heavy input is the real cost).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import onnx
from onnx import helper

from tandem.optimize.compare import NodeErrorAccumulator
from tandem.optimize.lowp import float_tensors
from tandem.optimize.runtime import Feeds, expose_outputs, make_session, run_batches
from tandem.optimize.types import NodeError

__all__ = ["accumulate", "local_graph", "node_errors"]

_LOCAL = "__local"


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    types = {i.name: i.data_type for i in model.graph.initializer}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


class _Splicer:
    """Copies, per candidate output, the converted subgraph computing it back to FP32-graph tensors."""

    def __init__(self, model: onnx.ModelProto, converted: onnx.ModelProto) -> None:
        self.fp32_tensors = {t for n in model.graph.node for t in n.output} | {i.name for i in model.graph.input}
        self.fp32_inits = {i.name: i for i in model.graph.initializer}
        self.producer = {t: n for n in converted.graph.node for t in n.output}
        self.inits = {i.name: i for i in converted.graph.initializer}
        self.fp32_types, self.types = _types(model), _types(converted)
        self.nodes: list[onnx.NodeProto] = []
        self.new_inits: dict[str, onnx.TensorProto] = {}

    def _name(self, t: str, tag: str, internal: set[str]) -> str:
        return f"{t}{_LOCAL}{tag}" if t in internal else t

    def splice(self, out: str, tag: str) -> str | None:
        """Add the copy computing `out`; returns its local output name (None if nothing was replaced)."""
        found: list[onnx.NodeProto] = []
        stack, seen = [out], set()
        while stack:
            t = stack.pop()
            if t in seen or not t:
                continue
            seen.add(t)
            if t != out and (t in self.fp32_tensors or t in self.inits):
                continue
            node = self.producer.get(t)
            if node is None:
                return None
            if node not in found:
                found.append(node)
                stack.extend(node.input)
        internal = {t for n in found for t in n.output}
        order = {id(n): i for i, n in enumerate(self.producer.values())}
        for node in sorted(found, key=lambda n: order[id(n)]):
            self._copy(node, tag, internal)
        return f"{out}{_LOCAL}{tag}"

    def _copy(self, node: onnx.NodeProto, tag: str, internal: set[str]) -> None:
        inputs = []
        for t in node.input:
            if t in internal or not t:
                inputs.append(self._name(t, tag, internal))
            elif t in self.inits:
                inputs.append(self._init(t))
            else:
                inputs.append(self._boundary(t, tag))
        copy = helper.make_node(node.op_type, inputs, [self._name(t, tag, internal) for t in node.output],
                                name=f"{node.name}{_LOCAL}{tag}", domain=node.domain)
        copy.attribute.extend(node.attribute)
        self.nodes.append(copy)

    def _init(self, t: str) -> str:
        same = t in self.fp32_inits and self.fp32_inits[t].data_type == self.inits[t].data_type
        if same and self.fp32_inits[t].dims == self.inits[t].dims:
            return t
        name = f"{t}{_LOCAL}"
        if name not in self.new_inits:
            init = onnx.TensorProto()
            init.CopyFrom(self.inits[t])
            init.name = name
            self.new_inits[name] = init
        return name

    def _boundary(self, t: str, tag: str) -> str:
        """An FP32 tensor read by the copy, cast when the converted graph holds it in another type."""
        want, have = self.types.get(t), self.fp32_types.get(t)
        if want is None or have is None or want == have:
            return t
        cast = f"{t}{_LOCAL}{tag}_cast"
        self.nodes.append(helper.make_node("Cast", [t], [cast], name=cast, to=want))
        return cast


def local_graph(model: onnx.ModelProto, converted: onnx.ModelProto,
                candidates: Sequence[str]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The FP32 graph plus each candidate's converted copy; returns it and {FP32 tensor: local copy}."""
    splicer = _Splicer(model, converted)
    floats = float_tensors(model)
    by_name = {n.name: n for n in model.graph.node}
    pairs: dict[str, str] = {}
    for i, name in enumerate(candidates):
        node = by_name.get(name)
        for out in node.output if node is not None else []:
            if out in floats and out in splicer.producer:
                local = splicer.splice(out, str(i))
                if local is not None:
                    pairs[out] = local
    combined = onnx.ModelProto()
    combined.CopyFrom(model)
    combined.graph.node.extend(splicer.nodes)
    combined.graph.initializer.extend(splicer.new_inits.values())
    have = {o.domain for o in combined.opset_import}
    combined.opset_import.extend(o for o in converted.opset_import if o.domain not in have)
    return combined, pairs


def _run_pairs(ref_session: Any, got_session: Any, names: Sequence[str], pairs: dict[str, str],
               batches: Sequence[Feeds]) -> tuple[NodeErrorAccumulator, NodeErrorAccumulator]:
    """Per batch, one run of each session: `names` compared across the two sessions (propagated error),
    and each `pairs` key compared with its local copy inside the reference session (local error)."""
    propagated, local = NodeErrorAccumulator(), NodeErrorAccumulator()
    wanted = [*dict.fromkeys([*names, *pairs, *pairs.values()])]
    for feed in batches:
        ref = run_batches(ref_session, [feed], wanted)[0]
        got = run_batches(got_session, [feed], names)[0] if names else {}
        for name in names:
            propagated.add(name, ref[name], got[name])
        for name, copy in pairs.items():
            local.add(name, ref[name], ref[copy])
    return propagated, local


def accumulate(model: onnx.ModelProto, converted: onnx.ModelProto, names: Sequence[str],
               batches: Sequence[Feeds], provider: str, threads: int) -> NodeErrorAccumulator:
    """Run both graphs with `names` as extra outputs and accumulate each tensor's error."""
    have = {t for n in converted.graph.node for t in n.output}
    names = [n for n in names if n in have]
    ref_session = make_session(expose_outputs(model, names), provider, threads)
    got_session = make_session(expose_outputs(converted, names), provider, threads)
    return _run_pairs(ref_session, got_session, names, {}, batches)[0]


def node_errors(model: onnx.ModelProto, converted: onnx.ModelProto, candidates: Sequence[str],
                batches: Sequence[Feeds], provider: str, threads: int) -> list[NodeError]:
    """Per node in graph order: the propagated error of its output, and the error it adds (`growth`).

    The local graph holds the whole FP32 graph, so its run gives the reference tensors for both
    comparisons: the FP32 graph runs once per batch, not twice.
    """
    floats = float_tensors(model)
    outputs = {o.name for o in model.graph.output}
    have = {t for n in converted.graph.node for t in n.output}
    tensors = [t for n in model.graph.node for t in n.output if t in floats and t not in outputs and t in have]
    combined, pairs = local_graph(model, converted, candidates)
    ref_session = make_session(expose_outputs(combined, [*tensors, *pairs, *pairs.values()]), provider, threads)
    got_session = make_session(expose_outputs(converted, tensors), provider, threads)
    acc, local_acc = _run_pairs(ref_session, got_session, tensors, pairs, batches)
    local = {t: e for t in pairs if (e := local_acc.error(t)) is not None}
    is_candidate, produced = set(candidates), dict[str, float]()
    result = []
    for index, node in enumerate(model.graph.node):
        errs = [e for t in node.output if (e := acc.error(t)) is not None]
        if not errs:
            continue
        error = max(errs)
        upstream = max((produced.get(t, 0.0) for t in node.input), default=0.0)
        produced.update({t: error for t in node.output})
        own = [local[t] for t in node.output if t in local]
        growth = max(own) if own else error - upstream
        result.append(NodeError(node.name, node.op_type, index, error, growth, node.name in is_candidate))
    return result
