"""SmoothQuant for dynamic int8: move activation outliers into the weights before quantizing.

Dynamic int8 quantizes each activation tensor with one scale, so a few outlier channels (after
LayerNorm, after GELU) leave the other channels a handful of levels. For every MatMul with a
constant weight W [K, N] reading activation X [..., K], a per-channel factor

    s_k = max|X_k| ** alpha / max_n |W_kn| ** (1 - alpha)        (max over the calibration set)

gives X' = X / s (one `Mul`, shared by the MatMuls that read the same X) and W' = diag(s) W, so
X' W' = X W exactly in FP32 while X' has flat channel ranges (Xiao et al., SmoothQuant, 2023).
The extra Mul is an elementwise pass, cheap beside the MatMul it saves.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from tandem.optimize.runtime import Feeds, expose_outputs, make_session

__all__ = ["DEFAULT_ALPHA", "smooth_matmuls"]

DEFAULT_ALPHA = 0.75  # measured on MiniLM: 0.5 and 0.9 both lose accuracy (see BENCHMARKS.md)
_SUFFIX = "__smooth"


def _groups(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """MatMuls with a 2-D constant weight, grouped by the activation they read."""
    inits = {i.name: i for i in model.graph.initializer}
    groups: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w is not None and len(w.dims) == 2 and w.data_type == onnx.TensorProto.FLOAT:
            groups[node.input[0]].append(node)
    return groups


def _channel_absmax(model: onnx.ModelProto, names: Sequence[str], calib: Sequence[Feeds], provider: str,
                    threads: int) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of each tensor `names`, over the calibration batches."""
    session = make_session(expose_outputs(model, names), provider, threads)
    amax: dict[str, np.ndarray] = {}
    for feed in calib:
        for name, value in zip(names, session.run(list(names), feed)):
            m = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)  # value: [..., K] -> [K]
            amax[name] = np.maximum(amax[name], m) if name in amax else m
    return amax


def smooth_matmuls(model: onnx.ModelProto, calib: Sequence[Feeds], alpha: float = DEFAULT_ALPHA,
                   provider: str = "CPUExecutionProvider", threads: int = 0) -> onnx.ModelProto:
    """A copy of `model` with SmoothQuant factors folded in (equal to it in FP32, up to rounding)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    groups = _groups(out)
    if not groups:
        return out
    amax = _channel_absmax(model, list(groups), calib, provider, threads)
    inits = {i.name: i for i in out.graph.initializer}
    muls: dict[str, onnx.NodeProto] = {}
    for x, nodes in groups.items():
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)  # [K]
        s = (np.maximum(amax[x], 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)).astype(np.float32)
        inv = numpy_helper.from_array((1.0 / s).astype(np.float32), name=f"{x}{_SUFFIX}_inv")
        out.graph.initializer.append(inv)
        muls[x] = helper.make_node("Mul", [x, inv.name], [f"{x}{_SUFFIX}"], name=f"{x}{_SUFFIX}_mul")
        for node, w in zip(nodes, weights):
            name = f"{node.name or node.input[1]}{_SUFFIX}_w"
            scaled = numpy_helper.from_array((w * s[:, None]).astype(np.float32), name=name)
            out.graph.initializer.append(scaled)
            node.input[1] = scaled.name
    _insert_muls(out, muls)
    _drop_unused_initializers(out)
    return out


def _insert_muls(model: onnx.ModelProto, muls: dict[str, onnx.NodeProto]) -> None:
    """Put each Mul right before the first MatMul reading its activation, and rewire the MatMuls."""
    nodes: list[onnx.NodeProto] = []
    placed: set[str] = set()
    for node in model.graph.node:
        x = node.input[0] if node.op_type == "MatMul" and node.input else None
        if x in muls and node.input[1].endswith(f"{_SUFFIX}_w"):
            if x not in placed:
                nodes.append(muls[x])
                placed.add(x)
            node.input[0] = f"{x}{_SUFFIX}"
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
