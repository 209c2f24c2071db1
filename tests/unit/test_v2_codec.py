"""Tests of the KServe v2 codec, using tritonclient's own encoder/decoder for wire compatibility."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson
import pytest
import tritonclient.http as httpclient
from tritonclient.http._utils import _get_inference_request

from tandem.errors import InferenceFailed, InvalidInput
from tandem.model import TensorSpec
from tandem.serving.protocols.v2 import (
    HEADER_LENGTH_HEADER,
    V2RequestedOutput,
    encode_infer_response,
    model_metadata,
    parse_header_length,
    parse_infer_request,
    server_metadata,
)

ARRAYS: dict[str, np.ndarray] = {
    "fp32": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    "int64": np.array([[-(2**62), 0, 2**62]], dtype=np.int64),
    "fp16": np.array([0.5, -1.25, 65504.0], dtype=np.float16),
    "bool": np.array([[True, False], [False, True]]),
    "uint8": np.arange(250, 256, dtype=np.uint8).reshape(2, 3),
}
DATATYPES = {"fp32": "FP32", "int64": "INT64", "fp16": "FP16", "bool": "BOOL", "uint8": "UINT8"}


def triton_request(arrays: dict[str, np.ndarray], *, binary: bool, outputs: list[Any] | None = None,
                   request_id: str = "") -> tuple[bytes, int | None]:
    """Build a request body exactly as tritonclient.http would send it."""
    inputs = []
    for name, array in arrays.items():
        infer_input = httpclient.InferInput(name, list(array.shape), DATATYPES[name])
        infer_input.set_data_from_numpy(array, binary_data=binary)
        inputs.append(infer_input)
    body, json_size = _get_inference_request(
        inputs=inputs, request_id=request_id, outputs=outputs, sequence_id=0, sequence_start=False,
        sequence_end=False, priority=0, timeout=None, custom_parameters=None)
    return (body if isinstance(body, bytes) else body.encode()), json_size


def json_body(inputs: list[dict[str, Any]], **extra: Any) -> bytes:
    """A JSON request body with the given input entries."""
    return json.dumps({"inputs": inputs, **extra}).encode()


def decode(body: bytes, headers: dict[str, str]) -> httpclient.InferResult:
    """Decode a response with tritonclient's own parser."""
    length = headers.get(HEADER_LENGTH_HEADER)
    return httpclient.InferResult.from_response_body(
        body, verbose=False, header_length=int(length) if length is not None else None)


# ---------------------------------------------------------------------------------------------
# Requests built by tritonclient
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("binary", [False, True])
def test_parse_tritonclient_request_round_trips_arrays(binary: bool) -> None:
    body, json_size = triton_request(ARRAYS, binary=binary, request_id="req-1")
    assert (json_size is not None) == binary
    request = parse_infer_request(body, json_size)
    assert request.id == "req-1"
    assert [i.name for i in request.inputs] == list(ARRAYS)
    for parsed in request.inputs:
        want = ARRAYS[parsed.name]
        assert parsed.datatype == DATATYPES[parsed.name]
        assert parsed.shape == list(want.shape)
        assert parsed.array.dtype == want.dtype
        np.testing.assert_array_equal(parsed.array, want)
    # No outputs listed: tritonclient asks for everything, binary.
    assert request.outputs is None
    assert request.binary_outputs_default is True


def test_parse_mixed_json_and_binary_inputs() -> None:
    a = httpclient.InferInput("a", [2], "INT32")
    a.set_data_from_numpy(np.array([1, 2], dtype=np.int32), binary_data=True)
    b = httpclient.InferInput("b", [1], "FP64")
    b.set_data_from_numpy(np.array([3.5]), binary_data=False)
    c = httpclient.InferInput("c", [3], "INT8")
    c.set_data_from_numpy(np.array([-1, 0, 1], dtype=np.int8), binary_data=True)
    body, json_size = _get_inference_request(
        inputs=[a, b, c], request_id="", outputs=None, sequence_id=0, sequence_start=False,
        sequence_end=False, priority=0, timeout=None, custom_parameters=None)
    inputs = {i.name: i.array for i in parse_infer_request(body, json_size).inputs}
    np.testing.assert_array_equal(inputs["a"], [1, 2])
    np.testing.assert_array_equal(inputs["b"], [3.5])
    np.testing.assert_array_equal(inputs["c"], [-1, 0, 1])
    assert inputs["c"].dtype == np.int8


