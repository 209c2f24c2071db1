"""The built-in default repository through the real server, with real clients (tritonclient, httpx)."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import Server
from tests.e2e.conftest import SENTENCES, minilm_tokenizer


def _encode(pixels: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _photo(name: str, fmt: str) -> bytes:
    """A real photograph bundled in scikit-image's wheel (no download), encoded as `fmt`."""
    import skimage.data

    return _encode(np.asarray(getattr(skimage.data, name)()), fmt)


def test_embeddings_match_sentence_transformers_in_mixed_batches(
        default_server: Server, reference_embeddings: np.ndarray) -> None:
    def embed(text: str) -> np.ndarray:
        with default_server.client() as c:
            r = c.post("/predictions/embeddings", json={"text": text})
            assert r.status_code == 200, r.text
            return np.asarray(r.json()["embedding"], dtype=np.float32)

    # concurrent requests of different lengths share padded batches in the accelerator worker
    with cf.ThreadPoolExecutor(len(SENTENCES)) as pool:
        got = np.stack(list(pool.map(embed, SENTENCES * 3)))
    ref = np.tile(reference_embeddings, (3, 1))
    cos = (got * ref).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.99999, cos


def test_image_classifier_top5(default_server: Server) -> None:
    """Real photos, raw JPEG/PNG and base64 JSON, concurrently: the ImageNet class in the top-5."""
    cat_png, coffee_jpeg = _photo("chelsea", "PNG"), _photo("coffee", "JPEG")
    cats = {"tabby, tabby cat", "tiger cat", "Egyptian cat"}

    def classify(case: tuple[bytes, str, bool]) -> dict:
        body, content_type, as_json = case
        with default_server.client() as c:
            if as_json:
                r = c.post("/predictions/image-classifier", json={"image": base64.b64encode(body).decode()})
            else:
                r = c.post("/predictions/image-classifier", content=body, headers={"content-type": content_type})
        assert r.status_code == 200, r.text
        return dict(r.json())

    cases = [(cat_png, "image/png", False), (coffee_jpeg, "image/jpeg", False), (cat_png, "", True),
             (coffee_jpeg, "", True)]
    with cf.ThreadPoolExecutor(len(cases)) as pool:  # concurrent: they may share a batch
        bodies = list(pool.map(classify, cases))
    for body, expected in zip(bodies, [cats, {"espresso"}, cats, {"espresso"}]):
        labels = [p["label"] for p in body["predictions"]]
        assert len(labels) == 5 and labels[0] in expected, body  # so the class is in the top-5 too
        assert "efficientnet-lite0" in body["weights"] and "ImageNet" in body["weights"]
        scores = [p["score"] for p in body["predictions"]]
        assert scores == sorted(scores, reverse=True)
    for raw, as_json in ((bodies[0], bodies[2]), (bodies[1], bodies[3])):  # same image, same answer
        assert [p["index"] for p in raw["predictions"]] == [p["index"] for p in as_json["predictions"]]
        np.testing.assert_allclose([p["score"] for p in raw["predictions"]],
                                   [p["score"] for p in as_json["predictions"]], atol=1e-4)


def test_default_repo_bad_inputs(default_server: Server) -> None:
    with default_server.client() as c:
        bad_image = c.post("/predictions/image-classifier", content=b"definitely not an image",
                           headers={"content-type": "image/jpeg"})
        assert bad_image.status_code == 400 and "could not decode image" in bad_image.json()["error"]
        bad_text = c.post("/predictions/embeddings", json={"text": 42})
        assert bad_text.status_code == 400 and "error" in bad_text.json()
        ok = c.post("/predictions/embeddings", json={"text": "still serving"})
        assert ok.status_code == 200


def test_tritonclient_json_and_binary(default_server: Server, reference_embeddings: np.ndarray) -> None:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(default_server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("embeddings")
    meta = client.get_model_metadata("embeddings")
    assert [i["name"] for i in meta["inputs"]] == ["text"]  # request level; the tensor signature:
    assert [i["name"] for i in meta["parameters"]["tensor_inputs"]] == ["input_ids", "attention_mask"]

    enc = minilm_tokenizer().encode_batch(SENTENCES[:2])
    length = max(len(e.ids) for e in enc)
    ids = np.zeros((2, length), np.int64)
    mask = np.zeros((2, length), np.int64)
    for i, e in enumerate(enc):
        ids[i, :len(e.ids)] = e.ids
        mask[i, :len(e.ids)] = 1
    for binary in (False, True):
        inputs = [triton.InferInput("input_ids", list(ids.shape), "INT64"),
                  triton.InferInput("attention_mask", list(mask.shape), "INT64")]
        inputs[0].set_data_from_numpy(ids, binary_data=binary)
        inputs[1].set_data_from_numpy(mask, binary_data=binary)
        outputs = [triton.InferRequestedOutput("embedding", binary_data=binary)]
        result = client.infer("embeddings", inputs, outputs=outputs)
        emb = result.as_numpy("embedding")
        assert emb.shape == (2, 384)
        np.testing.assert_allclose(emb, reference_embeddings[:2], atol=1e-5)
    with pytest.raises(triton.InferenceServerException, match="dtype"):
        bad = triton.InferInput("input_ids", [1, 3], "INT32")
        bad.set_data_from_numpy(np.ones((1, 3), np.int32))
        m = triton.InferInput("attention_mask", [1, 3], "INT64")
        m.set_data_from_numpy(np.ones((1, 3), np.int64))
        client.infer("embeddings", [bad, m])
    client.close()


def test_text_to_image_draws_what_it_is_asked_and_equals_stock_diffusers(default_server: Server) -> None:
    """The built-in text-to-image model through `tandem serve`: the pixel checker reads back the prompt, and
    every image equals stock StableDiffusionPipeline's for the same seed (the UNet runs on onnxruntime)."""
    import torch
    from diffusers import StableDiffusionPipeline

    from tandem.diffusion import world
    from tests.parity import assert_same_image

    folder = Path(__file__).resolve().parents[2] / "tandem" / "default_repo" / "text-to-image" / "pipeline"
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    combos = world.all_combos()[::9]  # 10 of the 90, spread over colors, shapes and backgrounds
    images = []
    for i, combo in enumerate(combos):
        text = world.prompt(*combo)
        r = httpx.post(default_server.url + "/predictions/text-to-image", timeout=120,
                       json={"prompt": text, "parameters": {"seed": 20_000 + i}})
        assert r.status_code == 200, r.text
        images.append(np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")))
        if i < 3:
            ref = pipe(text, num_inference_steps=20, guidance_scale=4.0, generator=torch.Generator().manual_seed(
                20_000 + i), output_type="np").images[0]
            assert_same_image(images[-1], (ref * 255).round().astype(np.uint8), what=f"{text!r} vs diffusers")
    scores = world.score(images, combos)
    assert scores["all"] >= 0.7, scores
