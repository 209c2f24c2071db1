"""The optimizer's CUDA and TensorRT paths (need a GPU and onnxruntime-gpu; skipped without them)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from tandem.optimize.api import resolve_provider
from tandem.optimize.doctor import DoctorSettings, confirm_fp32, evaluate
from tandem.optimize.export import export_module
from tandem.optimize.runtime import available_providers, make_session, run_batches
from tandem.optimize.targets import get_target
from tandem.optimize.types import Tolerance
from tests.unit.test_optimize_doctor import Outlier, matmul_reading

pytestmark = pytest.mark.gpu


def _need(provider: str) -> None:
    if provider not in available_providers():
        pytest.skip(f"{provider} needs onnxruntime-gpu (this onnxruntime has {available_providers()})")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    path = tmp_path_factory.mktemp("gpu") / "outlier.onnx"
    export_module(Outlier().eval(), {"x": torch.randn(2, 8, 64)}, path, exporter="torchscript")
    return onnx.load(str(path))


@pytest.fixture(scope="module")
def calib() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal((8, 16, 64)).astype(np.float32)} for _ in range(2)]


def test_cuda_fp16_keeps_the_fp32_island_and_profiles_it(model, calib):
    _need("CUDAExecutionProvider")
    settings = DoctorSettings(Tolerance(atol=1.0), "CUDAExecutionProvider", progress=False)
    refs = run_batches(make_session(model, "CUDAExecutionProvider"), calib)
    target = get_target("fp16")
    l2 = matmul_reading(model, "l2")
    ev = evaluate(model, target, [l2], calib, refs, settings)
    assert ev.errors[0].cosine_min is not None and ev.errors[0].cosine_min > 0.999
    assert confirm_fp32(target, ev.model, [l2], calib[0], settings) == {}
    # and the node that was not kept really ran in fp16 on the GPU
    l3 = matmul_reading(model, "l3")
    problems = confirm_fp32(target, ev.model, [l3], calib[0], settings)
    assert l3 in problems and "float16" in problems[l3]


def test_tensorrt_is_preferred_and_its_engine_precisions_are_reported_unverifiable(model, calib):
    _need("TensorrtExecutionProvider")
    assert resolve_provider("auto") == "TensorrtExecutionProvider"
    settings = DoctorSettings(Tolerance(atol=1.0), "TensorrtExecutionProvider", progress=False)
    target = get_target("fp16")
    l2 = matmul_reading(model, "l2")
    built = target.build(model, [l2])
    problems = confirm_fp32(target, built, [l2], calib[0], settings)
    assert "TensorRT engine" in problems[l2]
