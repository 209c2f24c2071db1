"""The UNet stage on ONNX Runtime and OpenVINO equals torch eager (fp32 tolerance) on the TINY pipeline.

The ONNX graph is made with the TorchScript exporter (`dynamo=False`): the dynamo exporter takes
10-30 s even for TINY on two cores; benchmarks/diffusion_runtimes.py measures the dynamo graph.
Batch sizes differ from the export's example batch (2), so the dynamic batch axis is exercised.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tandem.config import DiffusionConfig
from tandem.diffusion.engine import DenoiseEngine, Job, run_alone
from tandem.diffusion.messages import ImageParams
from tandem.diffusion.pipeline import load_stages, make_unet_runtime
from tandem.diffusion.runtimes import OnnxUNet, OpenVinoUNet, convert_unet_openvino, export_unet_onnx
from tandem.diffusion.testing import TINY, make_random_pipeline
from tandem.diffusion.text import PromptTokenizer
from tests.parity import assert_close_to_reference, assert_same_image

SIZE = 16  # pixels; TINY's VAE halves it: 8x8 latents
BATCHES = [1, 3]  # the export's example batch is 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_pipeline(tmp_path_factory.mktemp("sd") / "pipeline", TINY, seed=0)


@pytest.fixture(scope="module")
def stages(folder: Path) -> Any:
    return load_stages(folder, DiffusionConfig(sizes=[f"{SIZE}x{SIZE}"], max_batch_rows=8), "cpu")


@pytest.fixture(scope="module")
def shapes(stages: Any, folder: Path) -> tuple[tuple[int, ...], tuple[int, ...]]:
    h = SIZE // stages.scale_factor
    return (2, stages.latent_channels, h, h), (2, PromptTokenizer(folder).max_length,
                                                stages.unet.config.cross_attention_dim)


@pytest.fixture(scope="module")
def onnx_path(stages: Any, shapes: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_unet_onnx(stages.unet, tmp_path_factory.mktemp("onnx") / "unet.onnx", *shapes, dynamo=False)


def inputs(b: int, shapes: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    (_, c, h, w), (_, length, d) = shapes
    g = torch.Generator().manual_seed(b)
    # rows at different timesteps, as rows of different requests are in one iteration
    return torch.randn(b, c, h, w, generator=g), torch.linspace(981, 1, b), torch.randn(b, length, d, generator=g)


def check(runtime: Any, stages: Any, shapes: Any, what: str) -> None:
    for b in BATCHES:
        x, t, cond = inputs(b, shapes)
        want = stages.denoise(x, t, cond)
        got = runtime(x, t, cond)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and got.shape == x.shape
        assert float(want.abs().max()) > 0.1  # a real prediction to compare, not zeros
        assert_close_to_reference(got, want, "float32", what=f"{what} UNet vs torch at B={b}")


def test_onnxruntime_unet_matches_torch(stages: Any, shapes: Any, onnx_path: Path) -> None:
    unet = OnnxUNet(onnx_path, ["CPUExecutionProvider"])
    assert unet.threads == torch.get_num_threads()
    assert unet.session.get_session_options().intra_op_num_threads == torch.get_num_threads()
    check(unet, stages, shapes, "ONNX Runtime")


def test_served_onnxruntime_unet_does_not_spin(onnx_path: Path) -> None:
    """The worker's ONNX Runtime UNet shares CPUs with the VAE thread and the fronts: no spinning there."""
    def spinning(unet: OnnxUNet) -> str | None:
        try:
            return str(unet.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning"))
        except RuntimeError:  # not set: ONNX Runtime's default (spin)
            return None

    assert spinning(make_unet_runtime("onnxruntime", onnx_path, threads=1)) == "0"
    assert spinning(OnnxUNet(onnx_path, threads=1)) is None  # the class's own default stays ONNX Runtime's


def test_onnxruntime_unet_in_the_engine_gives_torchs_image(stages: Any, folder: Path, onnx_path: Path) -> None:
    tok = PromptTokenizer(folder)
    (cond, cl), (uncond, ul) = tok.encode("a red fox", "prompt"), tok.encode("", "negative_prompt")
    params = ImageParams(width=SIZE, height=SIZE, steps=4, guidance=5.0, sampler="dpmpp_2m", seed=3)
    cfg = DiffusionConfig(sizes=[f"{SIZE}x{SIZE}"], max_batch_rows=8)
    want = run_alone(DenoiseEngine(stages, cfg), [Job(1, 0, params, cond, uncond, cl, ul)])[1]
    ort_stages = dataclasses.replace(stages)
    ort_stages.denoise = OnnxUNet(onnx_path)
    got = run_alone(DenoiseEngine(ort_stages, cfg), [Job(2, 0, params, cond, uncond, cl, ul)])[2]
    assert got.shape == want.shape and got.dtype == torch.uint8
    assert_same_image(np.asarray(got), np.asarray(want), what="ONNX Runtime UNet in DenoiseEngine vs torch")


@pytest.fixture(scope="module")
def ov_model(onnx_path: Path) -> Any:
    pytest.importorskip("openvino", reason="openvino is not installed (pip install openvino)")
    return convert_unet_openvino(onnx_path)


@pytest.mark.parametrize("static_batch", [False, True], ids=["dynamic", "static-buckets"])
def test_openvino_unet_matches_torch(stages: Any, shapes: Any, ov_model: Any, static_batch: bool) -> None:
    unet = OpenVinoUNet(ov_model, precision="f32", static_batch=static_batch)
    compiled = unet.compiled_model(BATCHES[0])
    assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == torch.get_num_threads()
    assert unet.inference_precision == "f32"  # pinned, whatever this CPU's default (bf16 with AVX512_BF16/AMX)
    check(unet, stages, shapes, f"OpenVINO f32 ({'static' if static_batch else 'dynamic'} batch)")
    assert unet.compiled_batches == (BATCHES if static_batch else [0])  # static: one compiled model per B seen


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_a_configured_unet_runtime_is_exported_once_and_matches_torch(
        runtime: str, folder: Path, stages: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`unet: {runtime: ...}` in tandem.yaml: one export per bucket into TANDEM_CACHE_DIR, reused at the next load."""
    if runtime == "openvino":
        pytest.importorskip("openvino", reason="openvino is not installed (pip install openvino)")
    from tandem.config import StageConfig

    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    cfg = DiffusionConfig(sizes=[f"{SIZE}x{SIZE}", f"{2 * SIZE}x{2 * SIZE}"], unet=StageConfig(runtime=runtime))
    fast = load_stages(folder, cfg, "cpu")
    exported = sorted(tmp_path.glob("diffusion/unet-*.onnx"))
    assert [p.name.rsplit("-", 1)[1] for p in exported] == ["16x16.onnx", "8x8.onnx"]
    stamps = [p.stat().st_mtime_ns for p in exported]
    load_stages(folder, cfg, "cpu")
    assert [p.stat().st_mtime_ns for p in exported] == stamps  # the cache was used
    tok = PromptTokenizer(folder)
    (c, cl), (u, ul) = tok.encode("a red circle", "prompt"), tok.encode("", "negative_prompt")
    for size in (SIZE, 2 * SIZE):
        jobs = [Job(1, 0, ImageParams(size, size, 5, 4.0, "dpmpp_2m", 3), c, u, cl, ul)]
        want = run_alone(DenoiseEngine(stages, cfg), [dataclasses.replace(jobs[0])])[1]
        got = run_alone(DenoiseEngine(fast, cfg), jobs)[1]
        assert_same_image(got.numpy(), want.numpy(), what=f"{runtime} UNet at {size}px vs torch eager")
