"""Request-level rows of a tensor model: each row through preprocess -> predict -> postprocess.

A model that declares `request_inputs`/`request_outputs` (see `tandem.model.Model`) takes what users
send (one string or blob per row) on v2 `infer`, OpenAI `/v1/embeddings` and TEI `/embed`:

    rows ──preprocess (this front)──▶ per-row arrays ──sorted by length, chunks of max_request_rows,
    padded──▶ TensorClient.infer (one per chunk, a few in flight) ──▶ per-row outputs ──postprocess──▶
    the fields named in request_outputs, stacked into [rows, ...] arrays (BYTES: object arrays)

Sorting by length before chunking keeps the padding of a mixed-length request small; answers come
back in the request's order.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import numpy as np
import orjson
from starlette.responses import Response

from tandem.errors import InferenceFailed, InvalidInput, PayloadTooLarge
from tandem.model import V2_TO_NUMPY, Request, RequestSpec, TensorSpec
from tandem.serving.metrics import metrics
from tandem.serving.protocols import v2
from tandem.serving.tensor_client import TensorClient

__all__ = ["CHUNKS_IN_FLIGHT", "check_row_count", "checked_rows", "collect_outputs", "infer_request_level",
           "infer_rows", "postprocess_rows", "preprocess_rows", "row_request"]

CHUNKS_IN_FLIGHT = 4  # infer calls one request keeps in flight (each holds one arena slot)
Row = dict[str, np.ndarray]


def check_row_count(client: TensorClient, rows: int, field: str) -> None:
    """400 for no rows, 413 past the entry's `max_request_inputs`; both name the field."""
    if rows == 0:
        raise _named(InvalidInput(f"{field} is empty: send at least one input"), field)
    limit = client.entry.config.max_request_inputs
    if rows > limit:
        raise _named(PayloadTooLarge(f"{field} holds {rows} inputs; model {client.key} takes at most {limit} per "
                                     "request (max_request_inputs in tandem.yaml)"), field)


def _named(e: Any, field: str) -> Any:
    e.param = field  # the OpenAI error shape reports it as `param`
    return e


def row_request(spec: RequestSpec, data: bytes) -> Request:
    """The `Request` one row is handed to preprocess as: its bytes as the body, the spec's content type."""
    req = Request(body=data, content_type=spec.content_type)
    if "json" in spec.content_type:
        try:
            req.json = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise InvalidInput(f"{spec.name}: malformed JSON: {e}") from None
    return req


def _check_row(client: TensorClient, arrays: Any) -> Row:
    entry = client.entry
    if not isinstance(arrays, dict):
        raise TypeError(f"preprocess of {entry.key} must return a dict of numpy arrays")
    names = [s.name for s in entry.inputs]
    if set(arrays) != set(names):
        raise InferenceFailed(f"preprocess of {entry.key} returned {sorted(arrays)}; its inputs are {names}")
    out: Row = {}
    for spec in entry.inputs:
        arr = np.asarray(arrays[spec.name])
        problem = spec.check(arr, batched=False)
        if problem:
            raise InvalidInput(problem)
        out[spec.name] = arr
    return out


def preprocess_rows(client: TensorClient, requests: list[Request]) -> list[Row]:
    """Run the model's preprocess on every row (in this front), checking each against the tensor inputs."""
    return [_check_row(client, client.preprocess(req)) for req in requests]


def checked_rows(client: TensorClient, rows: list[Any]) -> list[Row]:
    """Rows built without preprocess (e.g. from token ids), checked like preprocessed ones."""
    return [_check_row(client, r) for r in rows]


def _variable_dims(spec: TensorSpec, arr: np.ndarray) -> list[int]:
    return [got for got, want in zip(arr.shape, spec.shape) if want == -1]


def _row_length(specs: tuple[TensorSpec, ...], row: Row) -> int:
    return max([0, *(d for s in specs for d in _variable_dims(s, row[s.name]))])


def _stack(specs: tuple[TensorSpec, ...], rows: list[Row]) -> tuple[dict[str, np.ndarray], int]:
    """[rows, ...] arrays, variable dimensions padded with each spec's pad_value; and the longest length."""
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        arrays = [r[spec.name] for r in rows]
        shape = tuple(max(a.shape[i] for a in arrays) for i in range(len(spec.shape)))
        batch = np.full((len(arrays), *shape), spec.pad_value, dtype=spec.np_dtype)
        for i, a in enumerate(arrays):
            index: tuple[int | slice, ...] = (i, *(slice(0, d) for d in a.shape))
            batch[index] = a
        out[spec.name] = batch
    return out, max(_row_length(specs, r) for r in rows)


