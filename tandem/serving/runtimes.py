"""What runs a batch inside an accelerator worker, keyed by `runtime:` in tandem.yaml.

    torch        model.py's `setup(device)` once, then `predict` on torch tensors (the default)
    onnxruntime  an ONNX Runtime session on the entry's `onnx.path` artefact; model.py's setup and
                 predict are never called (its preprocess/postprocess still run in CPU workers)

Every runtime takes the batch the worker assembled (numpy, stacked and padded along dim 0) and
returns numpy outputs for the entry's output specs; the worker checks rows and dtypes. Loading a
runtime is the start-up check: a missing or corrupt artefact, or a graph whose inputs and outputs do
not match model.py's TensorSpecs, raises `ConfigError` naming the file, the tensor and the fix.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from tandem.errors import ConfigError
from tandem.model import TensorSpec
from tandem.serving._proc import rss_bytes
from tandem.serving.repository import ModelEntry, instantiate

if TYPE_CHECKING:
    import onnxruntime as ort

    from tandem.model import Model

__all__ = ["RUNTIMES", "OnnxRuntime", "Runtime", "TorchRuntime", "load_runtime", "rss_bytes", "session_options",
           "warm_up_batches"]

logger = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


class Runtime(Protocol):
    """A loaded model that maps one assembled batch to its outputs (numpy in, numpy out)."""

    device: str

    def run(self, inputs: Batch) -> Batch:
        """Outputs for the entry's output specs, each [rows, ...]."""
        ...

    def memory_used(self) -> tuple[int, str] | None:
        """(bytes, what was measured) for the memory_limit check, or None when the runtime bounds it itself."""
        ...


def warm_up_batches(entry: ModelEntry) -> list[Batch]:
    """Dummy batches (all ones) of up to 4 rows, variable dims at 16 and at 64 (capped by max_shape)."""
    rows = min(4, entry.batching.max_batch_size)
    return [{s.name: np.ones((rows, *_dummy_dims(s, length)), dtype=s.np_dtype) for s in entry.inputs}
            for length in (16, 64)]


def _dummy_dims(spec: TensorSpec, length: int) -> tuple[int, ...]:
    return tuple(min(length, m) if d == -1 else d for d, m in zip(spec.shape, spec.max_shape or spec.shape))


# ---------------------------------------------------------------------------------------------
# torch: model.py's setup + predict
# ---------------------------------------------------------------------------------------------

def _to_numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


class TorchRuntime:
    """model.py's `setup(device)` and `predict` under `torch.inference_mode`, tensors on `device`."""

    name: ClassVar[str] = "torch"

    def __init__(self, entry: ModelEntry, model: Model, device: str) -> None:
        import torch

        self.entry, self.model, self.device = entry, model, device
        self._torch = torch

    @classmethod
    def load(cls, entry: ModelEntry, device: str) -> TorchRuntime:
        """Pin threads, bound CUDA memory, build the model and run its setup; errors name the limit."""
        import torch

        torch.set_num_threads(entry.threads())
        limit = entry.config.memory_limit
        if device.startswith("cuda"):
            dev = torch.device(device)
            total = torch.cuda.get_device_properties(dev).total_memory
            if limit:
                torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), dev)
        model = instantiate(entry)
        try:
            model.setup(device)
        except torch.cuda.OutOfMemoryError as e:
            raise RuntimeError(f"model {entry.key} does not fit memory_limit={limit} bytes on {device}: {e}") from e
        return cls(entry, model, device)

    def run(self, inputs: Batch) -> Batch:
        torch = self._torch
        tensors = {k: torch.from_numpy(v).to(self.device) for k, v in inputs.items()}
        with torch.inference_mode():
            out = self.model.predict(tensors)
        if not isinstance(out, dict):
            raise TypeError(f"predict must return a dict of tensors, got {type(out).__name__}")
        # Only declared outputs leave the device; the worker checks that each one is there.
        return {spec.name: _to_numpy(out[spec.name]) for spec in self.entry.outputs if spec.name in out}

    def memory_used(self) -> tuple[int, str]:
        if self.device.startswith("cuda"):
            return int(self._torch.cuda.memory_reserved(self._torch.device(self.device))), "CUDA memory reserved"
        return rss_bytes(), "process RSS"


