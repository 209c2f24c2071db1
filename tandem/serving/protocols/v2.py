"""Codec for the KServe v2 / Open Inference Protocol, with Triton's binary-tensor extension.

Pure functions over bytes and numpy arrays: no I/O and no web framework. Every malformed request
raises `tandem.errors.InvalidInput` with a message naming the problem (and the tensor).

Binary-tensor extension: when the `Inference-Header-Content-Length` HTTP header is present, the
body is that many bytes of JSON followed by the raw little-endian, row-major bytes of every tensor
whose JSON entry carries `parameters.binary_data_size`, concatenated in the order of the entries.

BYTES tensors (strings or blobs; numpy object arrays of `bytes`): in JSON, `data` is a list of
strings (UTF-8); in binary, each element is a 4-byte little-endian length followed by its bytes,
row-major (Triton's serialization, as tritonclient's `serialize_byte_tensor` writes it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from tandem.errors import InferenceFailed, InvalidInput
from tandem.model import NUMPY_TO_V2, V2_TO_NUMPY, RequestSpec, TensorSpec

__all__ = [
    "BYTES", "HEADER_LENGTH_HEADER", "SERVER_EXTENSIONS", "V2InferRequest", "V2Input", "V2RequestedOutput",
    "deserialize_bytes", "encode_infer_response", "model_metadata", "parse_header_length", "parse_infer_request",
    "serialize_bytes", "server_metadata",
]

HEADER_LENGTH_HEADER = "Inference-Header-Content-Length"
SERVER_EXTENSIONS: tuple[str, ...] = ("binary_tensor_data",)
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"
MAX_DIMS = 32  # numpy's limit is 64 (32 before numpy 2)
MAX_DIM = 2**62  # numpy refuses dimensions beyond its index type, even in an empty array
BYTES = "BYTES"  # variable-length strings/blobs: numpy object arrays of `bytes`
_DATATYPES = (*V2_TO_NUMPY, BYTES)


@dataclass
class V2Input:
    """One decoded input tensor; `array` has the dtype of `datatype` and exactly `shape`."""

    name: str
    datatype: str
    shape: list[int]
    array: np.ndarray


@dataclass
class V2RequestedOutput:
    """One entry of the request's `outputs`; `binary` says whether to send it as raw bytes."""

    name: str
    binary: bool


@dataclass
class V2InferRequest:
    """A parsed infer request. `outputs` is None when the client asked for all outputs."""

    id: str | None
    inputs: list[V2Input]
    outputs: list[V2RequestedOutput] | None
    binary_outputs_default: bool
    parameters: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------

def parse_header_length(value: str | None) -> int | None:
    """Parse the `Inference-Header-Content-Length` header value (None when the header is absent)."""
    if value is None:
        return None
    try:
        length = int(value.strip())
    except ValueError:
        raise InvalidInput(f"{HEADER_LENGTH_HEADER} must be an integer, got {value!r}") from None
    if length < 0:
        raise InvalidInput(f"{HEADER_LENGTH_HEADER} must not be negative, got {length}")
    return length


def parse_infer_request(body: bytes, header_length: int | None) -> V2InferRequest:
    """Decode a v2 infer request body (JSON, or JSON header + binary blobs when `header_length`)."""
    header, blobs = _split_body(body, header_length)
    raw = _load_json_object(header)
    request_id = raw.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f'"id" must be a string, got {type(request_id).__name__}')
    parameters = _parameters_of(raw, "the request")
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidInput('request parameter "binary_data_output" must be true or false')
    return V2InferRequest(
        id=request_id,
        inputs=_parse_inputs(raw, blobs),
        outputs=_parse_requested_outputs(raw, binary_default),
        binary_outputs_default=binary_default,
        parameters=parameters,
    )


def _split_body(body: bytes, header_length: int | None) -> tuple[bytes | memoryview, memoryview | None]:
    """Split the body into its JSON header and the binary blobs (None without the extension)."""
    if header_length is None:
        return body, None
    if isinstance(header_length, bool) or not isinstance(header_length, int) or header_length < 0:
        raise InvalidInput(f"{HEADER_LENGTH_HEADER} must be a non-negative integer, got {header_length!r}")
    if header_length > len(body):
        raise InvalidInput(f"{HEADER_LENGTH_HEADER} is {header_length} but the body has only "
                           f"{len(body)} bytes")
    view = memoryview(body)
    return view[:header_length], view[header_length:]


