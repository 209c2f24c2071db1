"""Request-level embeddings on the built-in repository through the real server, with unmodified clients:
tritonclient BYTES text (JSON and binary), the openai client (float and base64) and TEI `/embed` (httpx)."""

from __future__ import annotations

import base64
import concurrent.futures as cf

import httpx
import numpy as np
import pytest

from tests.conftest import Server
from tests.e2e.conftest import SENTENCES, minilm_tokenizer


def _cosines(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return (got * ref).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)


def _token_counts(texts: list[str]) -> list[int]:
    tok = minilm_tokenizer()
    tok.enable_truncation(256)
    return [len(e.ids) for e in tok.encode_batch(texts)]


def test_tritonclient_bytes_text_json_and_binary(default_server: Server, reference_embeddings: np.ndarray) -> None:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(default_server.url.removeprefix("http://"))
    meta = client.get_model_metadata("embeddings")
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]
    texts = np.array([s.encode() for s in SENTENCES], dtype=object)
    for binary in (False, True):
        text = triton.InferInput("text", [len(texts)], "BYTES")
        text.set_data_from_numpy(texts, binary_data=binary)
        result = client.infer("embeddings", [text],
                              outputs=[triton.InferRequestedOutput("embedding", binary_data=binary)])
        emb = result.as_numpy("embedding")
        assert emb.shape == (len(SENTENCES), 384) and emb.dtype == np.float32
        assert _cosines(emb, reference_embeddings).min() >= 0.9999
    # [rows, 1] (Triton's usual string shape) and every output by default
    text = triton.InferInput("text", [2, 1], "BYTES")
    text.set_data_from_numpy(texts[:2].reshape(2, 1), binary_data=True)
    emb = client.infer("embeddings", [text]).as_numpy("embedding")
    assert _cosines(emb, reference_embeddings[:2]).min() >= 0.9999
    with pytest.raises(triton.InferenceServerException, match="expected BYTES"):
        bad = triton.InferInput("text", [1], "INT64")
        bad.set_data_from_numpy(np.ones(1, np.int64))
        client.infer("embeddings", [bad])
    with pytest.raises(triton.InferenceServerException, match="request-level inputs"):
        other = triton.InferInput("sentence", [1], "BYTES")
        other.set_data_from_numpy(texts[:1])
        client.infer("embeddings", [other])
    client.close()


def test_openai_client_float_and_base64(default_server: Server, reference_embeddings: np.ndarray) -> None:
    import openai

    client = openai.OpenAI(base_url=default_server.url + "/v1", api_key="unused")
    tokens = sum(_token_counts(SENTENCES))
    for fmt in ("float", "base64", None):  # None: the client asks for base64 and decodes it itself
        kwargs = {"encoding_format": fmt} if fmt else {}
        resp = client.embeddings.create(model="embeddings", input=SENTENCES, **kwargs)  # type: ignore[arg-type]
        assert resp.model == "embeddings" and [d.index for d in resp.data] == list(range(len(SENTENCES)))
        if fmt == "base64":
            got = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in resp.data])  # type: ignore[arg-type]
        else:
            got = np.asarray([d.embedding for d in resp.data], dtype=np.float32)
        assert got.shape == (len(SENTENCES), 384)
        assert _cosines(got, reference_embeddings).min() >= 0.9999
        assert resp.usage.prompt_tokens == tokens == resp.usage.total_tokens
    one = client.embeddings.create(model="embeddings", input=SENTENCES[0], dimensions=384)
    assert _cosines(np.asarray([one.data[0].embedding]), reference_embeddings[:1])[0] >= 0.9999
    # token ids go to predict as given: the tokenizer's ids give the text's vector
    ids = minilm_tokenizer().encode(SENTENCES[2]).ids
    by_ids = client.embeddings.create(model="embeddings", input=[ids], encoding_format="float")
    assert _cosines(np.asarray([by_ids.data[0].embedding]), reference_embeddings[2:3])[0] >= 0.9999
    assert by_ids.usage.prompt_tokens == len(ids)

    with pytest.raises(openai.NotFoundError, match=r"unknown embedding model 'nope'.*\['embeddings'\]"):
        client.embeddings.create(model="nope", input="x")
    with pytest.raises(openai.BadRequestError, match="dimensions 128") as e:
        client.embeddings.create(model="embeddings", input="x", dimensions=128)
    assert e.value.body["param"] == "dimensions"  # type: ignore[index]
    client.close()


