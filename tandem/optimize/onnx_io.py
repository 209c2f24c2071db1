"""Read, check, describe and write ONNX files.

`load_onnx` turns every way a file can be bad (missing, truncated, not ONNX, failing the checker,
external weights gone) into one `InvalidOnnx` that names the path. `signature_of` describes a graph's
inputs and outputs as plain `TensorInfo`s (numpy dtype names, symbolic dims as strings), and
`check_feeds` says exactly which input a set of arrays gets wrong. `save_onnx` writes one file, or an
external-data file beside it once the weights pass what protobuf can hold. `set_io_names` renames a
graph's inputs and outputs without creating duplicate names (see its docstring for why that matters).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper

from tandem.errors import InvalidOnnx

__all__ = [
    "SINGLE_FILE_LIMIT", "GraphSignature", "TensorInfo", "check_feeds", "load_onnx", "save_onnx",
    "set_io_names", "signature_of",
]

# Weights above this go to `<file>.data`: protobuf cannot serialise a message over 2 GiB, and the
# graph itself needs some room.
SINGLE_FILE_LIMIT = 1_800_000_000

Dim = int | str  # a fixed size, or the name of a symbolic (dynamic) dimension


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output: its name, numpy dtype name and shape.

    `shape` holds an int per fixed dimension and a string per dynamic one ("batch", "seq"; "?" when
    the graph gives no name); it is None when the graph does not say the rank.
    """

    name: str
    dtype: str  # numpy dtype name: "float32", "int64", "bool", "bfloat16", ...
    shape: tuple[Dim, ...] | None

    def describe(self) -> str:
        """`input_ids: int64[batch, seq]`."""
        dims = "?" if self.shape is None else ", ".join(str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"

    @property
    def dynamic_axes(self) -> dict[int, str]:
        """Axis index -> symbolic name, for the dynamic axes only."""
        return {i: d for i, d in enumerate(self.shape or ()) if isinstance(d, str)}


@dataclass
class GraphSignature:
    """The inputs (initializers excluded) and outputs of a graph, in graph order."""

    inputs: list[TensorInfo] = field(default_factory=list)
    outputs: list[TensorInfo] = field(default_factory=list)

    def describe_inputs(self) -> str:
        """`input_ids: int64[batch, seq], attention_mask: int64[batch, seq]`."""
        return ", ".join(info.describe() for info in self.inputs) or "(none)"


# ---------------------------------------------------------------------------------------------- load


def load_onnx(path: str | Path, *, load_external_data: bool = True) -> onnx.ModelProto:
    """Parse and check the ONNX file at `path`; raise `InvalidOnnx` naming the path and the fault.

    The checker runs on the path, so models over 2 GB with external data are checked too. With
    `load_external_data=False` the weights stay on disk (their files are still checked to exist).
    """
    path = Path(path)
    if not path.exists():
        raise InvalidOnnx(f"{path}: no such file. Fix: pass the path of an existing .onnx file.")
    if not path.is_file():
        raise InvalidOnnx(f"{path} is not a file. Fix: pass the path of the .onnx file itself.")
    model = _parse(path)
    _check_external_files(model, path)
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # ValidationError, or the C++ checker's other errors
        raise InvalidOnnx(f"{path} fails the ONNX checker: {_first_line(exc)}. "
                          "Fix: re-export the model, or repair the graph the checker names.") from None
    if load_external_data and _uses_external_data(model):
        try:
            external_data_helper.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:
            raise InvalidOnnx(f"{path}: cannot read its external data: {_first_line(exc)}. "
                              "Fix: copy the .data file(s) saved with the model next to it.") from None
    return model


def _parse(path: Path) -> onnx.ModelProto:
    """The protobuf of `path`, without external weights; InvalidOnnx when it is not an ONNX model."""
    bad = f"{path} is not a valid ONNX model (corrupt or truncated?)"
    fix = "Fix: re-export or re-download the file."
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError, RuntimeError: whatever the protobuf parser raises
        raise InvalidOnnx(f"{bad}: {_first_line(exc) or type(exc).__name__}. {fix}") from None
    if model.ir_version == 0 or not model.HasField("graph"):
        raise InvalidOnnx(f"{bad}: it parses as a protobuf, but has no IR version or no graph. {fix}")
    return model


def _check_external_files(model: onnx.ModelProto, path: Path) -> None:
    """Every external-data file the model names exists next to it and is long enough."""
    for tensor in _tensors_of_model(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        data = path.parent / info.location
        if not data.is_file():
            raise InvalidOnnx(f"{path}: external data file {info.location!r} (weights of tensor "
                              f"{tensor.name!r}) is missing. Fix: copy it next to {path.name}.")
        end = (info.offset or 0) + (info.length or 0)
        if end > data.stat().st_size:
            raise InvalidOnnx(f"{path}: external data file {info.location!r} is truncated: tensor "
                              f"{tensor.name!r} ends at byte {end}, the file has {data.stat().st_size}. "
                              "Fix: copy the complete file again.")


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(external_data_helper.uses_external_data(t) for t in _tensors_of_model(model))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


# ---------------------------------------------------------------------------------------------- save


def save_onnx(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write `model` to `path`: one file when its tensors are under 1.8 GB, else `<name>.data` beside it.

    `model` is left as it was (its weights are read back after an external-data save).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    if _tensor_bytes(model) < SINGLE_FILE_LIMIT:
        onnx.save_model(model, str(path))
        return path
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    external_data_helper.load_external_data_for_model(model, str(path.parent))
    return path


def _tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes held in the model's tensors (summed per tensor: the whole may be over protobuf's limit)."""
    return sum(t.ByteSize() for t in _tensors_of_model(model))


def _tensors_of_model(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from _tensors_of_graph(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _tensors_of_node(node)


def _tensors_of_graph(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        yield from _tensors_of_node(node)


def _tensors_of_node(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        for graph in _attribute_graphs(attr):
            yield from _tensors_of_graph(graph)


def _attribute_graphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    return ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)


# ----------------------------------------------------------------------------------------- signature


def signature_of(model: onnx.ModelProto) -> GraphSignature:
    """The graph's inputs (those that are not initializers) and outputs as `TensorInfo`s."""
    weights = {t.name for t in model.graph.initializer}
    return GraphSignature(
        inputs=[_tensor_info(v) for v in model.graph.input if v.name not in weights],
        outputs=[_tensor_info(v) for v in model.graph.output],
    )


def _tensor_info(value: onnx.ValueInfoProto) -> TensorInfo:
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        return TensorInfo(value.name, kind or "undefined", None)
    tensor_type = value.type.tensor_type
    try:
        dtype = str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)))
    except (KeyError, TypeError, ValueError):
        dtype = onnx.TensorProto.DataType.Name(tensor_type.elem_type).lower()
    if not tensor_type.HasField("shape"):
        return TensorInfo(value.name, dtype, None)
    dims: list[Dim] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        else:
            dims.append(dim.dim_param or "?")
    return TensorInfo(value.name, dtype, tuple(dims))


