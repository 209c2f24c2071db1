"""The shipped tiny-llm and its adapters: task accuracy alone and mixed, and parity with PEFT.

Held-out prompts come from `heldout.jsonl`, written by scripts/train_tiny_llm.py and never trained on.
"""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tandem.llm.engine import Engine, EngineLimits, GenInput, generate
from tandem.llm.model import load_weights
from tandem.llm.params import SamplingParams
from tests.conftest import TINY_LLM

ADAPTERS = ("reverse", "upper", "sort", "increment")
TASK_ADAPTER = {"copy": "", **{a: a for a in ADAPTERS}}


@pytest.fixture(scope="module")
def heldout() -> dict[str, list[tuple[str, str]]]:
    rows: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for line in (TINY_LLM / "heldout.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows[r["task"]].append((r["prompt"], r["target"]))
    assert set(rows) == set(TASK_ADAPTER) and all(len(v) >= 200 for v in rows.values())
    return rows


@pytest.fixture(scope="module")
def tok() -> object:
    return AutoTokenizer.from_pretrained(str(TINY_LLM / "base"))


def _engine() -> Engine:
    limits = EngineLimits(max_batch_size=32, max_total_tokens=64, max_waiting=100_000)
    eng = Engine(load_weights(TINY_LLM / "base"), limits)
    for a in ADAPTERS:
        eng.add_adapter_now(a, TINY_LLM / "adapters" / a)
    return eng


def _run(eng: Engine, tok: object, jobs: list[tuple[str, str]]) -> list[str]:
    """jobs: (prompt, adapter) -> generated texts, greedy."""
    inputs = [GenInput(i, tok(p)["input_ids"], SamplingParams(max_new_tokens=16), a)  # type: ignore[operator]
              for i, (p, a) in enumerate(jobs)]
    out = generate(eng, inputs)
    return [tok.decode([o.token for o in out[i]], skip_special_tokens=True)  # type: ignore[attr-defined]
            for i in range(len(jobs))]


def test_accuracy_alone_and_mixed_is_the_same_and_high(heldout: dict[str, list[tuple[str, str]]],
                                                        tok: object) -> None:
    eng = _engine()
    alone: dict[str, list[str]] = {}
    for task, rows in heldout.items():
        alone[task] = _run(eng, tok, [(p, TASK_ADAPTER[task]) for p, _ in rows])
    # mixed: every task interleaved, so each batch holds all four adapters and the base
    jobs = [(rows[i][0], TASK_ADAPTER[task]) for i in range(200) for task, rows in heldout.items()]
    mixed_flat = _run(eng, tok, jobs)
    tasks = list(heldout)
    for t, task in enumerate(tasks):
        mixed = mixed_flat[t::len(tasks)]
        targets = [target for _, target in heldout[task][:200]]
        acc = sum(m == y for m, y in zip(mixed, targets)) / len(targets)
        assert mixed == alone[task][:200], task
        assert acc >= 0.95, (task, acc)


@pytest.mark.parametrize("adapter", ["", *ADAPTERS])
def test_mixed_batch_greedy_equals_peft_alone(heldout: dict[str, list[tuple[str, str]]], tok: object,
                                              adapter: str) -> None:
    ref = AutoModelForCausalLM.from_pretrained(str(TINY_LLM / "base")).eval()
    if adapter:
        ref = PeftModel.from_pretrained(ref, str(TINY_LLM / "adapters" / adapter)).eval()
    task = {v: k for k, v in TASK_ADAPTER.items()}[adapter]
    prompts = [p for p, _ in heldout[task][:12]]
    others = [("abcdef=", a) for a in ("", *ADAPTERS)] * 2  # batch mates using every other adapter
    got = _run(_engine(), tok, [(p, adapter) for p in prompts] + others)[:len(prompts)]
    eos = tok.eos_token_id  # type: ignore[attr-defined]
    for p, g in zip(prompts, got):
        ids = torch.tensor([tok(p)["input_ids"]])  # type: ignore[operator]
        out = ref.generate(input_ids=ids, max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        assert g == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), p  # type: ignore[attr-defined]


def test_adapters_differ_observably(tok: object) -> None:
    eng = _engine()
    out = _run(eng, tok, [("hello=", a) for a in ("", "reverse", "upper", "sort")] + [("1289=", "increment")])
    assert out == ["hello", "olleh", "HELLO", "ehllo", "2390"]
