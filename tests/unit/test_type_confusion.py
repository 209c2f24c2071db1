"""Type confusion: every JSON field of every protocol parser, given a value of each JSON type.

For each parser the table gives a valid body that sets every field the parser reads; the cases
are every (field path in that body) x (null, bool, int, float, string, list, object). A case
passes when the parser accepts the body, or raises a 4xx `TandemError` whose message names the
field; any other exception (TypeError, ValueError, AttributeError, ...) is a bug. The tables are
checked against the OpenAPI request schemas so a documented field cannot be left out.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tandem.diffusion.a1111 import parse_txt2img
from tandem.diffusion.openai_images import parse_generation
from tandem.diffusion.routes import parse_invocation
from tandem.errors import TandemError
from tandem.llm.http.openai import parse_chat, parse_completion, parse_load_adapter, parse_unload_adapter
from tandem.llm.http.tgi import compat_stream, parse_generate
from tandem.llm.lora import _REFUSED_FEATURES, load_adapter
from tandem.llm.model import LlamaSpec
from tandem.serving.protocols import v2

Path_ = tuple[str | int, ...]
TINY = Path(__file__).resolve().parents[2] / "tandem" / "default_repo" / "tiny-llm"
VALUES: dict[str, Any] = {"null": None, "bool": True, "int": 3, "float": 0.5, "string": "x",
                          "list": [{"k": 1}], "object": {"k": [1]}}


def _tgi(body: dict[str, Any]) -> Any:
    return parse_generate(body, 16)


def _tgi_compat(body: dict[str, Any]) -> Any:
    compat_stream(body)
    return parse_generate(body, 16)


def _v2_json(body: dict[str, Any]) -> Any:
    return v2.parse_infer_request(orjson.dumps(body), None)


def _v2_binary(body: dict[str, Any]) -> Any:
    header = orjson.dumps(body)
    return v2.parse_infer_request(header + b"\0" * 8, len(header))


TGI_BODY = {"inputs": "hello=", "parameters": {
    "max_new_tokens": 8, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "repetition_penalty": 1.1, "seed": 1,
    "do_sample": True, "details": True, "return_full_text": False, "stop": ["\n"], "adapter_id": "reverse",
    "truncate": 100, "typical_p": 1.0, "best_of": 1, "top_n_tokens": 0, "frequency_penalty": 0.0,
    "watermark": False, "decoder_input_details": False, "grammar": None}}
SAMPLING = {"model": "tiny-llm", "temperature": 0.5, "top_p": 0.9, "top_k": 3, "repetition_penalty": 1.1, "seed": 3,
            "ignore_eos": False, "presence_penalty": 0, "frequency_penalty": 0, "n": 1, "stop": ["\n"],
            "stream": False, "stream_options": {"include_usage": True}}
COMPLETION_BODY = {**SAMPLING, "prompt": "abc=", "max_tokens": 4, "logprobs": 1, "echo": False, "best_of": 1,
                   "suffix": ""}
COMPLETION_IDS_BODY = {"prompt": [[1, 5, 6], [1, 7]]}
CHAT_BODY = {**SAMPLING, "messages": [{"role": "system", "content": "be brief"},
                                      {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                      {"role": "assistant", "content": None}],
             "max_tokens": 4, "max_completion_tokens": 4, "logprobs": True, "top_logprobs": 0, "tools": [],
             "functions": [], "tool_choice": "none", "function_call": "none", "response_format": {"type": "text"}}
V2_BODY = {"id": "r1", "parameters": {"binary_data_output": False},
           "inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0], "parameters": {}}],
           "outputs": [{"name": "y", "parameters": {"binary_data": False}}]}
V2_BINARY_BODY = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32",
                              "parameters": {"binary_data_size": 8}}]}
LOAD_BODY = {"lora_name": "rev2", "lora_path": "reverse", "model": "tiny-llm"}
UNLOAD_BODY = {"lora_name": "rev2", "model": "tiny-llm"}

INVOKE_BODY = {"prompt": "a red circle", "inputs": "a red circle", "parameters": {
    "negative_prompt": "blur", "num_inference_steps": 20, "guidance_scale": 7.5, "height": 64, "width": 64,
    "seed": 3, "scheduler": "euler", "num_images_per_prompt": 1, "output_format": "png"}}
IMAGES_BODY = {"model": "t2i", "prompt": "a red circle", "n": 1, "size": "64x64", "response_format": "b64_json",
               "output_format": "png", "stream": False, "partial_images": 1, "quality": "auto", "background": "auto",
               "user": "u", "negative_prompt": "", "steps": 20, "guidance_scale": 5.0, "seed": 1,
               "sampler": "ddim", "progress": False}
TXT2IMG_BODY = {"prompt": "a red circle", "negative_prompt": "", "steps": 20, "cfg_scale": 7.0, "seed": -1,
                "width": 64, "height": 64, "batch_size": 1, "n_iter": 1, "sampler_name": "Euler a",
                "enable_hr": False, "restore_faces": False, "tiling": False,
                "override_settings": {"sd_model_checkpoint": "t2i"}}

# (label, parser, valid body, OpenAPI operation whose request schema the body must cover)
TABLE: list[tuple[str, Callable[[dict[str, Any]], Any], dict[str, Any], str | None]] = [
    ("tgi", _tgi, TGI_BODY, "/generate"),
    ("tgi-compat", _tgi_compat, {**TGI_BODY, "stream": False}, "/"),
    ("completion", parse_completion, COMPLETION_BODY, "/v1/completions"),
    ("completion-ids", parse_completion, COMPLETION_IDS_BODY, None),
    ("chat", parse_chat, CHAT_BODY, "/v1/chat/completions"),
    ("v2", _v2_json, V2_BODY, "/v2/models/{model}/infer"),
    ("v2-binary", _v2_binary, V2_BINARY_BODY, None),
    ("load-adapter", parse_load_adapter, LOAD_BODY, "/v1/load_lora_adapter"),
    ("unload-adapter", parse_unload_adapter, UNLOAD_BODY, "/v1/unload_lora_adapter"),
    ("sagemaker-image", parse_invocation, INVOKE_BODY, None),  # /invocations' documented body is the tensor one
    ("openai-images", parse_generation, IMAGES_BODY, "/v1/images/generations"),
    ("a1111-txt2img", parse_txt2img, TXT2IMG_BODY, "/sdapi/v1/txt2img"),
]


def field_paths(value: Any, prefix: Path_ = ()) -> Iterator[Path_]:
    """Every path to a value inside `value` (object keys and list indices), parents first."""
    if isinstance(value, dict):
        for key, sub in value.items():
            yield (*prefix, key)
            yield from field_paths(sub, (*prefix, key))
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            yield (*prefix, i)
            yield from field_paths(sub, (*prefix, i))


def substituted(body: Any, path: Path_, value: Any) -> Any:
    out = copy.deepcopy(body)
    target = out
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = copy.deepcopy(value)
    return out


def field_name(path: Path_) -> str:
    """The field a message must name: the innermost object key of the path."""
    return str(next(step for step in reversed(path) if isinstance(step, str)))


def check(parse: Callable[[Any], Any], body: Any, path: Path_) -> None:
    try:
        parse(body)
    except TandemError as e:
        assert 400 <= e.status < 500, f"{type(e).__name__} ({e.status}) for {path}: {e}"
        assert field_name(path) in str(e), f"message does not name {field_name(path)!r} ({path}): {e}"
    # any other exception propagates and fails the case


CASES = [pytest.param(parse, body, path, kind, id=f"{label}:{'.'.join(map(str, path))}={kind}")
         for label, parse, body, _ in TABLE for path in field_paths(body) for kind in VALUES]


@pytest.mark.parametrize(("label", "parse", "body"), [(t[0], t[1], t[2]) for t in TABLE])
def test_the_valid_bodies_are_accepted(label: str, parse: Callable[[Any], Any], body: dict[str, Any]) -> None:
    parse(body)


@pytest.mark.parametrize(("parse", "body", "path", "kind"), CASES)
def test_every_field_with_every_json_type(parse: Callable[[Any], Any], body: dict[str, Any], path: Path_,
                                          kind: str) -> None:
    check(parse, substituted(body, path, VALUES[kind]), path)


def _schema_fields(schema: dict[str, Any], prefix: Path_ = ()) -> Iterator[Path_]:
    """Object property paths of a request schema (lists as index 0, the first alternative of anyOf)."""
    for alt in schema.get("anyOf", []):
        if alt.get("type") in ("object", "array") or "properties" in alt:
            yield from _schema_fields(alt, prefix)
    for key, sub in schema.get("properties", {}).items():
        yield (*prefix, key)
        yield from _schema_fields(sub, (*prefix, key))
    if "items" in schema and isinstance(schema["items"], dict):
        yield from _schema_fields(schema["items"], (*prefix, 0))


@pytest.mark.parametrize(("label", "body", "operation"), [(t[0], t[2], t[3]) for t in TABLE if t[3]])
def test_the_tables_cover_every_documented_field(label: str, body: dict[str, Any], operation: str) -> None:
    from tandem.kinds import builtin_kinds
    from tandem.serving.app import route_specs
    from tandem.serving.kinds import FrontState

    spec = next(s for s in route_specs(FrontState(), builtin_kinds()) if s.path == operation and s.method == "POST")
    assert spec.doc is not None and spec.doc.request is not None

    def wild(path: Path_) -> Path_:  # any list index
        return tuple("*" if isinstance(step, int) else step for step in path)

    documented = {wild(p) for p in _schema_fields(spec.doc.request["application/json"]) if not isinstance(p[-1], int)}
    covered = {wild(p) for p in field_paths(body)}
    assert sorted(map(str, documented - covered)) == []


# -- PEFT adapter_config.json fields read by tandem/llm/lora.py ------------------------------------------------
CONFIG_FIELDS = ["peft_type", "bias", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern",
                 *_REFUSED_FEATURES]


@pytest.fixture(scope="module")
def adapter_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], LlamaSpec]:
    folder = tmp_path_factory.mktemp("adapter") / "a"
    shutil.copytree(TINY / "adapters" / "reverse", folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {"model.layers.0.self_attn.q_proj": cfg["r"]}
    cfg["alpha_pattern"] = {"q_proj": cfg["lora_alpha"]}
    return folder, cfg, LlamaSpec.from_folder(TINY / "base")


def _config_paths() -> list[Path_]:
    paths: list[Path_] = [(f,) for f in CONFIG_FIELDS]
    return [*paths, ("rank_pattern", "model.layers.0.self_attn.q_proj"), ("alpha_pattern", "q_proj")]


def test_the_adapter_config_case_loads(adapter_case: tuple[Path, dict[str, Any], LlamaSpec]) -> None:
    folder, cfg, spec = adapter_case
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    assert load_adapter("a", folder, spec, 16).rank == cfg["r"]


@pytest.mark.parametrize("kind", list(VALUES))
@pytest.mark.parametrize("path", _config_paths(), ids=lambda p: ".".join(map(str, p)))
def test_every_adapter_config_field_with_every_json_type(adapter_case: tuple[Path, dict[str, Any], LlamaSpec],
                                                         path: Path_, kind: str) -> None:
    folder, cfg, spec = adapter_case
    (folder / "adapter_config.json").write_text(json.dumps(substituted(cfg, path, VALUES[kind])))
    check(lambda _: load_adapter("a", folder, spec, 16), None, path)


# -- values of the right type the fuzzer found to crash a parser -------------------------------------------------
@pytest.mark.parametrize("shape", [[0, 2**63], [0, 2**64 - 1], [1] * 70])
def test_v2_shapes_numpy_cannot_hold_are_400(shape: list[int]) -> None:
    body = {"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": [] if 0 in shape else [1.0]}]}
    with pytest.raises(TandemError, match="shape") as e:
        _v2_json(body)
    assert e.value.status == 400


@pytest.mark.parametrize("kind", list(VALUES))
def test_the_whole_adapter_config_with_every_json_type(adapter_case: tuple[Path, dict[str, Any], LlamaSpec],
                                                       kind: str) -> None:
    folder, cfg, spec = adapter_case
    (folder / "adapter_config.json").write_text(json.dumps(VALUES[kind]))  # an object: PEFT's defaults
    check(lambda _: load_adapter("a", folder, spec, 16), None, ("adapter_config.json",))


def test_adapter_paths_the_os_refuses_are_400(tmp_path: Path) -> None:
    spec = LlamaSpec.from_folder(TINY / "base")
    with pytest.raises(TandemError, match="cannot read folder") as e:
        load_adapter("a", tmp_path / ("x" * 300), spec, 16)  # ENAMETOOLONG
    assert e.value.status == 400
    (tmp_path / "b" / "adapter_config.json").mkdir(parents=True)  # a folder where the file belongs
    with pytest.raises(TandemError, match="adapter_config.json"):
        load_adapter("b", tmp_path / "b", spec, 16)