def _load_json_object(header: bytes | memoryview) -> dict[str, Any]:
    """Parse the JSON header; it must be an object."""
    try:
        raw = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidInput(f"request body must be a JSON object, got {type(raw).__name__}")
    return raw


def _parameters_of(entry: dict[str, Any], what: str) -> dict[str, Any]:
    """The optional `parameters` object of a request, input or output entry."""
    parameters = entry.get("parameters", {})
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise InvalidInput(f'"parameters" of {what} must be a JSON object')
    return parameters


def _parse_inputs(raw: dict[str, Any], blobs: memoryview | None) -> list[V2Input]:
    """Decode every entry of `inputs`, taking binary data from `blobs` in order."""
    entries = raw.get("inputs")
    if entries is None:
        raise InvalidInput('request has no "inputs"')
    if not isinstance(entries, list):
        raise InvalidInput('"inputs" must be a list')
    inputs: list[V2Input] = []
    seen: set[str] = set()
    offset = 0
    for index, entry in enumerate(entries):
        name, datatype, shape, parameters = _input_header(entry, index)
        if name in seen:
            raise InvalidInput(f"input {name!r} appears more than once")
        seen.add(name)
        size = parameters.get("binary_data_size")
        if size is not None:
            array = _binary_input(name, datatype, shape, size, blobs, offset)
            offset += size
            if "data" in entry:
                raise InvalidInput(f'input {name!r} has both "data" and binary_data_size')
        elif "data" in entry:
            array = _json_input(name, datatype, shape, entry["data"])
        else:
            raise InvalidInput(f'input {name!r} has no "data" and no parameters.binary_data_size')
        inputs.append(V2Input(name=name, datatype=datatype, shape=shape, array=array))
    if blobs is not None and offset != len(blobs):
        raise InvalidInput(f"binary inputs declare {offset} bytes in all but the body carries "
                           f"{len(blobs)} bytes after the JSON header")
    return inputs


def _input_header(entry: Any, index: int) -> tuple[str, str, list[int], dict[str, Any]]:
    """Validate an input entry's name, datatype, shape and parameters."""
    if not isinstance(entry, dict):
        raise InvalidInput(f"inputs[{index}] must be a JSON object")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f'inputs[{index}] has no "name" (a non-empty string)')
    datatype = entry.get("datatype")
    if not isinstance(datatype, str) or datatype not in _DATATYPES:
        raise InvalidInput(f"input {name!r}: unknown datatype {datatype!r}; use one of "
                           f"{', '.join(_DATATYPES)}")
    shape = entry.get("shape")
    if not isinstance(shape, list):
        raise InvalidInput(f'input {name!r}: "shape" must be a list of integers, got {shape!r}')
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise InvalidInput(f"input {name!r}: shape {shape} must hold only integers")
        if dim < 0:
            raise InvalidInput(f"input {name!r}: shape {shape} has a negative dimension")
        if dim > MAX_DIM:
            raise InvalidInput(f"input {name!r}: shape {shape} has a dimension over {MAX_DIM}")
    if len(shape) > MAX_DIMS:
        raise InvalidInput(f"input {name!r}: shape has {len(shape)} dimensions; at most {MAX_DIMS}")
    return name, datatype, shape, _parameters_of(entry, f"input {name!r}")


