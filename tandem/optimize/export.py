"""Export a torch module, or a `dict -> dict` callable such as `Model.predict`, to one checked ONNX file.

    detect_signature   run the module on one sample, then on the sample resized along the batch axis,
                       the sequence axis and (images) height and width: the sizes it accepts are dynamic
    export_module      module(**inputs) -> ONNX, dynamo exporter first, TorchScript if dynamo fails;
    export_callable    the same for fn(inputs: dict) -> dict (how `Model.predict` is exported)

Every export is checked in ONNX Runtime against PyTorch on fresh inputs (another batch size and
length than the sample), and a graph that fails the check counts as a failed export. When every
exporter fails, `ExportError` names the unsupported operator and each exporter's first error line.

The dynamo exporter names graph values after FX nodes and the wrapper's `*args`, so its inputs and
outputs are renamed afterwards with `onnx_io.set_io_names` (passing `output_names` to it produced
graphs with duplicate value names).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch

from tandem.errors import ExportError
from tandem.optimize.onnx_io import GraphSignature, TensorInfo, save_onnx, set_io_names, signature_of

__all__ = ["CallableModule", "ExportResult", "Exporter", "detect_signature", "export_callable", "export_module"]

logger = logging.getLogger(__name__)

Exporter = Literal["auto", "dynamo", "torchscript"]
Tensors = dict[str, torch.Tensor]
Runner = Callable[[Tensors], Tensors]

TORCHSCRIPT_OPSET = 17
_ORDER: dict[str, tuple[str, ...]] = {
    "auto": ("dynamo", "torchscript"), "dynamo": ("dynamo",), "torchscript": ("torchscript",),
}
_QUIET_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "torch.fx", "onnxscript", "onnx_ir")


@dataclass
class ExportResult:
    """A checked ONNX file and how it was made."""

    path: Path
    exporter: str  # "dynamo" or "torchscript"
    signature: GraphSignature  # of the written graph
    check_max_abs_err: float | None  # largest |onnx - torch| on the fresh inputs; None when not checked
    seconds: float
    fallbacks: list[str] = field(default_factory=list)  # why each exporter tried before this one failed


class CallableModule(torch.nn.Module):
    """`fn(inputs: dict) -> dict` (e.g. `Model.predict`) as a module called with keyword tensors.

    The torch modules held by fn's object become submodules: the TorchScript tracer refuses weights
    it meets as constants, and `eval()` must reach them.
    """

    def __init__(self, fn: Callable[[Tensors], Any]) -> None:
        super().__init__()
        self.fn = fn
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, torch.nn.Module):
            held = [owner]
        else:
            held = [v for v in getattr(owner, "__dict__", {}).values() if isinstance(v, torch.nn.Module)]
        self.held = torch.nn.ModuleList(held)

    def forward(self, **inputs: torch.Tensor) -> Any:
        return self.fn(inputs)


class _Positional(torch.nn.Module):
    """Positional tensors in, a tuple of tensors out: the calling convention both exporters trace."""

    def __init__(self, inner: torch.nn.Module, input_names: Sequence[str], output_names: Sequence[str]) -> None:
        super().__init__()
        self.inner = inner
        self.input_names = list(input_names)
        self.output_names = list(output_names)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raw = self.inner(**dict(zip(self.input_names, args)))
        return tuple(_outputs_by_name(raw, self.output_names).values())


def _outputs_by_name(raw: Any, names: Sequence[str] | None) -> Tensors:
    """Name a forward's outputs: a dict keeps its keys, a tuple gives output_0.., a tensor `output`;
    `names`, when given, replace those names in order."""
    if isinstance(raw, torch.Tensor):
        items = [("output", raw)]
    elif isinstance(raw, Mapping):
        items = [(str(k), v) for k, v in raw.items()]
    elif isinstance(raw, (tuple, list)):
        items = [(f"output_{i}", v) for i, v in enumerate(raw)]
    else:
        raise ExportError(f"forward returned a {type(raw).__name__}: return a tensor, a tuple of tensors or "
                          "a dict of tensors")
    if names is not None:
        if len(names) != len(items):
            raise ExportError(f"output_names has {len(names)} names but forward returns {len(items)} outputs "
                              f"({[k for k, _ in items]}). Fix: pass one name per output.")
        items = [(name, value) for name, (_, value) in zip(names, items)]
    for name, value in items:
        if not isinstance(value, torch.Tensor):
            raise ExportError(f"output {name!r} is a {type(value).__name__}: ONNX outputs must be tensors")
    return dict(items)


# -------------------------------------------------------------------------------------------- probing


@dataclass
class _Axis:
    """Axes of several inputs that are resized together while probing (input_ids and attention_mask)."""

    name: str
    members: list[tuple[str, int]]  # (input name, axis index)
    size: int
    alt: int | None = None  # another size the module accepted; None: the axis is fixed
    changes: dict[tuple[str, int], int] = field(default_factory=dict)  # (output, axis) -> size at `alt`


def detect_signature(module: torch.nn.Module, sample: Mapping[str, torch.Tensor], *,
                     output_names: Sequence[str] | None = None) -> GraphSignature:
    """Names, dtypes, shapes and dynamic axes of `module(**sample)`, found by resizing the sample.

    Dim 0 is "batch", dim 1 "seq", dims 2 and 3 of float NCHW images "height" and "width"; inputs
    whose axis has the same size are resized together. An axis the module rejects resized stays fixed.
    """
    return _detect(_runner(module, output_names), _checked_sample(sample))[0]


def _runner(module: torch.nn.Module, output_names: Sequence[str] | None) -> Runner:
    def run(inputs: Tensors) -> Tensors:
        with torch.inference_mode():
            return _outputs_by_name(module(**inputs), output_names)
    return run


def _checked_sample(sample: Mapping[str, torch.Tensor]) -> Tensors:
    if not sample or not all(isinstance(v, torch.Tensor) for v in sample.values()):
        raise ExportError("sample must map each input name to a torch.Tensor, e.g. "
                          '{"input_ids": torch.ones(2, 12, dtype=torch.long)}')
    return dict(sample)


def _detect(run: Runner, sample: Tensors) -> tuple[GraphSignature, dict[str, int]]:
    """The signature, and for each dynamic dim name another size the module accepted."""
    try:
        ref = run(sample)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"the module fails on the sample itself: {type(exc).__name__}: {exc}. "
                          "Fix: pass a sample the module accepts.") from exc
    axes = _candidate_axes(sample)
    for axis in axes:
        _probe(run, sample, ref, axis)
    dynamic = [a for a in axes if a.alt is not None]
    inputs = [_input_info(name, t, dynamic) for name, t in sample.items()]
    outputs = [_output_info(name, t, dynamic) for name, t in ref.items()]
    return GraphSignature(inputs, outputs), {a.name: a.alt for a in dynamic if a.alt is not None}


def _is_image(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_floating_point()


def _candidate_axes(sample: Tensors) -> list[_Axis]:
    axes: list[_Axis] = []
    batched = [(n, t) for n, t in sample.items() if t.dim() >= 1]
    if batched:
        size = batched[0][1].shape[0]
        axes.append(_Axis("batch", [(n, 0) for n, t in batched if t.shape[0] == size], size))
    axes += _grouped(sample, 1, "seq", lambda t: t.dim() >= 2 and not _is_image(t))
    axes += _grouped(sample, 2, "height", _is_image)
    axes += _grouped(sample, 3, "width", _is_image)
    return [a for a in axes if a.size > 0]


def _grouped(sample: Tensors, axis: int, base: str, accept: Callable[[torch.Tensor], bool]) -> list[_Axis]:
    """One `_Axis` per distinct size of `axis` among the accepted inputs: "seq", "seq_1", ..."""
    groups: dict[int, list[tuple[str, int]]] = {}
    for name, t in sample.items():
        if accept(t):
            groups.setdefault(int(t.shape[axis]), []).append((name, axis))
    return [_Axis(base if i == 0 else f"{base}_{i}", members, size)
            for i, (size, members) in enumerate(groups.items())]


def _probe(run: Runner, sample: Tensors, ref: Tensors, axis: _Axis) -> None:
    """Try `axis` at size+1, then at twice its size; keep the first size the module accepts."""
    for size in dict.fromkeys((axis.size + 1, axis.size * 2)):
        try:
            out = run(_resized(sample, axis.members, size))
        except Exception as exc:  # the module rejects this size: any error type will do
            logger.debug("probe %s=%d rejected: %s", axis.name, size, exc)
            continue
        changes = _changed_axes(ref, out)
        if changes is not None:
            axis.alt, axis.changes = size, changes
            return


def _resized(sample: Tensors, members: Sequence[tuple[str, int]], size: int) -> Tensors:
    """The sample with each member axis cut to `size`, or grown by repeating its last slice."""
    out = dict(sample)
    for name, axis in members:
        out[name] = _resize(sample[name], axis, size)
    return out


def _resize(t: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    now = t.shape[axis]
    if size <= now:
        return t.narrow(axis, 0, size)
    repeats = [1] * t.dim()
    repeats[axis] = size - now
    return torch.cat([t, t.narrow(axis, now - 1, 1).repeat(*repeats)], dim=axis)


def _changed_axes(ref: Tensors, out: Tensors) -> dict[tuple[str, int], int] | None:
    """(output, axis) -> new size for each output axis that changed; None when names or ranks differ."""
    if list(ref) != list(out) or any(ref[n].dim() != out[n].dim() for n in ref):
        return None
    return {(n, i): int(b) for n in ref for i, (a, b) in enumerate(zip(ref[n].shape, out[n].shape)) if a != b}


def _torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _input_info(name: str, t: torch.Tensor, dynamic: Sequence[_Axis]) -> TensorInfo:
    names = {(n, i): a.name for a in dynamic for n, i in a.members}
    dims = tuple(names.get((name, i), int(size)) for i, size in enumerate(t.shape))
    return TensorInfo(name, _torch_dtype_name(t.dtype), dims)


def _output_info(name: str, t: torch.Tensor, dynamic: Sequence[_Axis]) -> TensorInfo:
    """An output axis that follows one input axis exactly takes its name; one that changes some other
    way (a strided conv's height, batch * seq) gets a name of its own."""
    dims: list[int | str] = []
    for i, size in enumerate(t.shape):
        hits = [a for a in dynamic if (name, i) in a.changes]
        if not hits:
            dims.append(int(size))
        elif len(hits) == 1 and size == hits[0].size and hits[0].changes[(name, i)] == hits[0].alt:
            dims.append(hits[0].name)
        else:
            dims.append(f"{name}_dim{i}")
    return TensorInfo(name, _torch_dtype_name(t.dtype), tuple(dims))


# --------------------------------------------------------------------------------------------- export


@dataclass
class _Plan:
    """What one export needs besides the module."""

    name: str  # the module or callable, for messages
    signature: GraphSignature  # wanted names and dynamic axes
    example: Tensors  # the sample with dynamic dims under 2 grown to 2 (torch.export specialises 0 and 1)
    fresh_sizes: dict[str, int]  # dynamic dim name -> size of the check's inputs (not the sample's)


class _Failure(Exception):
    """One exporter failed: its export raised (`stage` "export") or its graph failed the check."""

    def __init__(self, exporter: str, stage: str, summary: str, op: str | None = None) -> None:
        super().__init__(f"{exporter} exporter: {summary}")
        self.exporter, self.stage, self.summary, self.op = exporter, stage, summary, op


def export_module(module: torch.nn.Module, sample: Mapping[str, torch.Tensor], path: str | Path, *,
                  signature: GraphSignature | None = None, output_names: Sequence[str] | None = None,
                  exporter: Exporter = "auto", opset: int | None = None, check: bool = True,
                  atol: float = 1e-4, rtol: float = 1e-3) -> ExportResult:
    """Export `module(**sample)` to the ONNX file `path` and check it against PyTorch.

    `signature` defaults to `detect_signature(module, sample)`. `exporter="auto"` tries dynamo, then
    TorchScript (opset 17) when dynamo raises or its graph fails the check. The check runs ONNX
    Runtime (CPU) on fresh inputs of another batch size and length and requires
    |onnx - torch| <= atol + rtol * |torch| everywhere. The module is put in eval mode.
    """
    return _export(module, type(module).__name__, sample, path, signature=signature, output_names=output_names,
                   exporter=exporter, opset=opset, check=check, atol=atol, rtol=rtol)


def export_callable(fn: Callable[[Tensors], Any], sample: Mapping[str, torch.Tensor], path: str | Path, *,
                    signature: GraphSignature | None = None, output_names: Sequence[str] | None = None,
                    exporter: Exporter = "auto", opset: int | None = None, check: bool = True,
                    atol: float = 1e-4, rtol: float = 1e-3) -> ExportResult:
    """`export_module` for `fn(inputs: dict[str, Tensor]) -> dict[str, Tensor]`, e.g. `model.predict`.

    The torch modules held by fn's object (`model._model`) are exported as the graph's weights.
    """
    name = getattr(fn, "__qualname__", type(fn).__name__)
    return _export(CallableModule(fn), name, sample, path, signature=signature, output_names=output_names,
                   exporter=exporter, opset=opset, check=check, atol=atol, rtol=rtol)


def _export(module: torch.nn.Module, name: str, sample: Mapping[str, torch.Tensor], path: str | Path, *,
            signature: GraphSignature | None, output_names: Sequence[str] | None, exporter: Exporter,
            opset: int | None, check: bool, atol: float, rtol: float) -> ExportResult:
    start = time.perf_counter()
    if exporter not in _ORDER:
        raise ExportError(f"unknown exporter {exporter!r}: use one of {sorted(_ORDER)}")
    module.eval()
    plan = _make_plan(module, name, _checked_sample(sample), signature, output_names)
    wrapper = _Positional(module, [i.name for i in plan.signature.inputs],
                          [o.name for o in plan.signature.outputs]).eval()
    run = _runner(module, [o.name for o in plan.signature.outputs])
    path = Path(path)
    failures: list[_Failure] = []
    for which in _ORDER[exporter]:
        try:
            model = _export_one(which, wrapper, plan, path, opset)
            err = _check(path, run, plan, which, atol, rtol) if check else None
        except _Failure as failure:
            logger.info("%s", failure)
            failures.append(failure)
            continue
        return ExportResult(path, which, signature_of(model), err, time.perf_counter() - start,
                            [str(f) for f in failures])
    _remove(path)
    raise ExportError(_failure_message(name, failures))


def _make_plan(module: torch.nn.Module, name: str, sample: Tensors, signature: GraphSignature | None,
               output_names: Sequence[str] | None) -> _Plan:
    alts: dict[str, int] = {}
    if signature is None:
        signature, alts = _detect(_runner(module, output_names), sample)
    known = {i.name for i in signature.inputs}
    if set(sample) != known:
        raise ExportError(f"the sample's inputs {sorted(sample)} differ from the signature's {sorted(known)}. "
                          "Fix: pass a sample with exactly the signature's inputs.")
    sizes: dict[str, int] = {}
    for info in signature.inputs:
        for axis, dim in info.dynamic_axes.items():
            sizes.setdefault(dim, int(sample[info.name].shape[axis]))
    export_sizes = {dim: max(size, 2) for dim, size in sizes.items()}
    fresh = {}
    for dim, size in export_sizes.items():
        alt = alts.get(dim, size + 1)
        fresh[dim] = alt if alt not in (size, sizes[dim]) else size + 1
    example = {}
    for info in signature.inputs:
        tensor = sample[info.name]
        for axis, dim in info.dynamic_axes.items():
            tensor = _resize(tensor, axis, export_sizes[dim])
        example[info.name] = tensor
    return _Plan(name, signature, example, fresh)


def _export_one(which: str, wrapper: _Positional, plan: _Plan, path: Path, opset: int | None) -> onnx.ModelProto:
    """Run one exporter, name the graph's inputs, outputs and dims after the plan, write it to `path`."""
    args = tuple(plan.example[i.name] for i in plan.signature.inputs)
    try:
        with _quiet():
            model = _EXPORTERS[which](wrapper, args, plan.signature, opset)
        _name_graph(model, plan.signature, rename_inputs=which == "dynamo")
    except Exception as exc:
        raise _Failure(which, "export", _summary(exc), _unsupported_op(exc)) from exc
    _drop_initializer_value_info(model)
    save_onnx(model, path)
    return model


def _drop_initializer_value_info(model: onnx.ModelProto) -> None:
    """The dynamo exporter also lists weights in value_info; onnxruntime's quantizer transposes a Gemm
    weight and then fails shape inference against that stale entry ("differ in dimension 0")."""
    weights = {i.name for i in model.graph.initializer}
    kept = [v for v in model.graph.value_info if v.name not in weights]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)


