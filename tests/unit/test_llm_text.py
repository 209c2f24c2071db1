"""Front-side text handling: incremental detokenization, stop sequences, TGI request parsing."""

from __future__ import annotations

import pytest

from tandem.errors import InvalidInput
from tandem.llm.http.tgi import parse_generate
from tandem.llm.text import Detokenizer, StopMatcher


def test_detokenizer_never_splits_multibyte_characters() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # A byte-level BPE with no merges: every UTF-8 byte is its own token, so "é" and "🙂" span several.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    text = "héllo 🙂 wörld"
    ids = fast(text)["input_ids"]
    assert len(ids) > len(text)
    detok = Detokenizer(fast, [])
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize(("chunks", "stops", "want_text", "want_stop"), [
    (["ab", "cX", "Yd"], ["XY"], "abc", "XY"),
    (["abX"], ["XY"], "ab", None),  # "X" held back: might start "XY"
    (["a", "b"], [], "ab", None),
    (["hello wor", "ld"], ["world", "lo w"], "hel", "lo w"),  # the earliest match wins
])
def test_stop_matcher(chunks: list[str], stops: list[str], want_text: str, want_stop: str | None) -> None:
    m = StopMatcher(stops)
    out, stop = "", None
    for c in chunks:
        text, stop = m.feed(c)
        out += text
        if stop:
            break
    assert (out, stop) == (want_text, want_stop)


def test_stop_matcher_flushes_held_text_at_the_end() -> None:
    m = StopMatcher(["XY"])
    assert m.feed("abX") == ("ab", None)
    assert m.flush() == "X"


def test_parse_generate_defaults_and_sampling_switch() -> None:
    req = parse_generate({"inputs": "abc="}, default_max_new=16)
    assert req.params.max_new_tokens == 16 and not req.params.do_sample and req.adapter == ""
    req = parse_generate({"inputs": "abc=", "parameters": {"temperature": 0.5, "adapter_id": "upper",
                                                           "stop": ["x"], "details": True, "seed": 3}}, 16)
    assert req.params.do_sample and req.params.temperature == 0.5 and req.params.seed == 3
    assert req.adapter == "upper" and req.stops == ["x"] and req.details
    # nulls (as huggingface_hub sends them) mean "not set"
    req = parse_generate({"inputs": "a", "parameters": {"temperature": None, "top_k": None, "best_of": None}}, 4)
    assert not req.params.do_sample


@pytest.mark.parametrize(("params", "field"), [
    ({"temperature": 0}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.1}, "top_p"),
    ({"top_k": 0}, "top_k"), ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": 1.5}, "max_new_tokens"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"best_of": 2}, "best_of"), ({"typical_p": 0.9}, "typical_p"),
    ({"watermark": True}, "watermark"), ({"stop": ["a"] * 5}, "stop"), ({"adapter_id": 3}, "adapter_id"),
    ({"seed": -1}, "seed"), ({"top_n_tokens": 2}, "top_n_tokens"), ({"truncate": 0}, "truncate"),
])
def test_parse_generate_rejects(params: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInput, match=field):
        parse_generate({"inputs": "abc=", "parameters": params}, 16)


def test_parse_generate_rejects_bad_inputs() -> None:
    for body in ({}, {"inputs": ""}, {"inputs": 3}, {"inputs": "a", "parameters": []}):
        with pytest.raises(InvalidInput):
            parse_generate(body, 16)
