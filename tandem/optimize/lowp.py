"""Convert an FP32 ONNX graph to fp16 or bf16 with an explicit FP32 island for chosen nodes.

Every node runs in the low type unless it is kept (by name or op type) or its output type is fixed
by an attribute (Constant, ConstantOfShape, Random*, ...). Each edge whose producer and consumer run
at different precisions gets one explicit `Cast`, so the FP32 set is visible in the graph itself:
TensorRT builds a strongly typed network from it, and ONNX Runtime cannot silently run those nodes
in fp16. Graph inputs and outputs keep their FP32 types.

onnxconverter-common's `convert_float_to_float16` does the same job but (1.16) emits graphs that
ONNX Runtime rejects for BERT exports (a Cast whose output value_info it retypes), and it has no bf16.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["LOW_TYPES", "convert_low_precision", "float_tensors", "low_nodes"]

LOW_TYPES = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
FLOAT = TensorProto.FLOAT
# Nodes whose float output type comes from an attribute or that only move shapes: they stay FP32 and
# their outputs are cast where a low-precision node reads them.
_FIXED_TYPE_OPS = {"Constant", "ConstantOfShape", "RandomNormal", "RandomUniform", "RandomNormalLike",
                   "RandomUniformLike", "EyeLike", "Shape", "Size"}
# Inputs that the ONNX schemas require in FP32 whatever the data type (sizes, scales, regions).
_FP32_INPUTS = {"Resize": {1, 2}, "Upsample": {1}, "RoiAlign": {1}}


def float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of every FP32 tensor in the graph (inputs, initializers, node outputs), by type inference."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    names = {i.name for i in model.graph.initializer if i.data_type == FLOAT}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if vi.type.tensor_type.elem_type == FLOAT:
            names.add(vi.name)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].t.data_type == FLOAT:
            names.update(node.output)
    return names


def _runs_low(node: onnx.NodeProto, keep: set[str], keep_ops: set[str], floats: set[str]) -> bool:
    if node.name in keep or node.op_type in keep_ops or node.op_type in _FIXED_TYPE_OPS:
        return False
    touches_float = any(t in floats for t in [*node.input, *node.output])
    return touches_float


def low_nodes(model: onnx.ModelProto, keep_ops: Iterable[str] = ()) -> list[str]:
    """Names of the nodes `convert_low_precision` runs in the low type when nothing is kept by name."""
    floats, ops = float_tensors(model), set(keep_ops)
    return [n.name for n in model.graph.node if _runs_low(n, set(), ops, floats)]


def _to_low(array: np.ndarray, low: int) -> TensorProto:
    if low == TensorProto.FLOAT16:
        return numpy_helper.from_array(np.clip(array, -65504, 65504).astype(np.float16))
    import ml_dtypes  # shipped with onnx

    return numpy_helper.from_array(array.astype(ml_dtypes.bfloat16))


class _Builder:
    """Rewrites one graph: low-precision nodes, casts on mixed edges, typed initializers."""

    def __init__(self, model: onnx.ModelProto, low: int, keep: set[str], keep_ops: set[str]) -> None:
        self.model, self.low = model, low
        self.floats = float_tensors(model)
        graph = model.graph
        self.inits = {i.name: i for i in graph.initializer}
        # By position: protobuf hands out a new wrapper object per access, so ids are not stable.
        self.low_nodes = {i for i, n in enumerate(graph.node) if _runs_low(n, keep, keep_ops, self.floats)}
        # Precision at which each float tensor is produced: graph inputs and initializers are FP32.
        self.home: dict[str, int] = {}
        for i, node in enumerate(graph.node):
            for out in node.output:
                if out in self.floats:
                    self.home[out] = low if i in self.low_nodes else FLOAT
        self.casts: dict[tuple[str, int], str] = {}
        self.new_nodes: list[onnx.NodeProto] = []
        self.new_inits: list[TensorProto] = []

    def tensor_as(self, name: str, want: int) -> str:
        """The name of `name` at precision `want`, adding a cast (or a converted initializer) once."""
        have = self.home.get(name, FLOAT)
        if have == want or name not in self.floats:
            return name
        key = (name, want)
        if key not in self.casts:
            suffix = "fp32" if want == FLOAT else "low"
            new = f"{name}__{suffix}"
            if name in self.inits and want == self.low:
                converted = _to_low(numpy_helper.to_array(self.inits[name]), self.low)
                converted.name = new
                self.new_inits.append(converted)
            else:
                self.new_nodes.append(helper.make_node("Cast", [name], [new], name=f"{new}_cast", to=want))
            self.casts[key] = new
        return self.casts[key]

    def rewrite(self) -> None:
        graph = self.model.graph
        nodes: list[onnx.NodeProto] = []
        for i, node in enumerate(graph.node):
            want = self.low if i in self.low_nodes else FLOAT
            for i, name in enumerate(node.input):
                if name:
                    fixed = i in _FP32_INPUTS.get(node.op_type, set())
                    node.input[i] = self.tensor_as(name, FLOAT if fixed else want)
            if node.op_type == "Cast" and want == self.low:
                for attr in node.attribute:
                    if attr.name == "to" and attr.i == FLOAT:
                        attr.i = self.low
            nodes.extend(self.new_nodes)
            self.new_nodes = []
            nodes.append(node)
        for out in graph.output:
            if self.home.get(out.name, FLOAT) != FLOAT:
                self._cast_output(out.name, nodes)
        del graph.node[:]
        graph.node.extend(nodes)
        self._retype_initializers()
        del graph.value_info[:]

    def _cast_output(self, name: str, nodes: list[onnx.NodeProto]) -> None:
        """Rename the low-precision producer of a graph output and cast it back to FP32."""
        low_name = f"{name}__low"
        for node in nodes:
            for i, out in enumerate(node.output):
                if out == name:
                    node.output[i] = low_name
            for i, inp in enumerate(node.input):
                if inp == name:
                    node.input[i] = low_name
        nodes.append(helper.make_node("Cast", [low_name], [name], name=f"{name}__fp32_cast", to=FLOAT))

    def _retype_initializers(self) -> None:
        graph = self.model.graph
        used = {i for n in graph.node for i in n.input}
        kept = [i for i in graph.initializer if i.name in used]
        del graph.initializer[:]
        graph.initializer.extend([*kept, *self.new_inits])


def convert_low_precision(model: onnx.ModelProto, precision: str, keep: Iterable[str] = (),
                          keep_ops: Iterable[str] = ()) -> onnx.ModelProto:
    """A copy of `model` in `precision` ("fp16" or "bf16") with the nodes `keep` (and op types
    `keep_ops`) in FP32; float inputs and outputs stay FP32."""
    if precision not in LOW_TYPES:
        raise ValueError(f"precision must be one of {sorted(LOW_TYPES)}, not {precision!r}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    builder = _Builder(out, LOW_TYPES[precision], set(keep), set(keep_ops))
    builder.rewrite()
    return out