def test_openai_embeddings_batch_concurrently(default_server: Server, reference_embeddings: np.ndarray) -> None:
    def one(i: int) -> np.ndarray:
        with default_server.client() as c:
            r = c.post("/v1/embeddings", json={"model": "embeddings", "input": SENTENCES[i % len(SENTENCES)]})
            assert r.status_code == 200, r.text
            return np.asarray(r.json()["data"][0]["embedding"], np.float32)

    with cf.ThreadPoolExecutor(6) as pool:
        got = np.stack(list(pool.map(one, range(18))))
    assert _cosines(got, np.tile(reference_embeddings, (3, 1))).min() >= 0.9999


def test_tei_embed(default_server: Server, reference_embeddings: np.ndarray) -> None:
    with httpx.Client(base_url=default_server.url, timeout=60) as c:
        r = c.post("/embed", json={"inputs": SENTENCES})
        assert r.status_code == 200, r.text
        assert _cosines(np.asarray(r.json()), reference_embeddings).min() >= 0.9999
        r = c.post("/embed", json={"inputs": SENTENCES[0], "normalize": True, "truncate": True})
        assert r.status_code == 200 and len(r.json()) == 1 and len(r.json()[0]) == 384
        long_text = "word " * 400
        r = c.post("/embed", json={"inputs": long_text})
        assert r.status_code == 413 and "truncate" in r.json()["error"], r.text
        assert c.post("/embed", json={"inputs": long_text, "truncate": True}).status_code == 200
        r = c.post("/embed", json={"inputs": "x", "normalize": False})
        assert r.status_code == 422 and "normalize" in r.json()["error"]
        for body, field in (({"inputs": []}, "inputs"), ({"inputs": 3}, "inputs"), ({"text": "x"}, "inputs"),
                            ({"inputs": "x", "truncate": "yes"}, "truncate")):
            r = c.post("/embed", json=body)
            assert r.status_code == 422 and field in r.json()["error"], (body, r.text)
            assert r.json()["error_type"] == "Validation"


def test_embedding_errors_name_the_field(default_server: Server) -> None:
    with httpx.Client(base_url=default_server.url, timeout=60) as c:
        cases = [({"model": "embeddings", "input": []}, 400, "input", "empty"),
                 ({"model": "embeddings", "input": ""}, 400, "input", "empty string"),
                 ({"model": "embeddings", "input": 5}, 400, "input", "must be a string"),
                 ({"model": "embeddings", "input": ["a", 1]}, 400, "input", "mixing"),
                 ({"model": "embeddings"}, 400, "input", "missing"),
                 ({"model": 3, "input": "a"}, 400, "model", "string"),
                 ({"model": "embeddings", "input": "a", "encoding_format": "int8"}, 400, "encoding_format", "base64"),
                 ({"model": "embeddings", "input": [[1, 99999999]]}, 400, None, "vocabulary"),
                 ({"model": "embeddings", "input": ["a"] * 2049}, 413, "input", "at most 2048")]
        for body, status, param, message in cases:
            r = c.post("/v1/embeddings", json=body)
            assert r.status_code == status, (body, r.text)
            error = r.json()["error"]
            assert message in error["message"] and error["param"] == param, (body, error)
            assert error["type"] == "invalid_request_error"
        r = c.post("/v2/models/embeddings/infer", json={"inputs": [
            {"name": "text", "datatype": "BYTES", "shape": [0], "data": []}]})
        assert r.status_code == 400 and "empty" in r.json()["error"]
        # the tensor path is still there
        r = c.post("/v2/models/embeddings/infer", json={"inputs": [
            {"name": "input_ids", "shape": [1, 4], "datatype": "INT64", "data": [101, 7592, 2088, 102]},
            {"name": "attention_mask", "shape": [1, 4], "datatype": "INT64", "data": [1, 1, 1, 1]}]})
        assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [1, 384]
        assert c.post("/predictions/embeddings", json={"text": "still serving"}).status_code == 200