def _export_dynamo(wrapper: _Positional, args: tuple[torch.Tensor, ...], signature: GraphSignature,
                   opset: int | None) -> onnx.ModelProto:
    # No output_names: the exporter may give them to an intermediate too (see set_io_names).
    specs = tuple(info.dynamic_axes or None for info in signature.inputs)
    program = torch.onnx.export(wrapper, args, None, dynamo=True, opset_version=opset, verbose=False,
                                dynamic_shapes={"args": specs} if any(specs) else None)
    if program is None:
        raise RuntimeError("torch.onnx.export(dynamo=True) returned no ONNX program")
    return program.model_proto


def _export_torchscript(wrapper: _Positional, args: tuple[torch.Tensor, ...], signature: GraphSignature,
                        opset: int | None) -> onnx.ModelProto:
    dynamic_axes = {i.name: i.dynamic_axes for i in (*signature.inputs, *signature.outputs) if i.dynamic_axes}
    with tempfile.TemporaryDirectory(prefix="tandem-export-") as tmp:
        file = Path(tmp) / "model.onnx"  # big models come with one data file per weight: keep them here
        with _native_stdout_to_debug_log():
            torch.onnx.export(wrapper, args, str(file), dynamo=False, verbose=False,
                              opset_version=opset or TORCHSCRIPT_OPSET,
                              input_names=[i.name for i in signature.inputs],
                              output_names=[o.name for o in signature.outputs],
                              dynamic_axes=dynamic_axes or None)
        return onnx.load(str(file))


