"""The request-level signature: validation, the rows path (preprocess -> batched infer -> postprocess)
behind v2 BYTES inputs, and the OpenAI / TEI embedding request parsers and error shapes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.http._utils import _get_inference_request

from tandem.errors import ConfigError, InferenceFailed, InvalidInput, ModelNotFound, Overloaded, PayloadTooLarge
from tandem.model import Model, Request, RequestSpec, TensorSpec, check_signature
from tandem.serving.embedding_routes import EmbeddingRoutes, parse_openai_embeddings, parse_tei_embed, tei_error
from tandem.serving.kinds import FrontState
from tandem.serving.protocols import v2
from tandem.serving.protocols.openai_errors import openai_error
from tandem.serving.repository import load_model_class
from tandem.serving.rows import collect_outputs, infer_request_level, infer_rows
from tandem.serving.tensor_client import TensorClient


class Bytes(Model):
    """Each text's bytes as int64 tokens; predict sums them; postprocess echoes the text upper-cased."""

    inputs: ClassVar[list[TensorSpec]] = [TensorSpec("x", "INT64", (-1,), pad_value=0, max_shape=(64,))]
    outputs: ClassVar[list[TensorSpec]] = [TensorSpec("y", "FP32", (1,))]
    request_inputs: ClassVar[list[RequestSpec]] = [RequestSpec("text", "BYTES", content_type="text/plain")]
    request_outputs: ClassVar[list[RequestSpec]] = [RequestSpec("total", "FP32"), RequestSpec("echo", "BYTES")]

    def preprocess(self, request: Request) -> dict[str, np.ndarray]:
        if request.body == b"bad":
            raise InvalidInput("bad text")
        return {"x": np.frombuffer(request.body, np.uint8).astype(np.int64)}

    def postprocess(self, outputs: dict[str, np.ndarray], request: Request) -> Any:
        return {"total": float(outputs["y"][0]), "echo": request.body.decode().upper(), "extra": 1}


class Embedder(Bytes):
    request_outputs: ClassVar[list[RequestSpec]] = [RequestSpec("embedding", "FP32", (2,))]

    def postprocess(self, outputs: dict[str, np.ndarray], request: Request) -> Any:
        return {"embedding": [float(outputs["y"][0]), 1.0]}


class FakeClient:
    """What the rows path needs of a TensorClient; `infer` sums each padded row."""

    kind = "model"

    def __init__(self, model: Model, name: str = "m", rows: int = 2, max_inputs: int = 8, version: str = "1") -> None:
        self.model, self.name, self.key = model, name, f"{name}:{version}"
        config = SimpleNamespace(max_request_inputs=max_inputs, version=version, max_request_bytes=1 << 20)
        self.entry = SimpleNamespace(inputs=tuple(model.inputs), max_request_rows=rows, key=self.key, config=config)
        self.preprocessing = 0
        self.calls: list[tuple[dict[str, np.ndarray], int, int]] = []

    # the real one: it needs only `model`, `name` and `preprocessing`, and counts and times each call
    preprocess = TensorClient.preprocess

    async def infer(self, arrays: dict[str, np.ndarray], rows: int, length: int) -> dict[str, np.ndarray]:
        self.calls.append((arrays, rows, length))
        assert all(a.shape[0] == rows for a in arrays.values())
        return {"y": arrays["x"].sum(axis=1, keepdims=True).astype(np.float32)}

    @contextmanager
    def use(self) -> Iterator[FakeClient]:
        yield self


# -- the Model API ------------------------------------------------------------------------------------------

def test_request_spec_validation() -> None:
    assert RequestSpec("t", "bytes").dtype == "BYTES" and RequestSpec("e", "float32", [3]).shape == (3,)
    assert RequestSpec("t", "BYTES").metadata() == {"name": "t", "datatype": "BYTES", "shape": [-1]}
    with pytest.raises(ValueError, match="unknown dtype"):
        RequestSpec("t", "STRING")
    with pytest.raises(ValueError, match="positive"):
        RequestSpec("t", "FP32", (0,))
    with pytest.raises(ValueError, match="non-empty"):
        RequestSpec("", "BYTES")