# ---------------------------------------------------------------------------------------------
# onnxruntime: an InferenceSession on the entry's artefact
# ---------------------------------------------------------------------------------------------

# ONNX Runtime's NodeArg.type -> KServe v2 datatype (as TensorSpec spells dtypes).
_ORT_TO_V2 = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64", "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32",
    "tensor(int64)": "INT64", "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
}
_CUDA, _CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
_GPU_PROVIDERS = (_CUDA, "TensorrtExecutionProvider")  # these take a device_id


class OnnxRuntime:
    """An ONNX Runtime session: intra-op threads = the entry's threads, one inter-op thread.

    On CUDA, memory_limit becomes the CUDA provider's `gpu_mem_limit` (its arena never grows past
    it); on CPU the worker checks the process RSS after load, as for torch.
    """

    name: ClassVar[str] = "onnxruntime"

    def __init__(self, session: ort.InferenceSession, entry: ModelEntry, device: str) -> None:
        self.session, self.device = session, device
        self.input_names = [s.name for s in entry.inputs]
        self.output_names = [s.name for s in entry.outputs]
        self.providers: list[str] = list(session.get_providers())

    @classmethod
    def load(cls, entry: ModelEntry, device: str) -> OnnxRuntime:
        """Open the artefact and check its graph against the entry's TensorSpecs."""
        path = _artefact(entry)
        session = _session(entry, path, device)
        check_signature(path, session, entry.inputs, entry.outputs, entry.batching.max_batch_size)
        logger.info("%s: %s on %s", entry.key, path.name, ", ".join(session.get_providers()))
        return cls(session, entry, device)

    def run(self, inputs: Batch) -> Batch:
        feed = {name: inputs[name] for name in self.input_names}
        return dict(zip(self.output_names, self.session.run(self.output_names, feed)))

    def memory_used(self) -> tuple[int, str] | None:
        if self.providers[0] in _GPU_PROVIDERS:
            return None  # bounded by gpu_mem_limit; host RSS says nothing about device memory
        return rss_bytes(), "process RSS"


def _artefact(entry: ModelEntry) -> Path:
    where = entry.config.path / "tandem.yaml"
    try:
        path = entry.config.onnx_path()
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    if path is None:
        raise ConfigError(f"{where}: runtime: onnxruntime needs an `onnx:` section (fix: add onnx: {{path: ...}})")
    if not path.is_file():
        raise ConfigError(f"{path}: ONNX artefact not found (fix: check onnx.path in {where}, or write the "
                          "artefact there, e.g. with `tandem optimize`)")
    return path


_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "all": "ORT_ENABLE_ALL"}