_EXPORTERS: dict[str, Callable[[_Positional, tuple[torch.Tensor, ...], GraphSignature, int | None],
                               onnx.ModelProto]] = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}


def _name_graph(model: onnx.ModelProto, signature: GraphSignature, *, rename_inputs: bool) -> None:
    """Give the graph the signature's input and output names, and its names for the dynamic dims."""
    set_io_names(model, [i.name for i in signature.inputs] if rename_inputs else None,
                 [o.name for o in signature.outputs])
    wanted = {info.name: info for info in (*signature.inputs, *signature.outputs)}
    for value in (*model.graph.input, *model.graph.output):
        info = wanted.get(value.name)
        if info is None or info.shape is None or not value.type.tensor_type.HasField("shape"):
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(info.shape):
            continue
        for dim, name in zip(dims, info.shape):
            if isinstance(name, str) and not dim.HasField("dim_value"):
                dim.dim_param = name


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide the exporters' warnings, progress lines and log chatter (errors still raise)."""
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [log.level for log in loggers]
    printed = io.StringIO()
    try:
        for log in loggers:
            log.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)
        if printed.getvalue():
            logger.debug("exporter output:\n%s", printed.getvalue())


@contextlib.contextmanager
def _native_stdout_to_debug_log() -> Iterator[None]:
    """Send what C++ prints to stdout to the debug log instead.

    The TorchScript exporter always switches its C++ log on (torch 2.13's `setup_onnx_logging` tests
    `_jit_is_onnx_log_enabled` without calling it), and that log prints the whole IR graph to
    stdout when an operator is unsupported; the error itself still raises.
    """
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no real fd 1: nothing to redirect
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace").strip()
            if text:
                logger.debug("TorchScript exporter log:\n%s", text)


