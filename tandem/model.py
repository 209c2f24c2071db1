"""The user-facing `Model` base class and tensor signatures.

A model is one Python class with four methods, each running in a fixed kind of process:

    setup(device)             accelerator worker: load weights (once per replica)
    setup_cpu()               CPU worker: load tokenizers, label maps (optional)
    preprocess(request)       CPU worker: request -> dict of numpy arrays for ONE item (no batch dim)
    predict(inputs)           accelerator worker: dict of tensors stacked along dim 0 -> same
    postprocess(outputs, req) CPU worker: outputs for ONE item (numpy, no batch dim) -> JSON-able

Pre- and post-processing never run in the accelerator process, so Python's GIL never starves it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tandem.errors import InvalidInput

__all__ = ["Model", "Request", "RequestSpec", "TensorSpec", "check_signature"]

# KServe v2 datatype name <-> numpy dtype.
V2_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
NUMPY_TO_V2: dict[np.dtype[Any], str] = {v: k for k, v in V2_TO_NUMPY.items()}

_DTYPE_ALIASES = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "fp16": "FP16", "float32": "FP32", "fp32": "FP32", "float64": "FP64",
    "fp64": "FP64",
}


def v2_datatype(name: str) -> str:
    """Normalise a dtype name (`float32`, `FP32`, `int64`, ...) to its KServe v2 spelling."""
    upper = name.upper()
    if upper in V2_TO_NUMPY:
        return upper
    if name.lower() in _DTYPE_ALIASES:
        return _DTYPE_ALIASES[name.lower()]
    raise ValueError(f"unknown dtype {name!r}; use one of {sorted(V2_TO_NUMPY)}")


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a model's signature, per item (without the batch dimension).

    `shape` uses -1 for a variable dimension; `max_shape` bounds every variable dimension (it sizes
    the shared-memory slots); `pad_value` fills variable dimensions when items of different lengths
    share a batch.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    pad_value: float = 0
    max_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", v2_datatype(self.dtype))
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if any(d == 0 or d < -1 for d in self.shape):
            raise ValueError(f"tensor {self.name!r}: dims must be positive or -1, got {self.shape}")
        if self.max_shape is None:
            object.__setattr__(self, "max_shape", tuple(512 if d == -1 else d for d in self.shape))
        elif len(self.max_shape) != len(self.shape):
            raise ValueError(f"tensor {self.name!r}: max_shape {self.max_shape} must match shape {self.shape}")

    @property
    def np_dtype(self) -> np.dtype[Any]:
        return V2_TO_NUMPY[self.dtype]

    @property
    def max_bytes(self) -> int:
        assert self.max_shape is not None
        return int(np.prod(self.max_shape)) * self.np_dtype.itemsize

    def check(self, array: np.ndarray, *, batched: bool) -> str | None:
        """Return why `array` does not fit this spec, or None when it does."""
        shape = array.shape[1:] if batched else array.shape
        if array.dtype != self.np_dtype:
            got = NUMPY_TO_V2.get(array.dtype, str(array.dtype))
            return f"input {self.name!r}: dtype {got}, expected {self.dtype}"
        assert self.max_shape is not None
        ok = len(shape) == len(self.shape) and all(
            (want == -1 and got <= mx) or want == got
            for got, want, mx in zip(shape, self.shape, self.max_shape)
        )
        if not ok:
            expect = [-1] + list(self.shape) if batched else list(self.shape)
            return (f"input {self.name!r}: shape {list(array.shape)} does not match {expect} "
                    f"(variable dims at most {list(self.max_shape)})")
        return None

    def metadata(self) -> dict[str, Any]:
        """KServe v2 metadata entry; the leading -1 is the batch dimension."""
        return {"name": self.name, "datatype": self.dtype, "shape": [-1, *self.shape]}


@dataclass(frozen=True)
class RequestSpec:
    """One named field of a model's request-level signature (what users send and get back), per row.

    `dtype` is a v2 datatype, `BYTES` included (a string or blob per element); `shape` is per row
    without the batch dimension (`()` for one string). For a request input, `content_type` is the
    content type of the `Request` each row is handed to `preprocess` as (its bytes are the body).
    """

    name: str
    dtype: str
    shape: tuple[int, ...] = ()
    content_type: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"request field name must be a non-empty string, got {self.name!r}")
        dtype = "BYTES" if str(self.dtype).upper() == "BYTES" else v2_datatype(self.dtype)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if any(d == 0 or d < -1 for d in self.shape):
            raise ValueError(f"request field {self.name!r}: dims must be positive or -1, got {self.shape}")

    def metadata(self) -> dict[str, Any]:
        """KServe v2 metadata entry; the leading -1 is the batch dimension (one row per element)."""
        return {"name": self.name, "datatype": self.dtype, "shape": [-1, *self.shape]}


def _spec_list(cls: type, attr: str, kind: type) -> list[Any]:
    value = getattr(cls, attr)
    if not isinstance(value, list | tuple) or not all(isinstance(s, kind) for s in value):
        raise TypeError(f"{cls.__name__}.{attr} must be a list of {kind.__name__}")
    names = [s.name for s in value]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{cls.__name__}.{attr} names {dupes} more than once")
    return list(value)


def check_signature(cls: type[Model]) -> None:
    """Validate a Model subclass's declared signatures; raises ValueError/TypeError naming the problem."""
    inputs = _spec_list(cls, "inputs", TensorSpec)
    outputs = _spec_list(cls, "outputs", TensorSpec)
    if not inputs or not outputs:
        raise ValueError(f"{cls.__name__} must declare `inputs` and `outputs` TensorSpec lists")
    req_in = _spec_list(cls, "request_inputs", RequestSpec)
    req_out = _spec_list(cls, "request_outputs", RequestSpec)
    if bool(req_in) != bool(req_out):
        raise ValueError(f"{cls.__name__} must declare both `request_inputs` and `request_outputs`, or neither")
    if not req_in:
        return
    if len(req_in) != 1 or req_in[0].dtype != "BYTES" or req_in[0].shape != ():
        raise ValueError(f"{cls.__name__}.request_inputs must be one BYTES field of shape () (one string or blob "
                         f"per row, handed to preprocess), got {[s.metadata() for s in req_in]}")
    clash = sorted({s.name for s in req_in} & {s.name for s in inputs})
    if clash:
        raise ValueError(f"{cls.__name__}: request input {clash} has the name of a tensor input; v2 tells the two "
                         "signatures apart by input names (fix: rename one)")
    for spec in req_out:
        if spec.dtype == "BYTES" and spec.shape != ():
            raise ValueError(f"{cls.__name__}.request_outputs: BYTES field {spec.name!r} must have shape ()")
        if spec.name == EMBEDDING_FIELD and (spec.dtype not in ("FP16", "FP32", "FP64") or len(spec.shape) != 1
                                             or spec.shape[0] < 1):
            raise ValueError(f"{cls.__name__}.request_outputs: {EMBEDDING_FIELD!r} must be a float vector of a "
                             f"fixed size, e.g. RequestSpec('embedding', 'FP32', (384,)); got {spec.metadata()}")