def _binary_input(name: str, datatype: str, shape: list[int], size: Any,
                  blobs: memoryview | None, offset: int) -> np.ndarray:
    """View this input's bytes in the binary section as an array (read-only, no copy if aligned)."""
    if blobs is None:
        raise InvalidInput(f"input {name!r} has binary_data_size but the request has no "
                           f"{HEADER_LENGTH_HEADER} header")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidInput(f"input {name!r}: binary_data_size must be a non-negative integer")
    if datatype == BYTES:
        if offset + size > len(blobs):
            raise InvalidInput(f"input {name!r}: binary data runs past the end of the body "
                               f"({offset + size} > {len(blobs)} bytes)")
        return deserialize_bytes(blobs[offset:offset + size], math.prod(shape), name).reshape(shape)
    dtype = V2_TO_NUMPY[datatype]
    expected = math.prod(shape) * dtype.itemsize
    if size != expected:
        raise InvalidInput(f"input {name!r}: binary_data_size is {size} bytes but shape {shape} "
                           f"of {datatype} needs {expected}")
    if offset + size > len(blobs):
        raise InvalidInput(f"input {name!r}: binary data runs past the end of the body "
                           f"({offset + size} > {len(blobs)} bytes)")
    array = np.frombuffer(blobs[offset:offset + size], dtype=dtype.newbyteorder("<"))
    if datatype == "BOOL" and array.size and array.view(np.uint8).max() > 1:
        raise InvalidInput(f"input {name!r}: BOOL bytes must be 0 or 1")
    if not array.dtype.isnative or not array.flags.aligned:
        array = array.astype(dtype)
    return array.reshape(shape)


def _json_input(name: str, datatype: str, shape: list[int], data: Any) -> np.ndarray:
    """Convert the (flat or nested, row-major) JSON `data` list to an array of `shape`."""
    if not isinstance(data, list):
        raise InvalidInput(f'input {name!r}: "data" must be a list, got {type(data).__name__}')
    if datatype == BYTES:
        return _json_bytes(name, shape, data)
    try:
        inferred = np.asarray(data)
    except (ValueError, TypeError):
        raise InvalidInput(f'input {name!r}: "data" is a ragged nested list') from None
    expected = math.prod(shape)
    if inferred.size != expected:
        raise InvalidInput(f"input {name!r}: shape {shape} needs {expected} elements but "
                           f'"data" has {inferred.size}')
    dtype = V2_TO_NUMPY[datatype]
    if expected == 0:
        return np.zeros(shape, dtype=dtype)
    if dtype.kind == "b":
        if inferred.dtype.kind != "b":
            raise InvalidInput(f"input {name!r}: BOOL data must be true/false values")
        return inferred.reshape(shape)
    if dtype.kind == "f":
        return _to_float(name, datatype, inferred, data).reshape(shape)
    return _to_integer(name, datatype, inferred, data).reshape(shape)


def _json_bytes(name: str, shape: list[int], data: list[Any]) -> np.ndarray:
    """BYTES elements given in JSON (a flat or nested list of strings), as an object array of UTF-8 bytes."""
    flat: list[bytes] = []
    stack: list[Any] = [iter(data)]
    while stack:
        value = next(stack[-1], _END)
        if value is _END:
            stack.pop()
        elif isinstance(value, list):
            stack.append(iter(value))
        elif isinstance(value, str):
            flat.append(value.encode("utf-8"))
        else:
            raise InvalidInput(f"input {name!r}: BYTES data must hold only strings, got {value!r}")
    expected = math.prod(shape)
    if len(flat) != expected:
        raise InvalidInput(f'input {name!r}: shape {shape} needs {expected} elements but "data" has {len(flat)}')
    out = np.empty(expected, dtype=object)
    out[:] = flat
    return out.reshape(shape)


_END = object()


def serialize_bytes(elements: np.ndarray) -> bytes:
    """BYTES elements (bytes or str, row-major) as 4-byte little-endian lengths each followed by the bytes."""
    parts: list[bytes] = []
    for value in np.asarray(elements, dtype=object).reshape(-1).tolist():
        data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        parts += [len(data).to_bytes(4, "little"), data]
    return b"".join(parts)


def deserialize_bytes(buffer: bytes | memoryview, count: int, name: str) -> np.ndarray:
    """Exactly `count` length-prefixed BYTES elements filling `buffer`, as a flat object array of bytes."""
    view = memoryview(buffer)
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > len(view):
            raise InvalidInput(f"input {name!r}: BYTES data holds {i} elements but the shape needs {count}")
        size = int.from_bytes(view[pos:pos + 4], "little")
        pos += 4
        if pos + size > len(view):
            raise InvalidInput(f"input {name!r}: BYTES element {i} declares {size} bytes but only "
                               f"{len(view) - pos} remain")
        out[i] = bytes(view[pos:pos + size])
        pos += size
    if pos != len(view):
        raise InvalidInput(f"input {name!r}: {len(view) - pos} bytes are left after the {count} BYTES elements "
                           "the shape needs")
    return out


