"""`tandem.optimize.export` and `tandem.optimize.onnx_io`: signature probing, both exporters, the
fresh-input parity check, exporter errors, and ONNX files that are missing, corrupt or misfed."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from tandem.errors import ExportError, InvalidOnnx
from tandem.optimize import export as export_mod
from tandem.optimize import onnx_io
from tandem.optimize.export import ExportResult, detect_signature, export_callable, export_module
from tandem.optimize.onnx_io import GraphSignature, TensorInfo, check_feeds, load_onnx, save_onnx, signature_of


@torch.library.custom_op("tandem_test::weird", mutates_args=())
def weird(x: torch.Tensor) -> torch.Tensor:
    """A custom op with no ONNX translation in either exporter."""
    return x * 2


@weird.register_fake
def _weird_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class Encoder(torch.nn.Module):
    """Linear + LayerNorm + GELU over x: [B, S, D], masked by an int mask: [B, S]."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(dim, dim)
        self.norm = torch.nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        weights = mask.unsqueeze(-1).to(x.dtype)  # [B, S, 1]
        hidden = torch.nn.functional.gelu(self.norm(self.lin(x))) * weights  # [B, S, D]
        return {"hidden": hidden, "pooled": hidden.sum(1) / weights.sum(1).clamp(min=1.0)}


class ConvNet(torch.nn.Module):
    """Conv + global pooling: any batch, height and width."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(pixels)).mean(dim=(2, 3)))


class FixedSizeConvNet(ConvNet):
    """Conv + a flatten into a Linear sized for 8x8 images: height and width are fixed."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(8 * 8 * 8, 4)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.conv(pixels))  # [B, 8, 8, 8]
        return self.head(features.reshape(features.shape[0], 8 * 8 * 8))