def check_feeds(signature: GraphSignature, feeds: Mapping[str, np.ndarray]) -> None:
    """Raise `InvalidOnnx` listing every way `feeds` does not fit the graph's inputs.

    Checks names (missing, unknown), dtypes, ranks, fixed dims, and that dims sharing a symbolic
    name ("batch") have one size across the inputs.
    """
    expected = {info.name: info for info in signature.inputs}
    problems = [f"input {name!r} is missing" for name in expected if name not in feeds]
    problems += [f"unknown input {name!r}" for name in feeds if name not in expected]
    symbols: dict[str, tuple[str, int]] = {}  # dim name -> (first input with it, its size)
    for name, array in feeds.items():
        if name in expected:
            problems += _feed_problems(expected[name], np.asarray(array), symbols)
    if problems:
        raise InvalidOnnx(f"{'; '.join(problems)} (the graph's inputs: {signature.describe_inputs()}). "
                          "Fix: feed exactly these names with these dtypes and shapes.")


def _feed_problems(info: TensorInfo, array: np.ndarray, symbols: dict[str, tuple[str, int]]) -> list[str]:
    where = f"input {info.name!r}"
    problems = []
    if str(array.dtype) != info.dtype:
        problems.append(f"{where}: dtype {array.dtype}, the graph expects {info.dtype}")
    if info.shape is None:
        return problems
    if array.ndim != len(info.shape):
        return problems + [f"{where}: rank {array.ndim} (shape {list(array.shape)}), the graph expects "
                           f"rank {len(info.shape)} ({info.describe()})"]
    for axis, (size, dim) in enumerate(zip(array.shape, info.shape)):
        if isinstance(dim, int) and size != dim:
            problems.append(f"{where}: dim {axis} is {size}, the graph fixes it to {dim}")
        elif isinstance(dim, str) and dim != "?":
            first, first_size = symbols.setdefault(dim, (info.name, size))
            if size != first_size:
                problems.append(f"{where}: dim {axis} ({dim!r}) is {size}, but input {first!r} has "
                                f"{dim!r} = {first_size}")
    return problems