def _python_numbers(name: str, datatype: str, data: list[Any], integers_only: bool) -> np.ndarray:
    """Slow path for data numpy could not type: check every element is a number, as objects."""
    objects = np.asarray(data, dtype=object)
    allowed: tuple[type, ...] = (int,) if integers_only else (int, float)
    for value in objects.flat:
        if integers_only and isinstance(value, float) and value.is_integer() and abs(value) >= 2**63:
            # The JSON parser turns integers beyond 64 bits into floats.
            raise InvalidInput(f"input {name!r}: value {value:.0f} is out of range for {datatype}")
        if isinstance(value, bool) or not isinstance(value, allowed):
            kind = "integers" if integers_only else "numbers"
            raise InvalidInput(f"input {name!r}: {datatype} data must hold only {kind}, "
                               f"got {value!r}")
    return objects


def _to_float(name: str, datatype: str, inferred: np.ndarray, data: list[Any]) -> np.ndarray:
    """Cast numeric JSON data to a float dtype, rejecting non-numbers and overflow to inf."""
    if inferred.dtype.kind == "O":
        inferred = _python_numbers(name, datatype, data, integers_only=False).astype(np.float64)
    elif inferred.dtype.kind not in "iuf":
        raise InvalidInput(f"input {name!r}: {datatype} data must hold only numbers, got "
                           f"{inferred.reshape(-1)[0]!r}")
    dtype = V2_TO_NUMPY[datatype]
    with np.errstate(over="ignore", invalid="ignore"):
        array = inferred.astype(dtype)
    if dtype != np.float64 and not np.isfinite(array).all():
        overflow = ~np.isfinite(array) & np.isfinite(inferred.astype(np.float64))
        if overflow.any():
            raise InvalidInput(f"input {name!r}: value {inferred[overflow][0]!r} overflows {datatype}")
    return array


def _to_integer(name: str, datatype: str, inferred: np.ndarray, data: list[Any]) -> np.ndarray:
    """Cast integer JSON data to an integer dtype, rejecting non-integers and out-of-range values."""
    dtype = V2_TO_NUMPY[datatype]
    if inferred.dtype.kind in "fO":
        # Python ints numpy could not type together (e.g. > 2**63 mixed with others), or floats.
        _python_numbers(name, datatype, data, integers_only=True)
        try:
            return np.asarray(data, dtype=dtype)
        except OverflowError:
            raise InvalidInput(f"input {name!r}: a value is out of range for {datatype}") from None
    if inferred.dtype.kind not in "iu":
        raise InvalidInput(f"input {name!r}: {datatype} data must hold only integers, got "
                           f"{inferred.reshape(-1)[0]!r}")
    info = np.iinfo(dtype)
    low, high = inferred.min(), inferred.max()
    if low < info.min or high > info.max:
        bad = low if low < info.min else high
        raise InvalidInput(f"input {name!r}: value {int(bad)} is out of range for {datatype}")
    return inferred.astype(dtype)


def _parse_requested_outputs(raw: dict[str, Any], binary_default: bool) -> list[V2RequestedOutput] | None:
    """Decode the optional `outputs` list; None means every output, with the default encoding."""
    entries = raw.get("outputs")
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise InvalidInput('"outputs" must be a list')
    requested: list[V2RequestedOutput] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name:
            raise InvalidInput(f'outputs[{index}] must be an object with a "name"')
        if name in seen:
            raise InvalidInput(f"output {name!r} is requested more than once")
        seen.add(name)
        parameters = _parameters_of(entry, f"output {name!r}")
        if "classification" in parameters:
            raise InvalidInput(f"output {name!r}: the classification extension is not supported")
        binary = parameters.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise InvalidInput(f'output {name!r}: parameter "binary_data" must be true or false')
        requested.append(V2RequestedOutput(name=name, binary=binary))
    return requested


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------