class Weird(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return weird(x) + 1


class BatchSpecialised(torch.nn.Module):
    """Python control flow on a shape: each exporter bakes in the sample's branch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.shape[0] == 2 else x * 3


def encoder_sample(batch: int = 2, seq: int = 5) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(batch, seq, 16), "mask": torch.ones(batch, seq, dtype=torch.long)}


def run_onnx(path: Path, feeds: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {k: v.numpy() for k, v in feeds.items()})
    return dict(zip([o.name for o in session.get_outputs()], outputs))


# ------------------------------------------------------------------------------------------ exporting


@pytest.fixture(scope="module")
def encoder_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Encoder, ExportResult]:
    torch.manual_seed(0)
    module = Encoder()
    result = export_module(module, encoder_sample(), tmp_path_factory.mktemp("encoder") / "encoder.onnx")
    return module, result


def test_detect_signature_names_batch_and_seq() -> None:
    signature = detect_signature(Encoder(), encoder_sample())
    assert signature.inputs == [TensorInfo("x", "float32", ("batch", "seq", 16)),
                                TensorInfo("mask", "int64", ("batch", "seq"))]
    assert signature.outputs == [TensorInfo("hidden", "float32", ("batch", "seq", 16)),
                                 TensorInfo("pooled", "float32", ("batch", 16))]


def test_detect_signature_output_names_for_tuples_and_tensors() -> None:
    assert [o.name for o in detect_signature(ConvNet(), {"pixels": torch.randn(2, 3, 8, 8)}).outputs] == ["output"]
    signature = detect_signature(ConvNet(), {"pixels": torch.randn(2, 3, 8, 8)}, output_names=["logits"])
    assert signature.outputs == [TensorInfo("logits", "float32", ("batch", 4))]


def test_encoder_exports_with_dynamo_and_passes_the_fresh_input_check(
        encoder_export: tuple[Encoder, ExportResult]) -> None:
    _, result = encoder_export
    assert result.exporter == "dynamo" and result.fallbacks == []
    assert result.check_max_abs_err is not None and result.check_max_abs_err <= 1e-4
    assert result.signature == detect_signature(Encoder(), encoder_sample())
    assert result.path.is_file() and not result.path.with_name(result.path.name + ".data").exists()
    assert signature_of(load_onnx(result.path)) == result.signature


def test_encoder_onnx_runs_at_another_batch_and_length(encoder_export: tuple[Encoder, ExportResult]) -> None:
    module, result = encoder_export
    feeds = encoder_sample(batch=5, seq=9)
    feeds["mask"][1, 4:] = 0  # a padded row
    got = run_onnx(result.path, feeds)
    with torch.inference_mode():
        want = module(**feeds)
    for name in ("hidden", "pooled"):
        np.testing.assert_allclose(got[name], want[name].numpy(), atol=1e-5, rtol=1e-4)


def test_torchscript_exporter_gives_the_same_signature(tmp_path: Path) -> None:
    result = export_module(Encoder(), encoder_sample(), tmp_path / "ts.onnx", exporter="torchscript")
    assert result.exporter == "torchscript"
    assert result.signature == detect_signature(Encoder(), encoder_sample())
    assert result.check_max_abs_err is not None and result.check_max_abs_err <= 1e-4


def test_sample_of_batch_one_and_length_one_still_exports_dynamic_axes(tmp_path: Path) -> None:
    # torch.export specialises dims of size 1: the export must use a grown copy of the sample
    result = export_module(Encoder(), encoder_sample(batch=1, seq=1), tmp_path / "one.onnx")
    assert result.exporter == "dynamo"
    assert result.signature.inputs[0] == TensorInfo("x", "float32", ("batch", "seq", 16))
    assert run_onnx(result.path, encoder_sample(batch=4, seq=6))["hidden"].shape == (4, 6, 16)


def test_check_inputs_are_fresh_sizes_and_values() -> None:
    sample = {"ids": torch.randint(5, 50, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long),
              "x": torch.randn(2, 12, 16)}

    class Model(torch.nn.Module):
        def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return x.sum(-1) * attention_mask + ids

    plan = export_mod._make_plan(Model(), "Model", sample, None, None)
    fresh = export_mod._fresh_inputs(plan)
    assert fresh["ids"].shape == fresh["attention_mask"].shape == (3, 13) and fresh["x"].shape == (3, 13, 16)
    assert fresh["ids"].dtype == torch.int64 and 5 <= int(fresh["ids"].min()) and int(fresh["ids"].max()) < 50
    assert bool((fresh["attention_mask"] == 1).all())
    assert not torch.equal(fresh["x"][:2, :12], sample["x"])


def test_image_model_has_dynamic_batch_height_and_width(tmp_path: Path) -> None:
    sample = {"pixels": torch.randn(2, 3, 8, 8)}
    signature = detect_signature(ConvNet(), sample)
    assert signature.inputs == [TensorInfo("pixels", "float32", ("batch", 3, "height", "width"))]
    assert signature.outputs == [TensorInfo("output", "float32", ("batch", 4))]
    result = export_module(ConvNet(), sample, tmp_path / "conv.onnx", exporter="torchscript")
    got = run_onnx(result.path, {"pixels": torch.randn(3, 3, 11, 6)})
    assert got["output"].shape == (3, 4)


def test_reshape_keeps_height_and_width_fixed(tmp_path: Path) -> None:
    sample = {"pixels": torch.randn(2, 3, 8, 8)}
    signature = detect_signature(FixedSizeConvNet(), sample)
    assert signature.inputs == [TensorInfo("pixels", "float32", ("batch", 3, 8, 8))]
    result = export_module(FixedSizeConvNet(), sample, tmp_path / "fixed.onnx")
    assert result.signature.inputs[0].shape == ("batch", 3, 8, 8)
    assert run_onnx(result.path, {"pixels": torch.randn(4, 3, 8, 8)})["output"].shape == (4, 4)


def test_unsupported_operator_names_the_op_and_both_exporters(tmp_path: Path) -> None:
    path = tmp_path / "weird.onnx"
    with pytest.raises(ExportError) as info:
        export_module(Weird(), {"x": torch.randn(2, 3)}, path)
    message = str(info.value)
    assert message.startswith("could not export Weird to ONNX: operator 'tandem_test::weird' is not supported")
    assert "dynamo exporter: " in message and "torchscript exporter: " in message and "Fix:" in message
    assert not path.exists()


def test_graph_that_differs_from_torch_fails_the_check(tmp_path: Path) -> None:
    with pytest.raises(ExportError) as info:
        export_module(BatchSpecialised(), {"x": torch.randn(2, 3)}, tmp_path / "b.onnx")
    message = str(info.value)
    assert "does not match PyTorch" in message and "output 'output'" in message
    assert "dynamo exporter: ValueError: Found the following conflicts" in message  # it specialised batch
    assert "torchscript exporter: output 'output'" in message and "max abs error" in message


def test_dynamo_graph_failing_the_check_falls_back_to_torchscript(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_dynamo(*args: Any) -> onnx.ModelProto:
        model = export_mod._export_torchscript(*args)
        weight = next(t for t in model.graph.initializer if t.name.endswith("norm.weight"))
        weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) * 1.5, weight.name))
        return model

    monkeypatch.setitem(export_mod._EXPORTERS, "dynamo", broken_dynamo)
    result = export_module(Encoder(), encoder_sample(), tmp_path / "e.onnx")
    assert result.exporter == "torchscript"
    assert len(result.fallbacks) == 1 and result.fallbacks[0].startswith("dynamo exporter: output '")


# ---------------------------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm() -> Any:
    from tandem.default_repo.embeddings.model import Embeddings

    model = Embeddings()
    model.setup("cpu")
    return model


def test_minilm_predict_exports_with_embedding_output(minilm: Any, tmp_path: Path) -> None:
    sample = {"input_ids": torch.randint(1000, 5000, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    result = export_callable(minilm.predict, sample, tmp_path / "minilm.onnx")
    assert result.signature.inputs == [TensorInfo("input_ids", "int64", ("batch", "seq")),
                                       TensorInfo("attention_mask", "int64", ("batch", "seq"))]
    assert result.signature.outputs == [TensorInfo("embedding", "float32", ("batch", 384))]
    onnx.checker.check_model(str(result.path), full_check=True)  # no "Duplicate definition of name"
    feeds = {"input_ids": torch.randint(1000, 5000, (3, 17)), "attention_mask": torch.ones(3, 17, dtype=torch.long)}
    feeds["attention_mask"][2, 9:] = 0
    got = run_onnx(result.path, feeds)["embedding"]
    with torch.inference_mode():
        want = minilm.predict(feeds)["embedding"].numpy()
    assert np.abs(got - want).max() <= 1e-4


# --------------------------------------------------------------------------------------------- onnx_io


def tiny_model(intermediate: str = "hidden", width: int = 3) -> onnx.ModelProto:
    """y = -relu(x @ w) with x: float32[batch, 4], w: [4, width]; the Relu output is `intermediate`."""
    w = onnx.numpy_helper.from_array(np.arange(4 * width, dtype=np.float32).reshape(4, width) / 10, "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Relu", ["mm"], [intermediate]),
         helper.make_node("Neg", [intermediate], ["y"])],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


@pytest.fixture
def tiny_path(tmp_path: Path) -> Iterator[Path]:
    yield save_onnx(tiny_model(), tmp_path / "tiny.onnx")


def test_load_onnx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidOnnx, match=r"nope\.onnx: no such file"):
        load_onnx(tmp_path / "nope.onnx")


def test_load_onnx_truncated_file(encoder_export: tuple[Encoder, ExportResult], tmp_path: Path) -> None:
    data = encoder_export[1].path.read_bytes()
    half = tmp_path / "half.onnx"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidOnnx, match=r"half\.onnx is not a valid ONNX model \(corrupt or truncated\?\)"):
        load_onnx(half)


def test_load_onnx_random_bytes(tmp_path: Path) -> None:
    noise = tmp_path / "noise.onnx"
    noise.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(InvalidOnnx, match=r"noise\.onnx is not a valid ONNX model"):
        load_onnx(noise)


def test_load_onnx_checker_failure(tmp_path: Path) -> None:
    model = tiny_model()
    model.graph.node[1].input[0] = "undefined_value"
    path = tmp_path / "bad.onnx"
    onnx.save_model(model, str(path))
    with pytest.raises(InvalidOnnx, match=r"bad\.onnx fails the ONNX checker: .*undefined_value"):
        load_onnx(path)


def test_save_onnx_large_model_uses_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_io, "SINGLE_FILE_LIMIT", 0)
    model = tiny_model(width=300)  # 4.8 kB of weights: over save_onnx's 1 kB external-data threshold
    path = save_onnx(model, tmp_path / "big.onnx")
    data = tmp_path / "big.onnx.data"
    assert data.is_file() and model.graph.initializer[0].raw_data  # the caller's model keeps its weights
    loaded = load_onnx(path)
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(loaded.graph.initializer[0]),
                                  onnx.numpy_helper.to_array(model.graph.initializer[0]))
    data.unlink()
    with pytest.raises(InvalidOnnx, match=r"big\.onnx: external data file 'big\.onnx\.data' .* is missing"):
        load_onnx(path)


def test_signature_of_skips_initializer_inputs(tiny_path: Path) -> None:
    model = load_onnx(tiny_path)
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3]))
    assert signature_of(model) == GraphSignature([TensorInfo("x", "float32", ("batch", 4))],
                                                 [TensorInfo("y", "float32", ("batch", 3))])


def test_set_io_names_renames_a_clashing_intermediate_first(tmp_path: Path) -> None:
    model = tiny_model(intermediate="embedding")
    onnx_io.set_io_names(model, ["features"], ["embedding"])
    onnx.checker.check_model(model, full_check=True)
    assert [o.name for o in model.graph.output] == ["embedding"] and model.graph.input[0].name == "features"
    x = np.ones((2, 4), np.float32)
    got = run_onnx(save_onnx(model, tmp_path / "renamed.onnx"), {"features": torch.from_numpy(x)})
    np.testing.assert_allclose(got["embedding"], -np.maximum(x @ (np.arange(12).reshape(4, 3) / 10), 0), rtol=1e-6)


SIGNATURE = GraphSignature(
    inputs=[TensorInfo("input_ids", "int64", ("batch", "seq")), TensorInfo("pixels", "float32", ("batch", 3))],
    outputs=[TensorInfo("y", "float32", ("batch",))],
)


def good_feeds() -> dict[str, np.ndarray]:
    return {"input_ids": np.zeros((2, 7), np.int64), "pixels": np.zeros((2, 3), np.float32)}


def test_check_feeds_accepts_matching_feeds() -> None:
    check_feeds(SIGNATURE, good_feeds())


@pytest.mark.parametrize(("change", "expected"), [
    (lambda f: f.update(input_ids=f["input_ids"].astype(np.int32)),
     "input 'input_ids': dtype int32, the graph expects int64"),
    (lambda f: f.pop("pixels"), "input 'pixels' is missing"),
    (lambda f: f.update(extra=np.zeros(1)), "unknown input 'extra'"),
    (lambda f: f.update(input_ids=np.zeros((2, 7, 1), np.int64)), "input 'input_ids': rank 3"),
    (lambda f: f.update(pixels=np.zeros((2, 4), np.float32)), "input 'pixels': dim 1 is 4, the graph fixes it to 3"),
    (lambda f: f.update(pixels=np.zeros((5, 3), np.float32)), "input 'pixels': dim 0 ('batch') is 5"),
])
def test_check_feeds_names_the_wrong_input(change: Any, expected: str) -> None:
    feeds = good_feeds()
    change(feeds)
    with pytest.raises(InvalidOnnx) as info:
        check_feeds(SIGNATURE, feeds)
    assert expected in str(info.value)
    assert "the graph's inputs: input_ids: int64[batch, seq], pixels: float32[batch, 3]" in str(info.value)
