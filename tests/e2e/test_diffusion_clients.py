"""Unmodified clients against the diffusion kind: the openai SDK (Images API) and huggingface_hub's text_to_image."""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
from PIL import Image

from tests.conftest import Server
from tests.parity import assert_same_image


def _png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


@pytest.fixture(scope="module")
def oai(diffusion_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=diffusion_server.url + "/v1", api_key="unused", max_retries=0)


def test_openai_images_generate(oai: openai.OpenAI) -> None:
    r = oai.images.generate(model="t2i", prompt="a red circle", n=2, size="32x32", response_format="b64_json",
                            extra_body={"seed": 9, "steps": 5})
    assert r.data is not None and len(r.data) == 2
    images = [_png(d.b64_json or "") for d in r.data]
    assert images[0].shape == (32, 32, 3) and r.model_extra and r.model_extra["seed"] == 9
    again = oai.images.generate(model="t2i", prompt="a red circle", n=2, size="32x32",
                                extra_body={"seed": 9, "steps": 5})
    assert again.data is not None
    assert_same_image(_png(again.data[1].b64_json or ""), images[1], what="same seed, same image")


def test_openai_streaming_with_partial_images(oai: openai.OpenAI) -> None:
    events = list(oai.images.generate(model="t2i", prompt="a red circle", size="16x16", stream=True, partial_images=2,
                                      extra_body={"seed": 4, "steps": 6}))
    kinds = [e.type for e in events]
    assert kinds.count("image_generation.partial_image") == 2 and kinds[-1] == "image_generation.completed"
    partial = _png(events[0].b64_json)
    assert partial.shape == (16, 16, 3)  # previews come at the image's size
    final = events[-1]
    plain = oai.images.generate(model="t2i", prompt="a red circle", size="16x16", extra_body={"seed": 4, "steps": 6})
    assert plain.data is not None
    assert_same_image(_png(final.b64_json), _png(plain.data[0].b64_json or ""), what="streamed equals plain")


def test_openai_errors_become_sdk_exceptions(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        oai.images.generate(model="t2i", prompt="x", size="1024x1024")
    assert "32x32" in str(bad.value) and bad.value.body["param"] == "size"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        oai.images.generate(model="dall-e-3", prompt="x")


@pytest.mark.usefixtures("hub_may_reach_loopback")
def test_huggingface_hub_text_to_image(diffusion_server: Server) -> None:
    from huggingface_hub import InferenceClient

    client = InferenceClient(model=diffusion_server.url + "/predictions/t2i")
    image = client.text_to_image("a blue square", num_inference_steps=5, guidance_scale=4.0, seed=12, width=32,
                                 height=32)
    assert image.size == (32, 32)
    again = client.text_to_image("a blue square", num_inference_steps=5, guidance_scale=4.0, seed=12, width=32,
                                 height=32)
    assert_same_image(np.asarray(again.convert("RGB")), np.asarray(image.convert("RGB")), what="hf client, same seed")