def _variant(**attrs: Any) -> type[Model]:
    return type("Variant", (Bytes,), attrs)


@pytest.mark.parametrize(("attrs", "message"), [
    ({"request_outputs": []}, "both"),
    ({"request_inputs": [RequestSpec("a", "BYTES"), RequestSpec("b", "BYTES")]}, "one BYTES field"),
    ({"request_inputs": [RequestSpec("a", "FP32")]}, "one BYTES field"),
    ({"request_inputs": [RequestSpec("x", "BYTES")]}, "name of a tensor input"),
    ({"request_inputs": [TensorSpec("t", "FP32", (1,))]}, "list of RequestSpec"),
    ({"request_outputs": [RequestSpec("e", "FP32"), RequestSpec("e", "FP32")]}, "more than once"),
    ({"request_outputs": [RequestSpec("embedding", "INT64", (3,))]}, "float vector"),
    ({"request_outputs": [RequestSpec("embedding", "FP32", (-1,))]}, "float vector"),
    ({"request_outputs": [RequestSpec("label", "BYTES", (2,))]}, "shape ()"),
    ({"inputs": []}, "must declare `inputs`"),
])
def test_check_signature_refuses_bad_declarations(attrs: dict[str, Any], message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        check_signature(_variant(**attrs))


def test_signature_is_checked_when_the_model_loads(tmp_path: Path) -> None:
    (tmp_path / "model.py").write_text(
        "from tandem import Model, RequestSpec, TensorSpec\n"
        "class M(Model):\n"
        "    inputs = [TensorSpec('x', 'FP32', (1,))]\n"
        "    outputs = [TensorSpec('y', 'FP32', (1,))]\n"
        "    request_inputs = [RequestSpec('text', 'BYTES')]\n")
    with pytest.raises(ConfigError, match="model.py: M must declare both `request_inputs` and `request_outputs`"):
        load_model_class(tmp_path, "m:1")


def test_builtin_embeddings_declares_text_to_embedding() -> None:
    from tandem.serving.repository import default_repository

    cls = load_model_class(default_repository() / "embeddings", "embeddings:1")
    assert [s.metadata() for s in cls.request_inputs] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert [s.metadata() for s in cls.request_outputs] == [{"name": "embedding", "datatype": "FP32",
                                                            "shape": [-1, 384]}]
    model = cls()
    row = model.preprocess(Request(body=b"hello world", content_type="text/plain"))
    assert model.count_tokens(row) == len(row["input_ids"]) == 4
    assert model.from_token_ids([101, 7592, 102])["attention_mask"].tolist() == [1, 1, 1]
    with pytest.raises(InvalidInput, match="vocabulary"):
        model.from_token_ids([10**9])
    long = Request(body=b"word " * 400, content_type="text/plain")
    assert len(model.preprocess(long)["input_ids"]) == 256 and long.state["truncated"]
    short = Request(body=b"word " * 10, content_type="text/plain")
    model.preprocess(short)
    assert "truncated" not in short.state


# -- the rows path --------------------------------------------------------------------------------------------

def test_infer_rows_sorts_by_length_chunks_pads_and_keeps_order() -> None:
    client = FakeClient(Bytes(), rows=2)
    texts = [b"ccc", b"a", b"eeeee", b"bb", b"dddd"]
    rows = [{"x": np.frombuffer(t, np.uint8).astype(np.int64)} for t in texts]
    out = asyncio.run(infer_rows(client, rows))  # type: ignore[arg-type]
    assert [float(o["y"][0]) for o in out] == [float(sum(t)) for t in texts]
    assert [(c[1], c[2], c[0]["x"].shape) for c in client.calls] == [(2, 2, (2, 2)), (2, 4, (2, 4)), (1, 5, (1, 5))]
    assert client.calls[0][0]["x"].tolist() == [[97, 0], [98, 98]]  # padded with pad_value


def test_collect_outputs_stacks_declared_fields() -> None:
    client = FakeClient(Bytes())
    got = collect_outputs(client, Bytes.request_outputs, [{"total": 1, "echo": "A"}, {"total": 2.5, "echo": b"B"}])  # type: ignore[arg-type]
    assert got["total"].dtype == np.float32 and got["total"].tolist() == [1.0, 2.5]
    assert got["echo"].dtype == object and got["echo"].tolist() == [b"A", b"B"]
    with pytest.raises(InferenceFailed, match="'echo'"):
        collect_outputs(client, Bytes.request_outputs, [{"total": 1}])  # type: ignore[arg-type]
    with pytest.raises(InferenceFailed, match="declared BYTES"):
        collect_outputs(client, Bytes.request_outputs, [{"total": 1, "echo": 3}])  # type: ignore[arg-type]
    with pytest.raises(InferenceFailed, match="shape"):
        collect_outputs(client, [RequestSpec("v", "FP32", (2,))], [{"v": [1, 2]}, {"v": [1, 2, 3]}])  # type: ignore[arg-type]


def _v2_request(texts: list[bytes], binary: bool, name: str = "text", shape: list[int] | None = None,
                outputs: list[Any] | None = None) -> v2.V2InferRequest:
    array = np.array(texts, dtype=object)
    infer_input = httpclient.InferInput(name, shape or [len(texts)], "BYTES")
    infer_input.set_data_from_numpy(array.reshape(shape or [len(texts)]), binary_data=binary)
    body, size = _get_inference_request(
        inputs=[infer_input], request_id="r1", outputs=outputs, sequence_id=0, sequence_start=False,
        sequence_end=False, priority=0, timeout=None, custom_parameters=None)
    return v2.parse_infer_request(body if isinstance(body, bytes) else body.encode(), size)


@pytest.mark.parametrize("binary", [False, True])
def test_v2_bytes_request_runs_preprocess_predict_postprocess(binary: bool) -> None:
    client = FakeClient(Bytes(), rows=2)
    outputs = [httpclient.InferRequestedOutput("echo", binary_data=binary),
               httpclient.InferRequestedOutput("total", binary_data=binary)]
    req = _v2_request([b"ab", b"c", b"hello"], binary, outputs=outputs)
    response = asyncio.run(infer_request_level(client, req))  # type: ignore[arg-type]
    length = response.headers.get(v2.HEADER_LENGTH_HEADER)
    result = httpclient.InferResult.from_response_body(
        bytes(response.body), verbose=False, header_length=int(length) if length else None)
    echo = [e if isinstance(e, bytes) else e.encode() for e in result.as_numpy("echo").tolist()]
    assert echo == [b"AB", b"C", b"HELLO"]
    assert result.as_numpy("total").tolist() == [195.0, 99.0, 532.0]
    assert [o["name"] for o in result.get_response()["outputs"]] == ["echo", "total"]
    assert len(client.calls) == 2  # 3 rows, 2 per infer


def test_v2_bytes_request_errors() -> None:
    client = FakeClient(Bytes(), rows=2, max_inputs=3)
    run = lambda req: asyncio.run(infer_request_level(client, req))  # noqa: E731  # type: ignore[arg-type]
    with pytest.raises(PayloadTooLarge, match="at most 3"):
        run(_v2_request([b"a"] * 4, True))
    with pytest.raises(InvalidInput, match="empty"):
        run(_v2_request([], False))
    with pytest.raises(InvalidInput, match=r"must be \[rows\]"):
        run(_v2_request([b"a", b"b"], True, shape=[1, 2]))
    with pytest.raises(InvalidInput, match="bad text"):
        run(_v2_request([b"ok", b"bad"], True))
    with pytest.raises(InvalidInput, match="no output 'y'"):
        run(_v2_request([b"a"], True, outputs=[httpclient.InferRequestedOutput("y")]))
    with pytest.raises(InvalidInput, match="request-level inputs"):
        run(_v2_request([b"a"], True, name="other"))


# -- OpenAI and TEI embeddings ------------------------------------------------------------------------------

def test_parse_openai_embeddings() -> None:
    req = parse_openai_embeddings(b'{"model": "e", "input": "hi"}')
    assert (req.model, req.items, req.encoding_format, req.dimensions) == ("e", ["hi"], "float", None)
    assert parse_openai_embeddings(b'{"input": [1, 2, 3]}').items == [[1, 2, 3]]
    assert parse_openai_embeddings(b'{"input": [[1], [2, 3]], "encoding_format": "base64"}').items == [[1], [2, 3]]
    assert parse_openai_embeddings(b'{"input": ["a", "b"], "dimensions": 8}').dimensions == 8


@pytest.mark.parametrize(("body", "param", "message"), [
    (b'{"model": "e"}', "input", "missing field input"),
    (b'{"input": []}', "input", "empty"),
    (b'{"input": ""}', "input", "empty string"),
    (b'{"input": [[]]}', "input", "empty token list"),
    (b'{"input": [true]}', "input", "must be a string"),
    (b'{"input": {"a": 1}}', "input", "got dict"),
    (b'{"input": "a", "encoding_format": "int8"}', "encoding_format", "'float' or 'base64'"),
    (b'{"input": "a", "dimensions": 0}', "dimensions", "positive"),
    (b'{"input": "a", "model": 1}', "model", "string"),
    (b'[1]', None, "object"),
])
def test_parse_openai_embeddings_errors(body: bytes, param: str | None, message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as e:
        parse_openai_embeddings(body)
    status, error = openai_error(e.value)
    assert status == 400 and error["error"]["param"] == param and error["error"]["type"] == "invalid_request_error"


def test_parse_tei_embed() -> None:
    assert parse_tei_embed(b'{"inputs": "a"}') == (["a"], True, False)
    assert parse_tei_embed(b'{"inputs": ["a", "b"], "normalize": false, "truncate": true}') == (["a", "b"], False, True)
    for body, message in ((b'{"inputs": []}', "empty"), (b'{"inputs": [1]}', "list of strings"),
                          (b'{"inputs": ["a", ""]}', "empty string"),
                          (b'{"inputs": "a", "normalize": 1}', "normalize")):
        with pytest.raises(InvalidInput, match=message):
            parse_tei_embed(body)


def test_tei_error_shape() -> None:
    assert tei_error(InvalidInput("x")) == (422, {"error": "x", "error_type": "Validation"})
    assert tei_error(PayloadTooLarge("x"))[0] == 413
    assert tei_error(Overloaded("x")) == (429, {"error": "x", "error_type": "Overloaded"})
    assert tei_error(InferenceFailed("x")) == (500, {"error": "x", "error_type": "Backend"})


def test_embedding_model_lookup_and_batching() -> None:
    a, b = FakeClient(Embedder(), "a", rows=4), FakeClient(Embedder(), "b", version="2")
    plain = FakeClient(Bytes(), "plain")
    state = FrontState(clients={"a": a, "b": b, "plain": plain})  # type: ignore[dict-item]
    h = EmbeddingRoutes(state)
    assert sorted(h.models()) == ["a", "b"] and h.default_name() == "a"
    assert h.pick("b") is b and h.pick(None) is a
    state.default_model = "b"
    assert h.pick(None) is b
    with pytest.raises(ModelNotFound, match=r"unknown embedding model 'plain'; served: \['a', 'b'\]") as e:
        h.pick("plain")
    assert openai_error(e.value)[1]["error"]["param"] == "model"
    vectors, tokens = asyncio.run(h.embed(a, ["ab", "c", "de", "f", "g"], "input"))  # type: ignore[arg-type]
    assert vectors.tolist() == [[195.0, 1.0], [99.0, 1.0], [201.0, 1.0], [102.0, 1.0], [103.0, 1.0]]
    assert tokens == 7 and [c[1] for c in a.calls] == [4, 1]  # one infer per max_request_rows rows
    with pytest.raises(InvalidInput, match="does not take token ids"):
        asyncio.run(h.embed(a, [[1, 2]], "input"))  # type: ignore[arg-type]
