"""Request checks of the diffusion kind: buckets, steps, guidance, samplers, seeds, images, prompt length, formats."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.config import DiffusionConfig
from tandem.diffusion.a1111 import parse_txt2img
from tandem.diffusion.client import ImageRequest, Validator
from tandem.diffusion.images import negotiate
from tandem.diffusion.openai_images import parse_generation
from tandem.diffusion.routes import parse_invocation
from tandem.diffusion.testing import make_random_pipeline
from tandem.diffusion.text import PromptTokenizer
from tandem.errors import ConfigError, InvalidInput


@pytest.fixture(scope="module")
def v(tmp_path_factory: pytest.TempPathFactory) -> Validator:
    folder = make_random_pipeline(tmp_path_factory.mktemp("sd") / "pipeline")
    cfg = DiffusionConfig(sizes=["64x64", "32x48"], max_steps=50, max_images=3, max_batch_rows=4)
    return Validator(cfg, PromptTokenizer(folder), "t2i")


def fails(v: Validator, field: str, **kw: object) -> str:
    with pytest.raises(InvalidInput) as e:
        v.params(ImageRequest(prompt="x", **kw))  # type: ignore[arg-type]
    assert getattr(e.value, "param", None) == field
    return str(e.value)


def test_defaults_fill_in(v: Validator) -> None:
    p = v.params(ImageRequest(prompt="a"))
    assert (p.width, p.height, p.steps, p.guidance, p.sampler, p.n) == (64, 64, 20, 7.5, "dpmpp_2m", 1)
    assert 0 <= p.seed < 2**32 and v.params(ImageRequest(prompt="a", seed=-1)).seed != -1
    assert v.params(ImageRequest(prompt="a", seed=5, width=32, height=48)).seed == 5


def test_only_streams_ask_for_every_step(v: Validator) -> None:
    """Step events per iteration only where a route shows them: streamed (preview) requests, as OpenAI streams."""
    assert not v.params(ImageRequest(prompt="a")).progress
    assert v.params(ImageRequest(prompt="a", preview=True)).progress
    assert not v.params(parse_invocation({"prompt": "a"})[0]).progress
    assert not v.params(parse_txt2img({"prompt": "a"})[0]).progress
    assert not v.params(parse_generation({"prompt": "a"})[0]).progress
    assert v.params(parse_generation({"prompt": "a", "stream": True})[0]).progress


def test_each_bad_value_names_its_field(v: Validator) -> None:
    assert "64x64, 32x48" in fails(v, "size", width=48, height=48)
    assert "between 1 and 50" in fails(v, "steps", steps=51)
    assert "between 0 and 30" in fails(v, "guidance", guidance=31.0)
    assert "dpmpp_2m, euler, euler_a, ddim" in fails(v, "sampler", sampler="lms")
    assert "2**63" in fails(v, "seed", seed=-5)
    assert "between 1 and 2" in fails(v, "n", n=3)  # 4 rows / 2 per image with guidance
    assert v.params(ImageRequest(prompt="a", n=3, guidance=1.0)).n == 3  # no guidance: 1 row per image
    assert "cfg_scale" in fails(v, "cfg_scale", guidance=99.0, names={"guidance": "cfg_scale"})


def test_prompts_empty_or_over_the_tokenizer_limit(v: Validator) -> None:
    with pytest.raises(InvalidInput, match="empty"):
        v.tokens(ImageRequest(prompt="   "))
    with pytest.raises(InvalidInput, match="at most 16") as e:
        v.tokens(ImageRequest(prompt="x" * 15))  # 15 characters + start + end tokens = 17
    assert getattr(e.value, "param", None) == "prompt"
    (ids, n), (uncond, m) = v.tokens(ImageRequest(prompt="x" * 14, negative_prompt=""))
    assert (len(ids), n, len(uncond), m) == (16, 16, 16, 2)


def test_protocol_parsers_map_their_names() -> None:
    req, fmt = parse_invocation({"inputs": "cat", "parameters": {"num_inference_steps": 5, "guidance_scale": 2,
                                                                 "output_format": "jpeg"}})
    assert (req.prompt, req.steps, req.guidance, fmt, req.name("steps")) == (
        "cat", 5, 2.0, "jpeg", "parameters.num_inference_steps")
    req, opts = parse_generation({"prompt": "cat", "size": "32x48", "n": 2, "stream": True, "partial_images": 2})
    assert (req.width, req.height, req.n, req.preview, opts["partial_images"]) == (32, 48, 2, True, 2)
    req, count, model = parse_txt2img({"prompt": "cat", "batch_size": 2, "n_iter": 3, "sampler_name": "Euler a",
                                       "override_settings": {"sd_model_checkpoint": "m"}})
    assert (count, model, req.sampler, req.name("guidance")) == (6, "m", "euler_a", "cfg_scale")
    assert parse_txt2img({"prompt": "c", "sampler_name": "k_dpmpp_2m"})[0].sampler == "dpmpp_2m"


def test_formats() -> None:
    assert negotiate(None, "") == "png"
    assert negotiate(None, "image/webp;q=0.9, */*") == "webp"
    assert negotiate("JPG", "image/webp") == "jpeg"
    with pytest.raises(InvalidInput, match="output_format"):
        negotiate("gif")


def test_config_rules() -> None:
    with pytest.raises(ValueError, match="multiples of 8"):
        DiffusionConfig(sizes=["60x60"])
    with pytest.raises(ValueError, match="default_steps"):
        DiffusionConfig(default_steps=200, max_steps=100)


def test_a_folder_without_safetensors_is_refused(tmp_path: Path) -> None:
    from tandem.diffusion.pipeline import check_folder

    folder = make_random_pipeline(tmp_path / "p")
    check_folder(folder)
    for f in (folder / "unet").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(ConfigError, match="never loads pickled"):
        check_folder(folder)
    (folder / "model_index.json").unlink()
    with pytest.raises(ConfigError, match="missing model_index.json"):
        check_folder(folder)
