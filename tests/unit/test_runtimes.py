"""Runtimes of the accelerator worker: `runtime:`/`onnx:` config checks, ONNX signature checks, parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tandem.config import BatchingConfig, ModelConfig, OnnxConfig, load_model_config
from tandem.errors import ConfigError
from tandem.kinds import builtin_kinds
from tandem.model import TensorSpec
from tandem.serving.accel_worker import _setup_runtime
from tandem.serving.repository import ModelEntry, scan_repository
from tandem.serving.runtimes import OnnxRuntime, TorchRuntime, load_runtime, warm_up_batches

FIXTURE_ECHO = Path(__file__).resolve().parent.parent / "fixtures" / "repo" / "echo"
X = TensorSpec("x", "FP32", (4,))
Y = TensorSpec("y", "FP32", (3,))
W = np.arange(12, dtype=np.float32).reshape(4, 3) / 7


def _matmul(path: Path, x_type: int = TensorProto.FLOAT, x_shape: list[int | str] | None = None,
            extra_input: bool = False) -> Path:
    """y = x @ W, x: [batch, 4] -> y: [batch, 3]; optionally a second, unused-by-specs input."""
    inputs = [helper.make_tensor_value_info("x", x_type, x_shape or ["batch", 4])]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    if x_type != TensorProto.FLOAT:
        nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
                 helper.make_node("MatMul", ["xf", "w"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, ["batch", 1]))
        nodes.append(helper.make_node("Identity", ["scale"], ["scale_out"]))
        outputs.append(helper.make_tensor_value_info("scale_out", TensorProto.FLOAT, ["batch", 1]))
    graph = helper.make_graph(nodes, "matmul", inputs, outputs, [numpy_helper.from_array(W, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime this project supports
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _entry(folder: Path, inputs: tuple[TensorSpec, ...] = (X,), outputs: tuple[TensorSpec, ...] = (Y,),
           onnx: OnnxConfig | None = None, max_batch_size: int = 8, **config: object) -> ModelEntry:
    cfg = ModelConfig(name="m", path=folder, device="cpu", threads=1, runtime="onnxruntime",
                      onnx=onnx or OnnxConfig(path="m.onnx"), **config)  # type: ignore[arg-type]
    return ModelEntry(0, cfg, BatchingConfig(max_batch_size=max_batch_size), inputs, outputs, 4, folder)


def _yaml_error(folder: Path, text: str) -> str:
    (folder / "tandem.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_model_config(folder)
    return str(info.value)


# --- config ------------------------------------------------------------------------------------

def test_runtime_defaults_to_torch_and_onnx_section_resolves_inside_the_folder(tmp_path: Path) -> None:
    (tmp_path / "tandem.yaml").write_text("device: cpu\n")
    assert load_model_config(tmp_path).runtime == "torch"
    (tmp_path / "tandem.yaml").write_text(
        "runtime: onnxruntime\nonnx: {path: sub/model.int8.onnx, providers: [CPUExecutionProvider], "
        "graph_optimization: basic}\n")
    cfg = load_model_config(tmp_path)
    assert cfg.onnx is not None and cfg.onnx.providers == ["CPUExecutionProvider"]
    assert cfg.onnx_path() == tmp_path.resolve() / "sub" / "model.int8.onnx"


@pytest.mark.parametrize("text,needle", [
    ("runtime: onnxruntime\n", "needs an `onnx:` section"),
    ("onnx: {path: m.onnx}\n", "add `runtime: onnxruntime`"),
    ("runtime: tensorrt\n", "'torch' or 'onnxruntime'"),
    ("runtime: onnxruntime\nonnx: {path: ../m.onnx}\n", "outside the entry folder"),
    ("runtime: onnxruntime\nonnx: {path: /etc/m.onnx}\n", "outside the entry folder"),
    ("runtime: onnxruntime\nonnx: {path: a/../../m.onnx}\n", "outside the entry folder"),
    ("runtime: onnxruntime\nonnx: {path: m.onnx, providers: []}\n", "non-empty list"),
    ("runtime: onnxruntime\nonnx: {path: m.onnx, graph_optimization: max}\n", "graph_optimization"),
    ("runtime: onnxruntime\nonnx: {path: m.onnx, threads: 2}\n", "onnx.threads"),
    ("kind: llm\nllm: {path: base}\nruntime: onnxruntime\nonnx: {path: m.onnx}\n", "kind: llm"),
])
def test_invalid_runtime_config_names_the_fix(tmp_path: Path, text: str, needle: str) -> None:
    assert needle in _yaml_error(tmp_path, text)


def test_a_symlink_out_of_the_entry_folder_is_refused(tmp_path: Path) -> None:
    outside = _matmul(tmp_path / "outside.onnx")
    folder = tmp_path / "entry"
    folder.mkdir()
    (folder / "m.onnx").symlink_to(outside)
    assert "outside the entry folder" in _yaml_error(folder, "runtime: onnxruntime\nonnx: {path: m.onnx}\n")


def test_scan_refuses_a_missing_artefact(tmp_path: Path) -> None:
    folder = tmp_path / "repo" / "echo"
    folder.mkdir(parents=True)
    (folder / "model.py").write_text((FIXTURE_ECHO / "model.py").read_text())
    (folder / "tandem.yaml").write_text("runtime: onnxruntime\nonnx: {path: echo.onnx}\n")
    with pytest.raises(ConfigError, match=r"echo\.onnx not found"):
        scan_repository(tmp_path / "repo", builtin_kinds())
    (folder / "tandem.yaml").write_text("device: cpu\n")
    entry = scan_repository(tmp_path / "repo", builtin_kinds())[0]
    assert (entry.config.runtime, entry.platform) == ("torch", "tandem_pytorch")


# --- onnxruntime: signature checks at load -------------------------------------------------------

def _load_error(entry: ModelEntry) -> str:
    with pytest.raises(ConfigError) as info:
        load_runtime(entry, "cpu")
    return str(info.value)


def test_wrong_input_dtype_names_the_artefact_tensor_and_both_dtypes(tmp_path: Path) -> None:
    _matmul(tmp_path / "m.onnx", x_type=TensorProto.INT32)
    err = _load_error(_entry(tmp_path))
    assert str(tmp_path / "m.onnx") in err
    assert "input 'x': graph wants INT32, model.py's TensorSpec gives FP32" in err


@pytest.mark.parametrize("inputs,outputs,kwargs,needle", [
    ((X, TensorSpec("mask", "INT64", (4,))), (Y,), {}, "model.py's input 'mask' is not a graph input"),
    ((X,), (Y,), {"extra_input": True}, "graph input 'scale' is not among model.py's inputs ['x']"),
    ((X,), (Y, TensorSpec("z", "FP32", (3,))), {}, "model.py's output 'z' is not a graph output"),
    ((X,), (Y,), {"x_shape": [1, 4]}, "graph fixes the batch dim at 1"),
    ((TensorSpec("x", "FP32", (4, 1)),), (Y,), {}, "graph rank 2 ['batch', 4], model.py's batches have rank 3"),
    ((TensorSpec("x", "FP32", (-1,), max_shape=(4,)),), (Y,), {}, "graph fixes dim 1 at 4"),
])
def test_signature_mismatches_are_config_errors(tmp_path: Path, inputs: tuple[TensorSpec, ...],
                                                outputs: tuple[TensorSpec, ...], kwargs: dict, needle: str) -> None:
    _matmul(tmp_path / "m.onnx", **kwargs)
    err = _load_error(_entry(tmp_path, inputs, outputs))
    assert needle in err and "fix:" in err


def test_a_fixed_batch_of_one_is_fine_when_batches_have_one_row(tmp_path: Path) -> None:
    _matmul(tmp_path / "m.onnx", x_shape=[1, 4])
    runtime = load_runtime(_entry(tmp_path, max_batch_size=1), "cpu")
    assert runtime.run({"x": np.ones((1, 4), np.float32)})["y"].shape == (1, 3)


def test_missing_or_corrupt_artefacts_name_the_path(tmp_path: Path) -> None:
    assert "m.onnx: ONNX artefact not found" in _load_error(_entry(tmp_path))
    (tmp_path / "m.onnx").write_bytes(b"not a protobuf")
    err = _load_error(_entry(tmp_path))
    assert f"{tmp_path / 'm.onnx'}: ONNX Runtime cannot load it" in err


def test_unavailable_providers_are_refused_with_the_available_ones(tmp_path: Path) -> None:
    _matmul(tmp_path / "m.onnx")
    err = _load_error(_entry(tmp_path, onnx=OnnxConfig(
        path="m.onnx", providers=["NoSuchExecutionProvider", "CPUExecutionProvider"])))
    assert "['NoSuchExecutionProvider'] not available" in err and "CPUExecutionProvider" in err


# --- runs --------------------------------------------------------------------------------------

@pytest.mark.parametrize("level", ["disable", "basic", "extended", "all"])
def test_onnx_run_matches_numpy(tmp_path: Path, level: str) -> None:
    _matmul(tmp_path / "m.onnx")
    onnx_config = OnnxConfig(path="m.onnx", graph_optimization=level)  # type: ignore[arg-type]
    runtime = load_runtime(_entry(tmp_path, onnx=onnx_config), "cpu")
    assert isinstance(runtime, OnnxRuntime) and runtime.providers == ["CPUExecutionProvider"]
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    out = runtime.run({"x": x})
    assert list(out) == ["y"] and out["y"].dtype == np.float32
    np.testing.assert_allclose(out["y"], x @ W, rtol=1e-6, atol=1e-6)


def test_torch_runtime_runs_model_py_predict(tmp_path: Path) -> None:
    entry = scan_repository(FIXTURE_ECHO, builtin_kinds())[0]
    runtime = load_runtime(entry, "cpu")
    assert isinstance(runtime, TorchRuntime)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = runtime.run({"x": x})
    assert sorted(out) == ["pid", "total", "y"] and all(isinstance(v, np.ndarray) for v in out.values())
    np.testing.assert_array_equal(out["y"], 2 * x)
    np.testing.assert_array_equal(out["total"], x.sum(axis=1, keepdims=True))
    assert runtime.memory_used()[1] == "process RSS"


def test_warm_up_batches_follow_the_specs() -> None:
    specs = (TensorSpec("ids", "INT64", (-1,), max_shape=(32,)), TensorSpec("img", "FP16", (3, 2)))
    entry = ModelEntry(0, ModelConfig(name="m"), BatchingConfig(max_batch_size=2), specs, (Y,), 2, Path("."))
    shapes = [{k: (v.shape, v.dtype) for k, v in b.items()} for b in warm_up_batches(entry)]
    assert shapes == [{"ids": ((2, 16), np.int64), "img": ((2, 3, 2), np.float16)},
                      {"ids": ((2, 32), np.int64), "img": ((2, 3, 2), np.float16)}]


def test_memory_limit_and_warm_up_apply_to_onnxruntime(tmp_path: Path) -> None:
    _matmul(tmp_path / "m.onnx")
    assert isinstance(_setup_runtime(_entry(tmp_path, memory_limit="4GiB")), OnnxRuntime)
    with pytest.raises(RuntimeError, match=r"process RSS.*over its memory_limit of 1 MiB"):
        _setup_runtime(_entry(tmp_path, memory_limit="1MiB"))