def test_parse_requested_outputs_from_tritonclient() -> None:
    outputs = [httpclient.InferRequestedOutput("y", binary_data=True),
               httpclient.InferRequestedOutput("z", binary_data=False)]
    body, json_size = triton_request({"fp32": ARRAYS["fp32"]}, binary=False, outputs=outputs)
    request = parse_infer_request(body, json_size)
    assert request.outputs == [V2RequestedOutput("y", True), V2RequestedOutput("z", False)]
    assert request.binary_outputs_default is False


def test_binary_input_is_safe_to_use() -> None:
    body, json_size = triton_request({"fp32": ARRAYS["fp32"]}, binary=True)
    array = parse_infer_request(body, json_size).inputs[0].array
    assert array.flags.c_contiguous
    assert float(array.sum()) == pytest.approx(float(ARRAYS["fp32"].sum()))
    assert np.array_equal(array + 1, ARRAYS["fp32"] + 1)


# ---------------------------------------------------------------------------------------------
# Hand-written JSON requests
# ---------------------------------------------------------------------------------------------

def test_nested_data_and_parameters() -> None:
    body = json_body([{"name": "x", "shape": [2, 2], "datatype": "INT32", "data": [[1, 2], [3, 4]]}],
                     id="7", parameters={"binary_data_output": True, "custom": 1},
                     outputs=[{"name": "a"}, {"name": "b", "parameters": {"binary_data": False}}])
    request = parse_infer_request(body, None)
    np.testing.assert_array_equal(request.inputs[0].array, [[1, 2], [3, 4]])
    assert request.inputs[0].array.dtype == np.int32
    assert request.parameters["custom"] == 1
    assert request.outputs == [V2RequestedOutput("a", True), V2RequestedOutput("b", False)]


def test_scalar_and_empty_tensors() -> None:
    body = json_body([{"name": "s", "shape": [], "datatype": "FP32", "data": [2]},
                      {"name": "e", "shape": [0, 3], "datatype": "INT64", "data": []}])
    s, e = parse_infer_request(body, None).inputs
    assert s.array.shape == () and s.array.dtype == np.float32 and float(s.array) == 2.0
    assert e.array.shape == (0, 3) and e.array.dtype == np.int64


def test_large_uint64_values() -> None:
    body = json_body([{"name": "u", "shape": [2], "datatype": "UINT64", "data": [1, 2**64 - 1]}])
    array = parse_infer_request(body, None).inputs[0].array
    assert array.dtype == np.uint64 and int(array[1]) == 2**64 - 1


def entry(data: Any, datatype: str = "FP32", shape: Any = None, name: str = "x") -> dict[str, Any]:
    """One JSON input entry; shape defaults to [len(data)]."""
    return {"name": name, "datatype": datatype, "data": data,
            "shape": [len(data)] if shape is None else shape}


