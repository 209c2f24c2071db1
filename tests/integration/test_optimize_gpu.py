"""The optimizer's CUDA and TensorRT paths (need a GPU and onnxruntime-gpu; skipped without them)."""
# ruff: noqa: F811  (pytest injects the imported fixtures `model` and `calib` by parameter name)

from __future__ import annotations

import pytest

from tandem.optimize.api import resolve_provider
from tandem.optimize.doctor import DoctorSettings, confirm_fp32, evaluate
from tandem.optimize.runtime import available_providers, make_session, run_batches
from tandem.optimize.targets import get_target
from tandem.optimize.types import Tolerance

# The unit tier's model and calibration fixtures (the Outlier network), reused as they are.
from tests.unit.test_optimize_doctor import calib, matmul_reading, model  # noqa: F401

pytestmark = pytest.mark.gpu


def _need(provider: str) -> None:
    """These tests run only where CUDA exists: a missing CUDA provider is a broken install, not a skip."""
    if provider in available_providers():
        return
    if provider == "CUDAExecutionProvider":
        pytest.fail(f"CUDA is available but onnxruntime has no {provider} ({available_providers()}): "
                    "install onnxruntime-gpu (pip install 'tandem-ai[gpu]')")
    pytest.skip(f"{provider} needs TensorRT libraries beside onnxruntime-gpu (this onnxruntime has "
                f"{available_providers()})")


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