EMBEDDING_FIELD = "embedding"  # a request output of this name makes a model an embedding model


@dataclass
class Request:
    """What `preprocess` and `postprocess` see of an HTTP request.

    `json` is the parsed body when the content type is JSON, else None; `body` is always the raw bytes.
    """

    body: bytes
    content_type: str = ""
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)


class Model:
    """Base class for a servable model. Subclass it in `model.py` of a model-repository folder.

    Class attributes declare the signature and batching defaults (tandem.yaml may override batching):

        inputs:  list[TensorSpec]   what `preprocess` returns and `predict` receives (per item)
        outputs: list[TensorSpec]   what `predict` returns (per item)
        max_batch_size = 32         most items in one `predict` call
        max_batch_delay_ms = 5.0    longest wait for a batch to fill after its first item arrives
        task = ""                   optional: what the model does, for clients and the console
                                    ("image-classification": POST an image to /predictions/{model},
                                    get {"predictions": [{"label", "score", ...}]}; an embedding
                                    model is "embeddings" without saying so)

    Request-level signature (optional; both or neither): what users send and get back, per row.
    v2 `infer` requests whose input names match `request_inputs` run each row through
    preprocess -> predict -> postprocess (the fields of postprocess's dict named in
    `request_outputs` become the v2 outputs); requests naming the tensor `inputs` go straight to
    predict. A request output named `embedding` (a float vector) also serves the model on OpenAI's
    `POST /v1/embeddings` and TEI's `POST /embed`:

        request_inputs:  list[RequestSpec]  exactly one BYTES field of shape (), e.g.
                                            RequestSpec("text", "BYTES", content_type="text/plain")
        request_outputs: list[RequestSpec]  e.g. RequestSpec("embedding", "FP32", (384,))

    Optional hooks for embedding models: `count_tokens(inputs)` (the tokens of one preprocessed
    row, for OpenAI's `usage`) and `from_token_ids(ids)` (OpenAI token-id inputs -> arrays matching
    `inputs`). `preprocess` may set `request.state["truncated"] = True` when it cut a text (TEI's
    `truncate: false` then refuses it).

    Attributes set by the server before any hook runs: `self.path` (the model's folder),
    `self.params` (the `params:` mapping of tandem.yaml) and `self.weights` (the resolved `weights:`
    path of tandem.yaml, or None). Raise `tandem.errors.InvalidInput` from
    `preprocess` for bad input: the client gets a 400 with your message.
    """

    inputs: ClassVar[list[TensorSpec]] = []
    outputs: ClassVar[list[TensorSpec]] = []
    request_inputs: ClassVar[list[RequestSpec]] = []
    request_outputs: ClassVar[list[RequestSpec]] = []
    max_batch_size: ClassVar[int] = 32
    max_batch_delay_ms: ClassVar[float] = 5.0
    task: ClassVar[str] = ""

    path: Path
    params: dict[str, Any]
    weights: Path | None

    def __init__(self, path: Path | str = ".", params: dict[str, Any] | None = None,
                 weights: Path | str | None = None) -> None:
        self.path = Path(path)
        self.params = dict(params or {})
        self.weights = Path(weights) if weights is not None else None

    def setup(self, device: str) -> None:
        """Load weights onto `device`; runs once in each accelerator worker."""

    def setup_cpu(self) -> None:
        """Load what pre/post-processing needs (tokenizer, labels); runs once in each CPU worker."""

    def preprocess(self, request: Request) -> dict[str, np.ndarray]:
        """Turn one request into numpy arrays matching `inputs`, without a batch dimension."""
        raise TypeError(f"{type(self).__name__} does not accept /predictions requests: define preprocess()")

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Run the model on a batch: tensors stacked (and padded) along dim 0."""
        raise TypeError(f"{type(self).__name__} must define predict()")

    def postprocess(self, outputs: dict[str, np.ndarray], request: Request) -> Any:
        """Turn one item's outputs (numpy, no batch dim) into a JSON-able response."""
        return {name: value.tolist() for name, value in outputs.items()}

    def count_tokens(self, inputs: dict[str, np.ndarray]) -> int:
        """Tokens in one preprocessed row (OpenAI `usage`); by default the length of its first input."""
        first = next(iter(inputs.values()), None)
        return int(first.shape[0]) if first is not None and first.ndim else 0

    def from_token_ids(self, ids: list[int]) -> dict[str, np.ndarray]:
        """Arrays matching `inputs` for one row given as token ids (OpenAI's token-id `input`)."""
        raise InvalidInput(f"{type(self).__name__} does not take token ids: send text")