def _remove(path: Path) -> None:
    """Delete a graph that failed, so no file at `path` means no export."""
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".data").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- check


def _check(path: Path, run: Runner, plan: _Plan, which: str, atol: float, rtol: float) -> float:
    """Largest |onnx - torch| over the outputs on fresh inputs; `_Failure` past atol + rtol * |torch|."""
    import onnxruntime as ort

    fresh = _fresh_inputs(plan)
    shapes = ", ".join(f"{n}{list(t.shape)}" for n, t in fresh.items())
    try:
        expected = run(fresh)
    except Exception as exc:
        raise ExportError(f"{plan.name} fails on the check's fresh inputs ({shapes}): {_summary(exc)}. Fix: pass a "
                          "`signature` whose dynamic axes the module accepts, or check=False.") from exc
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feeds = {i.name: fresh[i.name].cpu().numpy() for i in session.get_inputs()}
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    except Exception as exc:
        raise _Failure(which, "check", f"ONNX Runtime fails on fresh inputs ({shapes}): {_summary(exc)}") from exc
    worst = 0.0
    for name, ref in expected.items():
        err = _mismatch(got.get(name), ref.detach().cpu(), atol, rtol)
        if isinstance(err, str):
            raise _Failure(which, "check", f"output {name!r} on fresh inputs ({shapes}): {err}")
        worst = max(worst, err)
    return worst