def session_options(threads: int, level: str = "all") -> Any:
    """ONNX Runtime options as Tandem runs every session: `threads` intra-op, one inter-op thread, and
    graph optimization `level` (disable | basic | extended | all). `tandem optimize` uses them too."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
    return so


def _session(entry: ModelEntry, path: Path, device: str) -> ort.InferenceSession:
    import onnxruntime as ort

    assert entry.config.onnx is not None
    options = session_options(entry.threads(), entry.config.onnx.graph_optimization)
    providers = _providers(entry, device, ort.get_available_providers())
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as e:  # onnxruntime's pybind errors share no public base class
        raise ConfigError(f"{path}: ONNX Runtime cannot load it: {type(e).__name__}: {e} (fix: re-export "
                          "the model, and check it with onnx.checker.check_model)") from None
    wanted, got = providers[0][0], session.get_providers()[0]
    if wanted != got:
        if entry.config.onnx.providers != "auto":
            raise ConfigError(f"{path}: {wanted} failed to start; ONNX Runtime fell back to {got} (fix: install "
                              "the provider's libraries, or list only providers that work here)")
        logger.warning("%s: %s failed to start; running on %s", entry.key, wanted, got)
    return session


def _providers(entry: ModelEntry, device: str, available: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """Execution providers with their options, in priority order."""
    assert entry.config.onnx is not None
    wanted = entry.config.onnx.providers
    if wanted == "auto":
        names = [_CUDA, _CPU] if device.startswith("cuda") and _CUDA in available else [_CPU]
    else:
        missing = [p for p in wanted if p not in available]
        if missing:
            raise ConfigError(f"{entry.config.path / 'tandem.yaml'}: onnx.providers {missing} not available in "
                              f"this onnxruntime build (available: {available}; fix: use providers: auto, or "
                              "install the matching onnxruntime package, e.g. onnxruntime-gpu)")
        names = list(wanted)
    device_id = int(device.split(":")[1]) if device.startswith("cuda:") else 0
    limit = entry.config.memory_limit
    options: dict[str, dict[str, Any]] = {
        _CUDA: {"device_id": device_id, **({"gpu_mem_limit": limit} if limit else {})},
        "TensorrtExecutionProvider": {"device_id": device_id},
    }
    return [(name, options.get(name, {})) for name in names]


def check_signature(path: Path, session: ort.InferenceSession, inputs: Iterable[TensorSpec],
                    outputs: Iterable[TensorSpec], max_batch_size: int) -> None:
    """Raise ConfigError listing every way the graph's inputs/outputs differ from the TensorSpecs."""
    graph_in = {a.name: a for a in session.get_inputs()}
    graph_out = {a.name for a in session.get_outputs()}
    specs = {s.name: s for s in inputs}
    problems = [p for s in specs.values() for p in _input_problems(s, graph_in.get(s.name), max_batch_size)]
    problems += [f"graph input {name!r} is not among model.py's inputs {sorted(specs)}, so nothing would feed it"
                 for name in graph_in if name not in specs]
    problems += [f"model.py's output {s.name!r} is not a graph output (graph outputs: {sorted(graph_out)})"
                 for s in outputs if s.name not in graph_out]
    if problems:
        raise ConfigError(f"{path}: the ONNX graph does not match model.py's TensorSpecs:\n  "
                          + "\n  ".join(problems)
                          + "\n  (fix: re-export with matching input/output names and dtypes, or change the specs)")


def _input_problems(spec: TensorSpec, arg: Any, max_batch_size: int) -> list[str]:
    if arg is None:
        return [f"model.py's input {spec.name!r} is not a graph input"]
    dtype = _ORT_TO_V2.get(arg.type, arg.type)
    if dtype != spec.dtype:
        return [f"input {spec.name!r}: graph wants {dtype}, model.py's TensorSpec gives {spec.dtype}"]
    shape = _shape_problem(spec, list(arg.shape), max_batch_size)
    return [shape] if shape else []


def _shape_problem(spec: TensorSpec, graph: list[Any], max_batch_size: int) -> str | None:
    """Why batches [rows, *spec.shape] would not fit the graph's input shape, or None (also when unknown)."""
    if not graph:
        return None  # no shape information in the graph
    want = [-1, *spec.shape]
    if len(graph) != len(want):
        return f"input {spec.name!r}: graph rank {len(graph)} {graph}, model.py's batches have rank {len(want)}"
    batch = graph[0]
    if isinstance(batch, int) and not (batch == 1 and max_batch_size == 1):
        return (f"input {spec.name!r}: graph fixes the batch dim at {batch}, batches have 1..{max_batch_size} rows "
                "(export with a dynamic batch axis)")
    for i, (g, s) in enumerate(zip(graph[1:], spec.shape), start=1):
        if isinstance(g, int) and g != s:
            size = "variable (-1)" if s == -1 else s
            return f"input {spec.name!r}: graph fixes dim {i} at {g}, model.py's TensorSpec says {size}"
    return None


RUNTIMES: dict[str, Callable[[ModelEntry, str], Runtime]] = {
    TorchRuntime.name: TorchRuntime.load,
    OnnxRuntime.name: OnnxRuntime.load,
}


def load_runtime(entry: ModelEntry, device: str) -> Runtime:
    """Load the entry's runtime on `device` (the accelerator worker's start-up)."""
    name = entry.config.runtime
    if name not in RUNTIMES:
        raise ConfigError(f"{entry.config.path / 'tandem.yaml'}: unknown runtime {name!r} "
                          f"(fix: use one of {sorted(RUNTIMES)})")
    return RUNTIMES[name](entry, device)
