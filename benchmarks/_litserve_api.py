"""LitServe APIs running Tandem's default model code (used by `_peers.py litserve`).

decode_request = the model's preprocess (one item), batch = the list of items, predict = Tandem's
`assemble` (pad + stack) then the model's predict, unbatch = one dict per item, encode_response =
the model's postprocess. The classes live at module level because LitServe pickles the API into
its inference worker (spawn). No `from __future__ import annotations`: LitServe reads the request
annotation of decode_request at runtime to decide how FastAPI parses the body.
"""

from typing import Annotated, Any

import litserve as ls
import numpy as np
from _peers import load_entry, load_model, predict_arrays
from fastapi import Body
from fastapi import Request as HTTPRequest

from tandem.model import Request


class TandemModelAPI(ls.LitAPI):
    """Everything but decode_request; `model_name` picks the default repository's model."""

    def __init__(self, model_name: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_name = model_name

    def setup(self, device: str) -> None:
        self.entry = load_entry(self.model_name)
        self.model = load_model(self.entry)

    def batch(self, inputs: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        return inputs  # padded and stacked in predict, with Tandem's `assemble`

    def predict(self, x: list[dict[str, np.ndarray]], **kwargs: Any) -> dict[str, np.ndarray]:
        return predict_arrays(self.model, self.entry, x)

    def unbatch(self, output: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        rows = len(next(iter(output.values())))
        return [{k: v[i] for k, v in output.items()} for i in range(rows)]

    def encode_response(self, output: dict[str, np.ndarray], **kwargs: Any) -> Any:
        return self.model.postprocess(output, Request(body=b""))


class JsonAPI(TandemModelAPI):
    """JSON bodies: the `Request` annotation makes LitServe pass `await request.json()`."""

    def decode_request(self, request: HTTPRequest, **kwargs: Any) -> dict[str, np.ndarray]:
        payload: Any = request  # already the parsed JSON body
        return self.model.preprocess(Request(body=b"", content_type="application/json", json=payload))


class RawAPI(TandemModelAPI):
    """Raw bodies (image/jpeg): a bytes Body annotation makes FastAPI pass the body bytes."""

    def decode_request(self, request: Annotated[bytes, Body(media_type="application/octet-stream")],
                       **kwargs: Any) -> dict[str, np.ndarray]:
        return self.model.preprocess(Request(body=request, content_type="image/jpeg"))


def litserve_api(name: str, batch: int, timeout_s: float) -> TandemModelAPI:
    """The API for model `name`: JSON text models get JsonAPI, image models RawAPI."""
    cls = JsonAPI if name == "embeddings" else RawAPI
    return cls(name, max_batch_size=batch, batch_timeout=timeout_s, api_path=f"/predictions/{name}")
