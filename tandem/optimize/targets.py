"""Conversion targets: how each builds a lower-precision graph that keeps a given node set in FP32.

A target knows three things: `build(model, keep)` (the converted graph with the nodes `keep`
left in FP32), which nodes it converts (the doctor's candidates), and how to tell from a profile
whether a node really ran in FP32. Targets are looked up by name in `TARGETS`.

    fp32           ONNX Runtime's graph optimizations only (the baseline every target must beat)
    int8-dynamic   int8 weights per channel, activations quantized at run time (MatMul, Gemm, Conv, Gather)
    int8-smooth    int8-dynamic after SmoothQuant moved activation outliers into the weights
    int8-static    int8 QDQ with activation ranges calibrated on the calibration set
    fp16, bf16     every float node in the low type, kept nodes in an FP32 island with explicit casts

The int8 targets quantize weights to 7 bits on x86 CPUs without VNNI, whose u8s8 kernels would
otherwise saturate (`int8_saturates`); `reduce_range` on a target overrides that.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import platform
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import onnx

from tandem.optimize.lowp import convert_low_precision, low_nodes
from tandem.optimize.runtime import Feeds
from tandem.optimize.smooth import DEFAULT_ALPHA, smooth_matmuls

__all__ = ["TARGETS", "Target", "get_target", "host_int8_saturates", "int8_saturates"]

logger = logging.getLogger(__name__)

# Operators that compute in integers: a node "kept in FP32" must not end up in one of these.
QUANTIZED_OPS = {"MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "QAttention", "MatMulIntegerToFloat",
                 "QGemm", "ConvInteger", "QLinearConv", "DynamicQuantizeLSTM", "QLinearAdd", "QLinearMul",
                 "QEmbedLayerNormalization", "QOrderedMatMul"}
LOW_FLOAT_TYPES = {"float16", "bfloat16"}


class Target(Protocol):
    """One way of converting a graph; see the module docstring."""

    name: str
    precision: str  # "fp32", "int8", "fp16" or "bf16"

    def build(self, model: onnx.ModelProto, keep: Sequence[str]) -> onnx.ModelProto: ...

    def candidates(self, model: onnx.ModelProto, converted: onnx.ModelProto) -> list[str]: ...

    def excluded_ops(self, model: onnx.ModelProto) -> list[str]: ...

    def ran_fp32(self, executed: dict[str, Any]) -> bool: ...


def _replaced(model: onnx.ModelProto, converted: onnx.ModelProto, ops: Sequence[str]) -> list[str]:
    """Nodes of types `ops` that `converted` rewrote: gone, renamed to `<name>_quant`, or fed other inputs."""
    after = {n.name: list(n.input) for n in converted.graph.node}
    out = []
    for node in model.graph.node:
        if node.op_type not in ops:
            continue
        if node.name not in after or f"{node.name}_quant" in after or after[node.name] != list(node.input):
            out.append(node.name)
    return out


@dataclass
class Fp32Target:
    """No conversion: the exported graph under ONNX Runtime's own optimizations."""

    name: str = "fp32"
    precision: str = "fp32"

    def build(self, model: onnx.ModelProto, keep: Sequence[str]) -> onnx.ModelProto:
        return model

    def candidates(self, model: onnx.ModelProto, converted: onnx.ModelProto) -> list[str]:
        return []

    def excluded_ops(self, model: onnx.ModelProto) -> list[str]:
        return []

    def ran_fp32(self, executed: dict[str, Any]) -> bool:
        return True


