"""The UNet stage on ONNX Runtime or OpenVINO: callables with `Stages.denoise`'s contract.

    unet = OnnxUNet(export_unet_onnx(stages.unet, "unet.onnx", (2, 4, 32, 32), (2, 77, 768)))
    stages.denoise = unet            # x (B, C, h, w) f32, t (B,) f32, cond (B, L, D) f32 -> (B, C, h, w)

    ov_unet = OpenVinoUNet(convert_unet_openvino("unet.onnx", "unet.xml"), precision="f32")

Both graphs keep the batch axis dynamic (B = UNet rows of one iteration varies), so one export
serves every B; `OpenVinoUNet(..., static_batch=True)` instead compiles one fixed-shape model per
batch size on first use (a bucket per B), for CPUs where the dynamic-shape kernels are slower.

Threads: each runtime is given its intra-op thread count explicitly (ORT
`SessionOptions.intra_op_num_threads`, OpenVINO `INFERENCE_NUM_THREADS`) and defaults to
`torch.get_num_threads()`, so all three runtimes run on the same number of cores as torch eager.
ORT runs sequentially with one inter-op thread; OpenVINO runs one stream under the LATENCY hint.

Precision: ORT on CPU computes in fp32. OpenVINO's CPU plugin defaults `INFERENCE_PRECISION_HINT`
to bf16 on CPUs with AVX512_BF16 or AMX, i.e. it silently runs an fp32 model in bf16; `precision`
picks "f32" (exact) or "default" (the plugin's choice, whatever it is on this CPU) explicitly.
Nothing here touches the network. Each runtime object holds one inference session/request per
shape and is not thread-safe: one UNet loop owns it, as it owns the `DenoiseEngine`.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

__all__ = ["INPUT_NAMES", "OUTPUT_NAME", "OnnxUNet", "OpenVinoUNet", "UNetGraph", "convert_unet_openvino",
           "export_unet_onnx"]

logger = logging.getLogger(__name__)

INPUT_NAMES = ("sample", "timestep", "encoder_hidden_states")
OUTPUT_NAME = "noise"
Precision = Literal["f32", "default", "bf16", "f16"]


class UNetGraph(torch.nn.Module):
    """`Stages.denoise` as a plain module of three tensors -> one tensor, for exporters."""

    def __init__(self, unet: Any) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


def _examples(sample_shape: Sequence[int], text_shape: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """Example inputs (B, C, h, w), (B,), (B, L, D); B >= 2 so no exporter specializes the batch to 1."""
    if len(sample_shape) != 4 or len(text_shape) != 3 or sample_shape[0] != text_shape[0]:
        raise ValueError(f"need sample_shape (B, C, h, w) and text_shape (B, L, D) with the same B, "
                         f"got {tuple(sample_shape)} and {tuple(text_shape)}")
    b = max(2, int(sample_shape[0]))
    g = torch.Generator().manual_seed(0)
    return (torch.randn((b, *sample_shape[1:]), generator=g), torch.full((b,), 500.0),
            torch.randn((b, *text_shape[1:]), generator=g))


def export_unet_onnx(unet: Any, out_path: str | Path, sample_shape: Sequence[int], text_shape: Sequence[int],
                     opset: int = 18, dynamo: bool = True) -> Path:
    """Export a fp32 `UNet2DConditionModel` to ONNX with a dynamic batch axis; returns `out_path`.

    Tries torch's dynamo exporter first and falls back to the TorchScript one (`dynamo=False`) if it
    fails. Weights go in the same file unless they pass ONNX's 2 GB limit (then beside it, as external
    data). Inputs: sample (B, C, h, w) f32, timestep (B,) f32, encoder_hidden_states (B, L, D) f32;
    output: noise (B, C, h, w).
    """
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = UNetGraph(unet).eval()
    args = _examples(sample_shape, text_shape)
    if dynamo:
        try:
            _export_dynamo(model, args, out, opset)
            return out
        except Exception as exc:  # noqa: BLE001 - any exporter failure: try the other exporter
            logger.warning("dynamo ONNX export failed (%s: %s); retrying with dynamo=False",
                           type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    _export_torchscript(model, args, out, opset)
    return out


def _export_dynamo(model: torch.nn.Module, args: tuple[torch.Tensor, ...], out: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=1024)
    shapes = {"sample": {0: batch}, "timestep": {0: batch}, "encoder_hidden_states": {0: batch}}
    with torch.no_grad():
        program = torch.onnx.export(model, args, dynamo=True, dynamic_shapes=shapes, input_names=list(INPUT_NAMES),
                                    output_names=[OUTPUT_NAME], opset_version=opset, optimize=True,
                                    external_data=False, verbose=False)
    if program is None:
        raise RuntimeError("torch.onnx.export(dynamo=True) returned no program")
    big = sum(p.numel() * 4 for p in model.parameters()) > 1_800_000_000
    program.save(str(out), external_data=big)


def _export_torchscript(model: torch.nn.Module, args: tuple[torch.Tensor, ...], out: Path, opset: int) -> None:
    axes = {name: {0: "batch"} for name in (*INPUT_NAMES, OUTPUT_NAME)}
    with torch.no_grad(), warnings.catch_warnings():  # diffusers' shape asserts are constants for a fixed bucket
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(model, args, str(out), dynamo=False, input_names=list(INPUT_NAMES),
                          output_names=[OUTPUT_NAME], dynamic_axes=axes, opset_version=opset, do_constant_folding=True)


def _threads(threads: int | None) -> int:
    return int(threads) if threads else torch.get_num_threads()


def _feeds(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> list[np.ndarray]:
    """Contiguous fp32 numpy views of the inputs (no copy when they already are); t broadcast to (B,)."""
    b = x.shape[0]
    t = t.reshape(-1).expand(b) if t.numel() in (1, b) else t
    return [np.ascontiguousarray(a.detach().to("cpu", torch.float32).numpy()) for a in (x, t, cond)]


class OnnxUNet:
    """An exported UNet on ONNX Runtime (CPU by default), called like `Stages.denoise`.

    `providers` as ONNX Runtime takes them (["CPUExecutionProvider"] by default); `threads` intra-op
    threads (default: torch's); `spinning=False` stops idle pool threads from spinning between calls.
    """

    def __init__(self, path: str | Path, providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
                 threads: int | None = None, optimization: str = "ORT_ENABLE_ALL", spinning: bool = True) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.threads = _threads(threads)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimization)
        opts.log_severity_level = 3
        if not spinning:  # idle intra-op threads block at once instead of spinning (shared cores: VAE, fronts)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.path), opts, providers=list(providers or ["CPUExecutionProvider"]))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        feeds = dict(zip(self.input_names, _feeds(x, t, cond)))
        (out,) = self.session.run([self.output_name], feeds)
        return torch.from_numpy(out).to(x.device)


def convert_unet_openvino(source: Any, out_path: str | Path | None = None,
                          sample_shape: Sequence[int] | None = None, text_shape: Sequence[int] | None = None) -> Any:
    """An `openvino.Model` of the UNet with a dynamic batch axis, from an ONNX file or a torch UNet.

    `source` is a path to an .onnx file (see `export_unet_onnx`) or a `UNet2DConditionModel` (then
    `sample_shape` and `text_shape`, (B, C, h, w) and (B, L, D), give the example inputs and
    `openvino.convert_model` traces it directly). With `out_path` (.xml) the model is also saved as
    OpenVINO IR (weights in fp32: `compress_to_fp16=False`) for `OpenVinoUNet` to load later.
    """
    import openvino as ov

    if isinstance(source, str | Path):
        model = ov.convert_model(str(source))
    else:
        if sample_shape is None or text_shape is None:
            raise ValueError("converting a torch UNet needs sample_shape (B, C, h, w) and text_shape (B, L, D)")
        args = _examples(sample_shape, text_shape)
        shapes = [ov.PartialShape([-1, *a.shape[1:]]) for a in args]
        with torch.no_grad():
            model = ov.convert_model(UNetGraph(source).eval(), example_input=args, input=shapes)
        for port, name in zip(model.inputs, INPUT_NAMES):
            port.get_tensor().set_names({name})
    if out_path is not None:
        out = Path(out_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(model, str(out), compress_to_fp16=False)
    return model


class OpenVinoUNet:
    """A UNet on OpenVINO's CPU plugin, called like `Stages.denoise`.

    `model` is an `openvino.Model`, or a path to an .xml IR or .onnx file. `precision` "f32" pins
    `INFERENCE_PRECISION_HINT` to f32; "default" leaves the plugin's choice (bf16 on AVX512_BF16/AMX
    CPUs). With `static_batch` every batch size gets its own fixed-shape compiled model on first use.
    """

    def __init__(self, model: Any, precision: Precision = "f32", threads: int | None = None,
                 static_batch: bool = False, device: str = "CPU", cache_dir: str | Path | None = None,
                 pin_threads: bool | None = None) -> None:
        import openvino as ov

        self.core = ov.Core()
        self.model = self.core.read_model(os.fspath(model)) if isinstance(model, str | Path) else model
        self.threads = _threads(threads)
        self.device, self.static_batch, self.precision = device, static_batch, precision
        self.config: dict[str, Any] = {"INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY",
                                       "NUM_STREAMS": 1}
        if precision != "default":
            self.config["INFERENCE_PRECISION_HINT"] = precision
        if pin_threads is not None:
            self.config["ENABLE_CPU_PINNING"] = pin_threads
        if cache_dir is not None:
            self.config["CACHE_DIR"] = str(cache_dir)
        self._requests: dict[int, Any] = {}  # batch size (0: dynamic) -> infer request

    def compiled_model(self, batch: int = 2) -> Any:
        """The `openvino.CompiledModel` that runs batch size `batch` (compiled now if it is not yet)."""
        return self._request(batch).get_compiled_model()

    @property
    def compiled_batches(self) -> list[int]:
        """Batch sizes compiled so far (static buckets); [0] for the one dynamic-batch model."""
        return sorted(self._requests)

    @property
    def inference_precision(self) -> str:
        """The precision the plugin actually runs in ("f32", "bf16", ...: after the hint and the CPU's abilities)."""
        req = next(iter(self._requests.values()), None) or self._request(2)
        value = req.get_compiled_model().get_property("INFERENCE_PRECISION_HINT")
        return str(value.get_type_name()) if hasattr(value, "get_type_name") else str(value)

    def _request(self, batch: int) -> Any:
        key = batch if self.static_batch else 0
        req = self._requests.get(key)
        if req is None:
            model = self.model
            if self.static_batch:
                model = self.model.clone()
                model.reshape({port.any_name: [batch, *(d.get_length() for d in list(port.get_partial_shape())[1:])]
                               for port in model.inputs})
            req = self.core.compile_model(model, self.device, self.config).create_infer_request()
            self._requests[key] = req
        return req

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        req = self._request(x.shape[0])
        req.infer(_feeds(x, t, cond), share_inputs=True)
        out = np.array(req.get_output_tensor(0).data, copy=True)  # the request reuses its output buffer
        return torch.from_numpy(out).to(x.device)