# -------------------------------------------------------------------------------------------- rename


def set_io_names(model: onnx.ModelProto, inputs: Sequence[str] | None = None,
                 outputs: Sequence[str] | None = None) -> None:
    """Rename the graph's inputs and outputs (in order) in place, keeping every name unique.

    The dynamo exporter names values after FX nodes, so asking it for `output_names=["embedding"]`
    can give an invalid graph where an intermediate value is already called `embedding` ("Duplicate
    definition of name"). Here a value that already holds a wanted name is renamed first.
    """
    graph = model.graph
    if inputs is not None:
        current = [v.name for v in graph.input if v.name not in {t.name for t in graph.initializer}]
        _check_count("inputs", current, inputs)
        for old, new in zip(current, inputs):
            _rename_one(graph, old, new)
    if outputs is not None:
        _check_count("outputs", [v.name for v in graph.output], outputs)
        _separate_outputs(graph)
        for index, new in enumerate(outputs):
            _rename_one(graph, graph.output[index].name, new)


def _check_count(kind: str, current: Sequence[str], wanted: Sequence[str]) -> None:
    if len(current) != len(wanted):
        raise InvalidOnnx(f"cannot name the graph's {kind} {list(wanted)}: the graph has {len(current)} "
                          f"{kind} ({current}). Fix: pass one name per {kind[:-1]}.")


def _separate_outputs(graph: onnx.GraphProto) -> None:
    """Give each output its own value: an output that is a graph input, a weight or another output
    gets an Identity node, so renaming it renames nothing else."""
    taken = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    for output in graph.output:
        if output.name in taken:
            fresh = _unique_name(graph, output.name + "_out")
            graph.node.append(onnx.helper.make_node("Identity", [output.name], [fresh],
                                                    name=_unique_name(graph, "Identity_" + fresh)))
            output.name = fresh
        taken.add(output.name)


def _rename_one(graph: onnx.GraphProto, old: str, new: str) -> None:
    if old == new:
        return
    if new in _names_of_graph(graph):
        _rename_value(graph, new, _unique_name(graph, new))
    _rename_value(graph, old, new)


def _unique_name(graph: onnx.GraphProto, base: str) -> str:
    names = _names_of_graph(graph)
    index = 1
    while f"{base}_{index}" in names:
        index += 1
    return f"{base}_{index}"


def _names_of_graph(graph: onnx.GraphProto) -> set[str]:
    """Every value and node name of `graph` and its subgraphs."""
    names = {v.name for v in (*graph.input, *graph.output, *graph.value_info)}
    names |= {t.name for t in graph.initializer} | {s.values.name for s in graph.sparse_initializer}
    for node in graph.node:
        names |= set(node.input) | set(node.output) | {node.name}
        for attr in node.attribute:
            for sub in _attribute_graphs(attr):
                names |= _names_of_graph(sub)
    names.discard("")
    return names


def _rename_value(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename value `old` to `new` everywhere in `graph`, subgraphs (which may read it) included."""
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.name == old:
            value.name = new
    for tensor in graph.initializer:
        if tensor.name == old:
            tensor.name = new
    for sparse in graph.sparse_initializer:
        if sparse.values.name == old:
            sparse.values.name = new
    for node in graph.node:
        _rename_in_node(node, old, new)


def _rename_in_node(node: onnx.NodeProto, old: str, new: str) -> None:
    for ports in (node.input, node.output):
        for index, name in enumerate(ports):
            if name == old:
                ports[index] = new
    for attr in node.attribute:
        for sub in _attribute_graphs(attr):
            _rename_value(sub, old, new)