async def infer_rows(client: TensorClient, rows: list[Row]) -> list[Row]:
    """Every row through predict, in as few `infer` calls as the slot size allows; outputs per row, in order."""
    specs = client.entry.inputs
    order = sorted(range(len(rows)), key=lambda i: _row_length(specs, rows[i]))
    size = client.entry.max_request_rows
    chunks = [order[i:i + size] for i in range(0, len(order), size)]
    gate = asyncio.Semaphore(CHUNKS_IN_FLIGHT)

    async def run(chunk: list[int]) -> tuple[list[int], dict[str, np.ndarray]]:
        async with gate:
            arrays, length = _stack(specs, [rows[i] for i in chunk])
            return chunk, await client.infer(arrays, len(chunk), length)

    results = await asyncio.gather(*(run(c) for c in chunks))
    out: list[Row] = [{} for _ in rows]
    for chunk, outputs in results:
        for j, i in enumerate(chunk):
            out[i] = {name: value[j] for name, value in outputs.items()}
    return out


def postprocess_rows(client: TensorClient, outputs: list[Row], requests: list[Request]) -> list[Any]:
    """The model's postprocess on every row's outputs (numpy, no batch dim)."""
    m = metrics()
    t0 = time.perf_counter()
    results = [client.model.postprocess(o, r) for o, r in zip(outputs, requests)]
    m.postprocess_time.labels(client.name).observe(time.perf_counter() - t0)
    return results


def _as_bytes(key: str, name: str, value: Any) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise InferenceFailed(f"postprocess of {key}: field {name!r} is declared BYTES but is "
                          f"{type(value).__name__} (return str or bytes)")


def collect_outputs(client: TensorClient, specs: list[RequestSpec], results: list[Any]) -> dict[str, np.ndarray]:
    """The `request_outputs` fields of every row's postprocess result, stacked into [rows, ...] arrays."""
    key = client.key
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        values = []
        for result in results:
            if not isinstance(result, dict) or spec.name not in result:
                got = sorted(result) if isinstance(result, dict) else type(result).__name__
                raise InferenceFailed(f"postprocess of {key} must return a dict with {spec.name!r} (declared in "
                                      f"request_outputs); got {got}")
            values.append(result[spec.name])
        if spec.dtype == "BYTES":
            arr = np.empty(len(values), dtype=object)
            arr[:] = [_as_bytes(key, spec.name, v) for v in values]
            out[spec.name] = arr
            continue
        try:
            arrays = [np.asarray(v, dtype=V2_TO_NUMPY[spec.dtype]) for v in values]
        except (TypeError, ValueError) as e:
            raise InferenceFailed(f"postprocess of {key}: field {spec.name!r} is not {spec.dtype}: {e}") from None
        for a in arrays:
            ok = a.ndim == len(spec.shape) and all(w in (-1, g) for g, w in zip(a.shape, spec.shape))
            if not ok or a.shape != arrays[0].shape:
                raise InferenceFailed(f"postprocess of {key}: field {spec.name!r} has shape {list(a.shape)}, "
                                      f"declared {list(spec.shape)} (the same for every row)")
        out[spec.name] = np.stack(arrays)
    return out


async def infer_request_level(client: TensorClient, req: v2.V2InferRequest) -> Response:
    """A v2 infer request naming the request-level inputs: every BYTES element is one row."""
    model = client.model
    names = {i.name for i in req.inputs}
    wanted = {s.name for s in model.request_inputs}
    if names != wanted:
        raise InvalidInput(f"model {client.key} takes request-level inputs {sorted(wanted)} or tensor inputs "
                           f"{[s.name for s in client.entry.inputs]}; got {sorted(names)}")
    spec, (given,) = model.request_inputs[0], req.inputs
    if given.datatype != "BYTES":
        raise InvalidInput(f"input {spec.name!r}: datatype {given.datatype}, expected BYTES")
    if not given.shape or math.prod(given.shape[1:]) != 1:
        raise InvalidInput(f"input {spec.name!r}: shape {given.shape} must be [rows] (or [rows, 1]): one element "
                           "per row")
    elements = given.array.reshape(-1)
    check_row_count(client, len(elements), f"input {spec.name!r}")
    known = [s.name for s in model.request_outputs]
    for o in req.outputs or []:
        if o.name not in known:
            raise InvalidInput(f"model {client.key} has no output {o.name!r} for request-level inputs; "
                               f"outputs: {known}")
    requests = [row_request(spec, bytes(e)) for e in elements]
    results = postprocess_rows(client, await infer_rows(client, preprocess_rows(client, requests)), requests)
    arrays = collect_outputs(client, model.request_outputs, results)
    payload, headers = v2.encode_infer_response(
        client.name, client.entry.config.version, req.id, arrays, req.outputs, req.binary_outputs_default)
    return Response(payload, headers=headers)