def encode_infer_response(model_name: str, model_version: str | None, request_id: str | None,
                          outputs: dict[str, np.ndarray], requested: list[V2RequestedOutput] | None,
                          binary_default: bool) -> tuple[bytes, dict[str, str]]:
    """Encode an infer response; returns the body and the extra HTTP headers to send with it.

    Outputs follow the order of `requested` (all of `outputs`, in dict order, when None). Those
    asked for as binary go as raw bytes after the JSON header, whose length is then given in the
    `Inference-Header-Content-Length` header.
    """
    if requested is None:
        requested = [V2RequestedOutput(name=name, binary=binary_default) for name in outputs]
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for want in requested:
        if want.name not in outputs:
            raise InvalidInput(f"unknown output {want.name!r}; this model has outputs "
                               f"{', '.join(outputs) or '(none)'}")
        array = np.asarray(outputs[want.name])
        entry: dict[str, Any] = {"name": want.name, "datatype": _datatype_of(want.name, array),
                                 "shape": list(array.shape)}
        if want.binary:
            if entry["datatype"] == BYTES:
                blob = serialize_bytes(array)
            else:
                blob = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif entry["datatype"] == BYTES:
            entry["data"] = _json_strings(want.name, array)
        else:
            entry["data"] = _json_data(array)
        entries.append(entry)
    response: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        response["model_version"] = model_version
    if request_id is not None:
        response["id"] = request_id
    response["outputs"] = entries
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, {"Content-Type": JSON_CONTENT_TYPE}
    return b"".join([header, *blobs]), {HEADER_LENGTH_HEADER: str(len(header)),
                                         "Content-Type": BINARY_CONTENT_TYPE}


def _datatype_of(name: str, array: np.ndarray) -> str:
    """The v2 datatype of an output array; a dtype outside the v2 set is a model bug."""
    if array.dtype.kind in "OSU":
        return BYTES
    datatype = NUMPY_TO_V2.get(array.dtype.newbyteorder("="))
    if datatype is None:
        raise InferenceFailed(f"output {name!r} has dtype {array.dtype}, which the v2 protocol "
                              f"cannot carry; return one of {', '.join(_DATATYPES)}")
    return datatype


def _json_strings(name: str, array: np.ndarray) -> list[str]:
    """BYTES output elements as JSON strings; bytes that are not UTF-8 need the binary extension."""
    out: list[str] = []
    for value in array.reshape(-1).tolist():
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(f"output {name!r} holds bytes that are not UTF-8; ask for it with "
                                   "binary_data: true") from None
        out.append(str(value))
    return out


def _json_data(array: np.ndarray) -> np.ndarray:
    """A flat, C-contiguous, native array that orjson serialises (FP16 widened to FP32)."""
    dtype = np.dtype(np.float32) if array.dtype == np.float16 else array.dtype.newbyteorder("=")
    return np.ascontiguousarray(array.reshape(-1), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------

def model_metadata(name: str, versions: list[str], platform: str, inputs: list[TensorSpec],
                   outputs: list[TensorSpec], request_inputs: list[RequestSpec] | None = None,
                   request_outputs: list[RequestSpec] | None = None) -> dict[str, Any]:
    """The v2 model-metadata object (`GET /v2/models/{name}`); shapes lead with the -1 batch dim.

    A model with a request-level signature shows it as `inputs`/`outputs` (what clients send, as a
    Triton ensemble shows its own) and its tensor signature, which `infer` takes as well, under
    `parameters.tensor_inputs`/`tensor_outputs` (an extension key; tritonclient returns the JSON as is).
    """
    if not request_inputs:
        return {
            "name": name,
            "versions": list(versions),
            "platform": platform,
            "inputs": [spec.metadata() for spec in inputs],
            "outputs": [spec.metadata() for spec in outputs],
        }
    return {
        "name": name,
        "versions": list(versions),
        "platform": platform,
        "inputs": [spec.metadata() for spec in request_inputs],
        "outputs": [spec.metadata() for spec in request_outputs or []],
        "parameters": {"tensor_inputs": [spec.metadata() for spec in inputs],
                       "tensor_outputs": [spec.metadata() for spec in outputs]},
    }


def server_metadata(version: str, extensions: tuple[str, ...] = SERVER_EXTENSIONS) -> dict[str, Any]:
    """The v2 server-metadata object (`GET /v2`)."""
    return {"name": "tandem", "version": version, "extensions": list(extensions)}