def _quantize(model: onnx.ModelProto, run: Any) -> onnx.ModelProto:
    """Run an onnxruntime.quantization entry point that writes a file, and load the result.

    The quantizer logs on the root logger (a pre-processing hint per call, every skipped MatMul);
    those lines are silenced for the call. It also saves a ModelProto it is given with external data
    (onnxruntime 1.31), which rewrites that proto's initializers into references to files it then
    deletes, so it gets a copy.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "quantized.onnx"
            run(copy, out)
            return onnx.load(str(out))
    finally:
        root.setLevel(level)


def _exclusions(keep: Sequence[str]) -> list[str]:
    """Node names to exclude from quantization: the quantizer first rewrites a Gemm into `<name>_MatMul`
    + `<name>_Add` and then matches exclusions against the new names, so a kept Gemm was quantized
    anyway (onnxruntime 1.31; the doctor's FP32 check found it on ResNet-50's classifier)."""
    return [*keep, *(f"{k}_MatMul" for k in keep)]


_X86 = {"x86_64", "amd64", "x64", "i386", "i686", "x86"}
_VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}


def int8_saturates(machine: str, cpu_flags: str | None) -> bool:
    """Whether ONNX Runtime's u8s8 (uint8 activations x int8 weights) CPU kernels can overflow on this CPU.

    Without VNNI, x86 MLAS multiplies with vpmaddubsw, which adds each pair of u8*s8 products into a
    saturating int16: 2 * 255 * 127 > 32767, so full-range per-channel int8 weights give wrong sums
    (onnxruntime's own guidance: `reduce_range=True` there, i.e. 7-bit weights, 2 * 255 * 64 fits).
    VNNI (vpdpbusd) accumulates in int32, and ARM kernels widen first. `cpu_flags` is /proc/cpuinfo's
    flags line; None (not Linux) on x86 counts as saturating, since 7-bit weights are right everywhere.
    """
    if machine.lower() not in _X86:
        return False
    return cpu_flags is None or not _VNNI_FLAGS & set(cpu_flags.split())


@functools.cache
def host_int8_saturates() -> bool:
    """`int8_saturates` for the CPU this process runs on (the one the doctor measures on)."""
    flags = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((line.split(":", 1)[1] for line in f if line.startswith("flags")), None)
    except OSError:
        pass
    return int8_saturates(platform.machine(), flags)


_INT8_OPS = ["MatMul", "Gemm", "Conv", "Gather", "Attention", "LSTM", "EmbedLayerNormalization"]
_STATIC_OPS = ["MatMul", "Gemm", "Conv"]


class _Int8:
    """What every int8 target shares: its candidates are the nodes of `ops` the quantizer rewrote, a
    kept node must not run as an integer kernel, and weights are 7-bit where 8-bit ones would saturate
    the CPU's integer kernels (`reduce_range`: None decides by this host, see `int8_saturates`)."""

    ops: ClassVar[list[str]]
    precision = "int8"
    reduce_range: bool | None

    def _reduce(self) -> bool:
        return host_int8_saturates() if self.reduce_range is None else self.reduce_range

    def candidates(self, model: onnx.ModelProto, converted: onnx.ModelProto) -> list[str]:
        return _replaced(model, converted, self.ops)

    def excluded_ops(self, model: onnx.ModelProto) -> list[str]:
        return sorted({n.op_type for n in model.graph.node if n.op_type not in self.ops})

    def ran_fp32(self, executed: dict[str, Any]) -> bool:
        return executed["op"] not in QUANTIZED_OPS and not any(t in ("int8", "uint8") for t in executed["inputs"])


@dataclass
class Int8DynamicTarget(_Int8):
    """int8 weights (per output channel) with activations quantized at run time; ops in `_INT8_OPS`."""

    name: str = "int8-dynamic"
    reduce_range: bool | None = None
    ops: ClassVar[list[str]] = _INT8_OPS

    def build(self, model: onnx.ModelProto, keep: Sequence[str]) -> onnx.ModelProto:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        def run(m: onnx.ModelProto, out: Path) -> None:
            quantize_dynamic(m, out, per_channel=True, reduce_range=self._reduce(), weight_type=QuantType.QInt8,
                             op_types_to_quantize=_INT8_OPS, nodes_to_exclude=_exclusions(keep),
                             extra_options={"MatMulConstBOnly": True})

        return _quantize(model, run)


@dataclass
class Int8SmoothTarget(Int8DynamicTarget):
    """SmoothQuant (see smooth.py) folded in, then `int8-dynamic`; the factors come from `calibration`."""

    name: str = "int8-smooth"
    calibration: Sequence[Feeds] = field(default_factory=list)
    alpha: float = DEFAULT_ALPHA
    _cache: tuple[onnx.ModelProto, onnx.ModelProto] | None = field(default=None, repr=False)

    def smoothed(self, model: onnx.ModelProto) -> onnx.ModelProto:
        if self._cache is None or self._cache[0] is not model:
            if not self.calibration:
                raise ValueError("int8-smooth needs calibration batches")
            self._cache = (model, smooth_matmuls(model, self.calibration, self.alpha))
        return self._cache[1]

    def build(self, model: onnx.ModelProto, keep: Sequence[str]) -> onnx.ModelProto:
        return super().build(self.smoothed(model), keep)


class _Reader:
    """onnxruntime's CalibrationDataReader over in-memory feeds."""

    def __init__(self, feeds: Sequence[Feeds]) -> None:
        self._it: Iterator[Feeds] = iter(feeds)

    def get_next(self) -> Feeds | None:
        return next(self._it, None)


@dataclass
class Int8StaticTarget(_Int8):
    """int8 QDQ (U8S8, weights per channel) with activation ranges calibrated on `calibration`."""

    name: str = "int8-static"
    calibration: Sequence[Feeds] = field(default_factory=list)
    reduce_range: bool | None = None
    ops: ClassVar[list[str]] = _STATIC_OPS

    def build(self, model: onnx.ModelProto, keep: Sequence[str]) -> onnx.ModelProto:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        if not self.calibration:
            raise ValueError("int8-static needs calibration batches")

        def run(m: onnx.ModelProto, out: Path) -> None:
            quantize_static(m, out, _Reader(self.calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=self._reduce(),
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=_STATIC_OPS, nodes_to_exclude=_exclusions(keep),
                            extra_options={"MatMulConstBOnly": True})

        return _quantize(model, run)


@dataclass
class LowFloatTarget:
    """fp16 or bf16 everywhere except the kept nodes, which form an FP32 island with explicit casts."""

    name: str = "fp16"
    precision: str = "fp16"
    keep_ops: tuple[str, ...] = ()

    def build(self, model: onnx.ModelProto, keep: Sequence[str]) -> onnx.ModelProto:
        return convert_low_precision(model, self.precision, keep, self.keep_ops)

    def candidates(self, model: onnx.ModelProto, converted: onnx.ModelProto) -> list[str]:
        return low_nodes(model, self.keep_ops)

    def excluded_ops(self, model: onnx.ModelProto) -> list[str]:
        return sorted(set(self.keep_ops) & {n.op_type for n in model.graph.node})

    def ran_fp32(self, executed: dict[str, Any]) -> bool:
        return not any(t in LOW_FLOAT_TYPES for t in [*executed["inputs"], *executed["outputs"]])


def get_target(name: str, calibration: Sequence[Feeds] = ()) -> Target:
    """The target called `name` (see `TARGETS`); those that calibrate get a copy holding the batches."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    target = TARGETS[name]
    if isinstance(target, (Int8SmoothTarget, Int8StaticTarget)):
        return dataclasses.replace(target, calibration=list(calibration))
    return target


TARGETS: dict[str, Target] = {
    "fp32": Fp32Target(),
    "int8-dynamic": Int8DynamicTarget(),
    "int8-smooth": Int8SmoothTarget(),
    "int8-static": Int8StaticTarget(),
    "fp16": LowFloatTarget("fp16", "fp16"),
    "bf16": LowFloatTarget("bf16", "bf16"),
}
