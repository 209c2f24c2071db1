"""`tandem optimize` on a diffusion entry: the UNet measured on each runtime over whole requests.

The entry is the TINY random pipeline at 16x16 with 3-step requests, so a run takes seconds; the
ONNX export is the same cached one a `unet: {runtime: ...}` entry loads (tests/unit/test_diffusion_runtimes.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from tandem.cli import app
from tandem.config import load_model_config
from tandem.diffusion.engine import DenoiseEngine, run_alone
from tandem.diffusion.optimize import _results, calibration_jobs, optimize_diffusion, psnr
from tandem.diffusion.pipeline import load_stages
from tandem.diffusion.testing import TINY, make_random_pipeline
from tandem.errors import OptimizeError
from tandem.serving.repository import default_repository
from tests.parity import assert_same_image

REQUESTS = [{"prompt": "a red circle", "parameters": {"num_inference_steps": 3, "seed": 5}},
            {"prompt": "a cat", "parameters": {"num_inference_steps": 3, "guidance_scale": 1.0}}]


@pytest.fixture(scope="module")
def entry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("repo") / "drawing"
    make_random_pipeline(folder / "pipeline", TINY, seed=0)
    (folder / "tandem.yaml").write_text(yaml.safe_dump({"kind": "diffusion", "diffusion": {
        "sizes": ["16x16"], "default_steps": 3, "max_batch_rows": 4, "unet": {"channels_last": False}}}))
    (folder / "calibration.jsonl").write_text("".join(json.dumps(r) + "\n" for r in REQUESTS))
    return folder


@pytest.fixture(autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["optimize", *args, "--no-progress", "--threads", "1", "--repeats", "1"])
    return result.exit_code, result.output


def test_each_runtime_runs_every_request_and_matches_torch(entry: Path, tmp_path: Path) -> None:
    outcome = optimize_diffusion(entry, tmp_path, candidates=["onnxruntime"], threads=1, repeats=2)
    by = {r.runtime: r for r in outcome.results}
    assert set(by) == {"torch", "onnxruntime"} and outcome.requests == 2
    assert by["onnxruntime"].psnr_min >= 40 and by["onnxruntime"].passed
    assert by["torch"].speedup == 1.0 and all(r.seconds > 0 for r in by.values())
    assert outcome.chosen in ("torch", "onnxruntime")
    report = json.loads((tmp_path / "diffusion-report.json").read_text())
    assert report["chosen"] == outcome.chosen and [r["runtime"] for r in report["results"]] == ["torch", "onnxruntime"]
    assert list(outcome.graphs) == ["16x16"] and Path(outcome.graphs["16x16"]).is_file()


def test_min_speedup_decides_between_a_passing_runtime_and_torch(entry: Path, tmp_path: Path) -> None:
    never = optimize_diffusion(entry, tmp_path / "a", candidates=["onnxruntime"], threads=1, repeats=1,
                               min_speedup=1e6)
    assert never.chosen == "torch"
    always = optimize_diffusion(entry, tmp_path / "b", candidates=["onnxruntime"], threads=1, repeats=1,
                                min_speedup=0.0)
    assert always.chosen == "onnxruntime"


def test_a_faster_runtime_whose_images_differ_is_not_chosen() -> None:
    rng = np.random.default_rng(0)
    ref = [rng.integers(0, 256, (1, 16, 16, 3), dtype=np.uint8) for _ in range(2)]
    noisy = [np.clip(r.astype(int) + rng.integers(-40, 41, r.shape), 0, 255).astype(np.uint8) for r in ref]
    exact = [r.copy() for r in ref]
    seconds = {"torch": [[1.0], [1.0]], "fast": [[0.1], [0.1]], "exact": [[0.5], [0.5]]}
    results = {r.runtime: r for r in _results(seconds, {"torch": ref, "fast": noisy, "exact": exact},
                                              {"openvino": "openvino is not installed"}, 40.0)}
    assert results["fast"].speedup == pytest.approx(10.0) and not results["fast"].passed
    assert results["fast"].psnr_min == pytest.approx(min(psnr(a, b) for a, b in zip(noisy, ref)))
    assert results["exact"].passed and results["exact"].psnr_min == float("inf")
    assert results["openvino"].refused and not results["openvino"].passed


def test_the_written_entry_serves_the_chosen_runtime_from_the_cached_export(entry: Path, tmp_path: Path) -> None:
    dest = tmp_path / "repo" / "drawing-fast"
    code, out = invoke(str(entry), "--target", "onnxruntime", "--min-speedup", "0", "--out", str(tmp_path / "o"),
                       "--write-entry", str(dest))
    assert code == 0, out
    assert "chosen: unet.runtime onnxruntime" in out and "entry written" in out
    config = load_model_config(dest)
    assert config.name == "drawing-fast" and config.kind == "diffusion" and config.diffusion is not None
    assert config.diffusion.unet.runtime == "onnxruntime"
    assert config.diffusion.pipeline_dir(dest) == (entry / "pipeline").resolve()
    assert (dest / "diffusion-report.json").is_file()
    graphs = sorted((Path(json.loads((dest / "diffusion-report.json").read_text())["graphs"]["16x16"])).parent.glob(
        "unet-*.onnx"))
    stamps = [g.stat().st_mtime_ns for g in graphs]
    fast = load_stages(config.diffusion.pipeline_dir(dest), config.diffusion, "cpu")
    assert [g.stat().st_mtime_ns for g in graphs] == stamps and fast.unet_runtimes  # nothing exported again
    source = load_model_config(entry)
    assert source.diffusion is not None
    torch_stages = load_stages(source.diffusion.pipeline_dir(entry), source.diffusion, "cpu")
    spec = calibration_jobs(entry, source.diffusion)[0]
    got = run_alone(DenoiseEngine(fast, config.diffusion), [spec.job(1)])[1]
    want = run_alone(DenoiseEngine(torch_stages, source.diffusion), [spec.job(1)])[1]
    assert_same_image(got.numpy(), want.numpy(), what="the written entry's onnxruntime UNet vs torch")
    code, out = invoke(str(entry), "--target", "onnxruntime", "--write-entry", str(entry / "pipeline"), "--out",
                       str(tmp_path / "refused"))
    assert code == 2 and "was not written by tandem optimize" in out
    assert not (tmp_path / "refused").exists()  # refused before measuring


def test_calibration_requests_are_checked_as_the_server_checks_them(entry: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a cat", "parameters": {"width": 64, "height": 64}}) + "\n")
    code, out = invoke(str(entry), "--calibration", str(bad), "--out", str(tmp_path))
    assert code == 2 and "calibration request 1" in out and "64x64" in out and "16x16" in out
    bad.write_text(json.dumps({"prompt": "x" * 200}) + "\n")
    with pytest.raises(OptimizeError, match="prompt is .* tokens"):
        calibration_jobs(entry, load_model_config(entry).diffusion, bad)  # type: ignore[arg-type]
    bad.write_text("[1, 2]\n")
    with pytest.raises(OptimizeError, match="JSON object"):
        calibration_jobs(entry, load_model_config(entry).diffusion, bad)  # type: ignore[arg-type]


def test_tensor_targets_and_unknown_runtimes_are_refused_for_a_diffusion_entry(entry: Path, tmp_path: Path) -> None:
    code, out = invoke(str(entry), "--target", "int8-dynamic", "--out", str(tmp_path))
    assert code == 2 and "onnxruntime, openvino" in out


def test_without_calibration_the_default_prompts_cover_every_bucket(tmp_path: Path, entry: Path) -> None:
    cfg = load_model_config(entry).diffusion
    assert cfg is not None
    two = cfg.model_copy(update={"sizes": ["16x16", "32x32"]})
    specs = calibration_jobs(tmp_path, two.model_copy(update={"path": str(entry / "pipeline")}))
    assert {(s.params.width, s.params.height) for s in specs} == {(16, 16), (32, 32)}
    assert len({s.params.seed for s in specs}) == len(specs)  # fixed, distinct seeds


def test_the_built_in_entrys_calibration_requests_are_valid() -> None:
    folder = default_repository() / "text-to-image"
    cfg = load_model_config(folder).diffusion
    assert cfg is not None
    specs = calibration_jobs(folder, cfg)
    assert len(specs) == 4 and all((s.params.width, s.params.height) == cfg.buckets()[0] for s in specs)