def _mismatch(got: np.ndarray | None, ref: torch.Tensor, atol: float, rtol: float) -> float | str:
    """The max abs error, or what is wrong when the output is missing, misshapen or out of tolerance."""
    if got is None:
        return "missing from the ONNX graph's outputs"
    if tuple(got.shape) != tuple(ref.shape):
        return f"shape {list(got.shape)} in ONNX Runtime, {list(ref.shape)} in PyTorch"
    want = ref.to(torch.float64).numpy() if ref.dtype != torch.bool else ref.numpy()
    have = got.astype(want.dtype)
    both_nan = np.isnan(have) & np.isnan(want) if want.dtype.kind == "f" else np.zeros(want.shape, bool)
    err = np.where(both_nan, 0.0, np.abs(have.astype(np.float64) - want.astype(np.float64)))
    max_err = float(np.nan_to_num(err, nan=np.inf).max(initial=0.0))
    if not np.all(np.isclose(have, want, rtol=rtol, atol=atol, equal_nan=True)):
        return f"max abs error {max_err:.3g} vs PyTorch, over the allowed {atol:g} + {rtol:g} * |reference|"
    return max_err


def _fresh_inputs(plan: _Plan, seed: int = 0) -> Tensors:
    """Inputs unlike the sample: dynamic dims at `plan.fresh_sizes`; ints drawn within the sample's
    range, floats from its mean and std, inputs named like "mask" all ones."""
    gen = torch.Generator().manual_seed(seed)
    fresh = {}
    for info in plan.signature.inputs:
        sample = plan.example[info.name]
        shape = [plan.fresh_sizes[d] if isinstance(d, str) else d for d in (info.shape or sample.shape)]
        fresh[info.name] = _random_like(info.name, sample, shape, gen).to(sample.device)
    return fresh