@pytest.mark.parametrize(("body", "header_length", "message"), [
    (b"{not json", None, "not valid JSON"),
    (b"[1, 2]", None, "JSON object"),
    (b'{"id": "1"}', None, '"inputs"'),
    (json_body([entry([1.0], shape=3)]), None, "'x'"),
    (json_body([entry([1.0], shape=[-1])]), None, "negative"),
    (json_body([entry([1.0], shape=[1.5])]), None, "integers"),
    (json_body([entry([1.0], datatype="FP8")]), None, "unknown datatype"),
    (json_body([entry([1, "a"], datatype="BYTES")]), None, "BYTES data must hold only strings"),
    (json_body([entry([1.0, 2.0], shape=[3])]), None, "needs 3 elements"),
    (json_body([entry([[1.0, 2.0], [3.0]], shape=[3])]), None, "ragged"),
    (json_body([entry(["1.5"])]), None, "only numbers"),
    (json_body([entry([None])]), None, "only numbers"),
    (json_body([entry([{"a": 1}])]), None, "only numbers"),
    (json_body([entry([1e300])]), None, "overflows FP32"),
    (json_body([entry([70000], datatype="FP16")]), None, "overflows FP16"),
    (json_body([entry([300], datatype="UINT8")]), None, "out of range for UINT8"),
    (json_body([entry([-1], datatype="UINT32")]), None, "out of range"),
    (json_body([entry([2**64], datatype="INT64")]), None, "out of range for INT64"),
    (json_body([entry([1, -(2**63) - 1], datatype="INT64")]), None, "out of range for INT64"),
    (json_body([entry([2**63], datatype="INT64")]), None, "out of range for INT64"),
    (json_body([entry([1.5], datatype="INT32")]), None, "only integers"),
    (json_body([entry([True], datatype="INT32")]), None, "only integers"),
    (json_body([entry([1], datatype="BOOL")]), None, "true/false"),
    (json_body([entry(5, shape=[1])]), None, "must be a list"),
    (json_body([{"name": "x", "shape": [1], "datatype": "FP32"}]), None, "no \"data\""),
    (json_body([entry([1.0]), entry([2.0])]), None, "more than once"),
    (json_body([{"shape": [1], "datatype": "FP32", "data": [1]}]), None, "name"),
    (json_body([entry([1.0])], outputs=[{"name": "y"}, {"name": "y"}]), None, "more than once"),
    (json_body([entry([1.0])], outputs="y"), None, '"outputs"'),
    (json_body([entry([1.0])], parameters={"binary_data_output": 1}), None, "binary_data_output"),
    (json_body([entry([1.0])], id=3), None, '"id"'),
])
def test_malformed_requests(body: bytes, header_length: int | None, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_infer_request(body, header_length)


def binary_body(entries: list[dict[str, Any]], blob: bytes) -> tuple[bytes, int]:
    """A JSON header followed by `blob`; returns the body and the header length."""
    header = json_body(entries)
    return header + blob, len(header)


def binary_entry(name: str, size: int, shape: list[int], datatype: str = "FP32") -> dict[str, Any]:
    """An input entry whose data is in the binary section."""
    return {"name": name, "shape": shape, "datatype": datatype,
            "parameters": {"binary_data_size": size}}


@pytest.mark.parametrize(("entries", "blob", "message"), [
    ([binary_entry("x", 8, [3])], b"\0" * 8, "'x'.*needs 12"),
    ([binary_entry("x", 8, [2])], b"\0" * 12, "declare 8 bytes.*carries 12"),
    ([binary_entry("x", 8, [2]), binary_entry("y", 8, [2])], b"\0" * 12, "'y'.*past the end"),
    ([entry([1.0])], b"\0\0", "declare 0 bytes"),
    ([binary_entry("x", -4, [1])], b"", "'x'.*non-negative"),
    ([binary_entry("b", 2, [2], "BOOL")], b"\x01\x07", "'b'.*0 or 1"),
])
def test_malformed_binary_requests(entries: list[dict[str, Any]], blob: bytes, message: str) -> None:
    body, header_length = binary_body(entries, blob)
    with pytest.raises(InvalidInput, match=message):
        parse_infer_request(body, header_length)


def test_header_length_errors() -> None:
    body, _ = binary_body([binary_entry("x", 4, [1])], b"\0" * 4)
    with pytest.raises(InvalidInput, match="only"):
        parse_infer_request(body, len(body) + 1)
    with pytest.raises(InvalidInput, match="no Inference-Header-Content-Length"):
        parse_infer_request(body[:-4], None)
    assert parse_header_length(None) is None
    assert parse_header_length(" 12 ") == 12
    for bad in ("abc", "-1"):
        with pytest.raises(InvalidInput, match=HEADER_LENGTH_HEADER):
            parse_header_length(bad)


def test_unaligned_binary_input_is_copied_aligned() -> None:
    body, header_length = binary_body(
        [binary_entry("a", 1, [1], "UINT8"), binary_entry("b", 8, [1], "FP64")],
        b"\x05" + np.array([1.25]).tobytes())
    a, b = parse_infer_request(body, header_length).inputs
    assert int(a.array[0]) == 5
    assert b.array.flags.aligned and float(b.array[0]) == 1.25


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("binary", [False, True])
def test_response_round_trips_through_tritonclient(binary: bool) -> None:
    body, headers = encode_infer_response("m", "1", "req-9", ARRAYS, None, binary)
    assert (HEADER_LENGTH_HEADER in headers) == binary
    assert headers["Content-Type"] == ("application/octet-stream" if binary else "application/json")
    result = decode(body, headers)
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("m", "1", "req-9")
    assert [o["name"] for o in response["outputs"]] == list(ARRAYS)
    for name, want in ARRAYS.items():
        got = result.as_numpy(name)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        assert result.get_output(name)["datatype"] == DATATYPES[name]


def test_response_mixed_binary_and_json_in_requested_order() -> None:
    requested = [V2RequestedOutput("uint8", True), V2RequestedOutput("fp16", False),
                 V2RequestedOutput("int64", True)]
    body, headers = encode_infer_response("m", None, None, ARRAYS, requested, False)
    result = decode(body, headers)
    response = result.get_response()
    assert "model_version" not in response and "id" not in response
    assert [o["name"] for o in response["outputs"]] == ["uint8", "fp16", "int64"]
    fp16 = result.get_output("fp16")
    assert "parameters" not in fp16 and fp16["data"] == [0.5, -1.25, 65504.0]
    assert result.get_output("uint8")["parameters"] == {"binary_data_size": 6}
    assert "data" not in result.get_output("uint8")
    for name in ("uint8", "fp16", "int64"):
        np.testing.assert_array_equal(result.as_numpy(name), ARRAYS[name])
    assert int(headers[HEADER_LENGTH_HEADER]) == body.index(b"}]}") + 3


def test_response_json_is_flat_and_handles_odd_layouts() -> None:
    outputs = {"t": np.arange(6, dtype=np.int32).reshape(2, 3).T,
               "be": np.array([1.5, 2.5], dtype=">f4"), "s": np.float64(3.0)}
    body, headers = encode_infer_response("m", None, None, outputs, None, False)
    entries = orjson.loads(body)["outputs"]
    assert entries[0] == {"name": "t", "datatype": "INT32", "shape": [3, 2], "data": [0, 3, 1, 4, 2, 5]}
    assert entries[1]["datatype"] == "FP32" and entries[1]["data"] == [1.5, 2.5]
    assert entries[2] == {"name": "s", "datatype": "FP64", "shape": [], "data": [3.0]}
    body, headers = encode_infer_response("m", None, None, outputs, None, True)
    result = decode(body, headers)
    for name, want in outputs.items():
        np.testing.assert_array_equal(result.as_numpy(name), want)


def test_response_errors() -> None:
    with pytest.raises(InvalidInput, match="'nope'"):
        encode_infer_response("m", None, None, ARRAYS, [V2RequestedOutput("nope", False)], False)
    with pytest.raises(InferenceFailed, match="'o'"):
        encode_infer_response("m", None, None, {"o": np.array([1j])}, None, False)


def test_request_response_round_trip_with_tritonclient_outputs() -> None:
    outputs = [httpclient.InferRequestedOutput("fp32", binary_data=False),
               httpclient.InferRequestedOutput("bool", binary_data=True)]
    body, json_size = triton_request({"fp32": ARRAYS["fp32"]}, binary=True, outputs=outputs)
    request = parse_infer_request(body, json_size)
    result_body, headers = encode_infer_response(
        "m", "1", request.id, ARRAYS, request.outputs, request.binary_outputs_default)
    result = decode(result_body, headers)
    np.testing.assert_array_equal(result.as_numpy("fp32"), ARRAYS["fp32"])
    np.testing.assert_array_equal(result.as_numpy("bool"), ARRAYS["bool"])
    assert result.as_numpy("uint8") is None


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------

def test_metadata() -> None:
    meta = model_metadata("clf", ["1"], "tandem_python",
                          [TensorSpec("image", "uint8", (224, 224, 3))],
                          [TensorSpec("logits", "float32", (1000,))])
    assert meta == {
        "name": "clf", "versions": ["1"], "platform": "tandem_python",
        "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, 224, 224, 3]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 1000]}],
    }
    server = server_metadata("0.1.0")
    assert server["name"] == "tandem" and server["version"] == "0.1.0"
    assert "binary_tensor_data" in server["extensions"]


# ---------------------------------------------------------------------------------------------
# BYTES
# ---------------------------------------------------------------------------------------------

TEXTS = np.array([b"A man is eating food.", "héllo wörld".encode(), b"", b"\x00\xffraw"], dtype=object)


@pytest.mark.parametrize("binary", [False, True])
def test_bytes_input_from_tritonclient(binary: bool) -> None:
    texts = TEXTS[:3] if not binary else TEXTS  # JSON carries UTF-8 strings only
    infer_input = httpclient.InferInput("text", [len(texts)], "BYTES")
    infer_input.set_data_from_numpy(texts, binary_data=binary)
    body, json_size = _get_inference_request(
        inputs=[infer_input], request_id="", outputs=None, sequence_id=0, sequence_start=False,
        sequence_end=False, priority=0, timeout=None, custom_parameters=None)
    request = parse_infer_request(body if isinstance(body, bytes) else body.encode(), json_size)
    (got,) = request.inputs
    assert got.datatype == "BYTES" and got.shape == [len(texts)] and got.array.dtype == object
    assert got.array.tolist() == texts.tolist()


def test_bytes_serialization_matches_tritonclient() -> None:
    from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

    from tandem.serving.protocols.v2 import deserialize_bytes, serialize_bytes

    ours = serialize_bytes(TEXTS)
    assert ours == serialize_byte_tensor(TEXTS).item()
    assert ours[:4] == len(TEXTS[0]).to_bytes(4, "little")
    assert deserialize_bytes(ours, len(TEXTS), "t").tolist() == deserialize_bytes_tensor(ours).tolist()
    assert serialize_bytes(np.array(["é"], dtype=object)) == b"\x02\x00\x00\x00\xc3\xa9"


@pytest.mark.parametrize(("blob", "count", "message"), [
    (b"\x05\x00\x00\x00abc", 1, "declares 5 bytes"),
    (b"\x01\x00\x00\x00a", 2, "holds 1 elements but the shape needs 2"),
    (b"\x01\x00\x00\x00ab", 1, "1 bytes are left"),
    (b"\x01\x00", 1, "holds 0 elements"),
])
def test_malformed_bytes(blob: bytes, count: int, message: str) -> None:
    header = json_body([{"name": "t", "datatype": "BYTES", "shape": [count],
                         "parameters": {"binary_data_size": len(blob)}}])
    with pytest.raises(InvalidInput, match=message):
        parse_infer_request(header + blob, len(header))


@pytest.mark.parametrize("binary", [False, True])
def test_bytes_output_round_trips_through_tritonclient(binary: bool) -> None:
    outputs = {"label": np.array(["tabby cat", "espresso"], dtype=object),
               "score": np.array([0.9, 0.8], dtype=np.float32)}
    body, headers = encode_infer_response("m", "1", None, outputs, None, binary)
    result = decode(body, headers)
    assert result.get_output("label")["datatype"] == "BYTES"
    assert result.as_numpy("label").tolist() == [b"tabby cat", b"espresso"] if binary else \
        result.as_numpy("label").tolist() == ["tabby cat", "espresso"]
    raw = {"b": np.array([b"\xff"], dtype=object)}
    with pytest.raises(InvalidInput, match="binary_data"):
        encode_infer_response("m", None, None, raw, None, False)
    assert decode(*encode_infer_response("m", None, None, raw, None, True)).as_numpy("b").tolist() == [b"\xff"]


def test_metadata_with_request_level_signature() -> None:
    from tandem.model import RequestSpec

    meta = model_metadata("emb", ["1"], "tandem_pytorch", [TensorSpec("input_ids", "INT64", (-1,))],
                          [TensorSpec("embedding", "FP32", (384,))], [RequestSpec("text", "BYTES")],
                          [RequestSpec("embedding", "FP32", (384,))])
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]
    assert meta["parameters"]["tensor_inputs"] == [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]}]

