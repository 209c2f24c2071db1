"""The diffusion kind's CUDA path: bf16 stages, SDPA, channels_last, compiled UNet without recompiles, replicas.

Run where a GPU exists (`pytest -m gpu`); skipped elsewhere by the conftest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tandem.config import DiffusionConfig, StageConfig
from tandem.diffusion.engine import DenoiseEngine, Job, run_alone
from tandem.diffusion.messages import ImageParams
from tandem.diffusion.pipeline import load_stages
from tandem.diffusion.testing import make_random_pipeline
from tandem.diffusion.text import PromptTokenizer
from tests.conftest import diffusion_repo, start_server
from tests.parity import psnr

pytestmark = pytest.mark.gpu


def _jobs(tok: PromptTokenizer, n: int, **kw: Any) -> list[Job]:
    (cond, cl), (uncond, ul) = tok.encode("a red circle", "prompt"), tok.encode("", "negative_prompt")
    base = {"width": 32, "height": 32, "steps": 6, "guidance": 5.0, "sampler": "dpmpp_2m", "seed": 1}
    return [Job(i + 1, 0, ImageParams(**{**base, "seed": i, **kw}), cond, uncond, cl, ul) for i in range(n)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_pipeline(tmp_path_factory.mktemp("sd-gpu") / "pipeline")


def test_bf16_stages_on_cuda_follow_fp32_on_the_cpu(folder: Path) -> None:
    """bf16 carries 8 mantissa bits: the images stay close to fp32 (a looser bound than the 40 dB fp32 rule)."""
    tok = PromptTokenizer(folder)
    cfg = DiffusionConfig(sizes=["32x32"])
    cpu = run_alone(DenoiseEngine(load_stages(folder, cfg, "cpu"), cfg), _jobs(tok, 2))
    gpu_stages = load_stages(folder, cfg, "cuda")
    assert gpu_stages.dtypes["unet"] == torch.bfloat16 and gpu_stages.devices["vae"] == "cuda"
    gpu = run_alone(DenoiseEngine(gpu_stages, cfg), _jobs(tok, 2))
    for k in cpu:
        assert psnr(gpu[k], cpu[k]) >= 25, "bf16 on CUDA drifted far from fp32"


def test_sdpa_and_channels_last(folder: Path) -> None:
    cfg = DiffusionConfig(sizes=["32x32"], unet=StageConfig(channels_last=True))
    stages = load_stages(folder, cfg, "cuda")
    procs = {type(p).__name__ for p in stages.unet.attn_processors.values()}
    assert procs == {"AttnProcessor2_0"}, procs  # torch's scaled_dot_product_attention
    conv = stages.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    tok = PromptTokenizer(folder)
    assert len(run_alone(DenoiseEngine(stages, cfg), _jobs(tok, 1))) == 1


def test_compiled_unet_never_recompiles_inside_a_bucket(folder: Path) -> None:
    """Rows are padded to max_batch_rows, so every iteration of a bucket has one shape after warm-up."""
    from tandem.diffusion.worker import warm_up

    cfg = DiffusionConfig(sizes=["32x32", "16x16"], max_batch_rows=8, unet=StageConfig(compile=True))
    stages = load_stages(folder, cfg, "cuda")
    engine = DenoiseEngine(stages, cfg, pad_rows=cfg.max_batch_rows)
    warm_up(engine, folder)
    tok = PromptTokenizer(folder)
    torch.compiler.set_stance("fail_on_recompile")
    try:
        mixed = _jobs(tok, 2, n=2) + _jobs(tok, 1, guidance=1.0, steps=9, sampler="euler") + _jobs(
            tok, 1, width=16, height=16, sampler="euler_a")
        for i, j in enumerate(mixed):
            j.req_id = 100 + i
        assert len(run_alone(engine, mixed)) == 4
    finally:
        torch.compiler.set_stance("default")


def test_two_unet_replicas_share_one_gpu_under_a_memory_limit(tmp_path: Path) -> None:
    root = diffusion_repo(tmp_path)
    cfg = root / "t2i" / "tandem.yaml"
    cfg.write_text(cfg.read_text().replace("kind: diffusion\n", "kind: diffusion\ndevice: cuda\ninstances: 2\n"
                                                                "memory_limit: 2GiB\n"))
    server = start_server(root)
    try:
        with server.client(timeout=120) as c:
            for seed in range(6):
                r = c.post("/predictions/t2i", json={"prompt": "x", "parameters": {"seed": seed}})
                assert r.status_code == 200 and r.headers["content-type"] == "image/png"
            metrics = c.get("/metrics").text
        assert 'tandem_diffusion_stage_seconds_count{model="t2i",stage="unet_iteration"}' in metrics
    finally:
        assert server.stop() == 0