def _random_like(name: str, sample: torch.Tensor, shape: Sequence[int], gen: torch.Generator) -> torch.Tensor:
    if "mask" in name.lower():
        return torch.ones(shape, dtype=sample.dtype)
    if sample.dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if not sample.is_floating_point():
        low, high = int(sample.min()), int(sample.max())
        return torch.randint(low, high + 1, shape, generator=gen, dtype=sample.dtype)
    as_float = sample.float()
    std = float(as_float.std()) if sample.numel() > 1 else 0.0
    values = torch.randn(shape, generator=gen) * std + float(as_float.mean())
    return values.to(sample.dtype)


# --------------------------------------------------------------------------------------------- errors

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OP_PATTERNS = (
    re.compile(r"OpOverload\(op='(?P<ns>\w+)\.(?P<op>\w+)'"),
    re.compile(r"torch\.ops\.(?P<ns>\w+)\.(?P<op>\w+)"),
    re.compile(r"Exporting the operator '?(?P<ns>\w+)::(?P<op>\w+)'? to ONNX"),
    re.compile(r"unrecognized namespace (?P<ns>\w+)::(?P<op>\w+)"),
    re.compile(r"\b(?P<ns>aten)(?:\.|::)(?P<op>\w+)"),
)
_UNSUPPORTED = ("No ONNX function found", "not supported", "Unsupported", "unrecognized namespace",
                "No decompositions registered")


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and its causes, outermost first."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _summary(exc: BaseException, limit: int = 300) -> str:
    """The first line of the innermost error: the dynamo exporter's outer ones only say which step failed."""
    for inner in reversed(_chain(exc)):
        lines = [x.strip() for x in _ANSI.sub("", str(inner)).splitlines() if x.strip()]
        if lines:
            # "Found the following conflicts ...:" says what only on its next line
            line = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
            text = f"{type(inner).__name__}: {line}"
            return text if len(text) <= limit else text[: limit - 3] + "..."
    return type(exc).__name__


def _unsupported_op(exc: BaseException) -> str | None:
    """The operator an "unsupported operator" error names, as `namespace::name`; None for other errors."""
    texts = [_ANSI.sub("", str(e)) for e in _chain(exc)]
    if not any(key in text for text in texts for key in _UNSUPPORTED):
        return None
    for pattern in _OP_PATTERNS:
        for text in texts:
            match = pattern.search(text)
            if match:
                return f"{match['ns']}::{match['op']}"
    return None


def _failure_message(name: str, failures: Sequence[_Failure]) -> str:
    details = "; ".join(f"{f.exporter} exporter: {f.summary}" for f in failures)
    op = next((f.op for f in failures if f.op), None)
    if op is not None:
        head = f"operator {op!r} is not supported"
        fix = ("replace it with standard torch operators, or give it an ONNX translation "
               "(dynamo: torch.onnx.export(..., custom_translation_table={op: onnxscript_function}); "
               "torchscript: torch.onnx.register_custom_op_symbolic)")
    elif any(f.stage == "check" for f in failures):
        head = "the ONNX graph does not match PyTorch"
        fix = ("try the other exporter (exporter='dynamo' or 'torchscript'), loosen atol/rtol if the "
               "difference is numerical noise, or pass check=False to keep the graph unchecked")
    else:
        head = "no exporter succeeded"
        fix = ("make the module traceable (no Python control flow on tensor values, no non-tensor "
               "outputs) or pass a `signature` with fewer dynamic axes")
    return f"could not export {name} to ONNX: {head} ({details}). Fix: {fix}."
