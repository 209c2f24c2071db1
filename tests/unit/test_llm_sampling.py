"""Sampling against transformers' logits processors and against its own distribution (seeded, deterministic).

The reference distribution of one row is transformers' chain on the same logits:
RepetitionPenaltyLogitsProcessor -> TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper
-> softmax. Draws are checked with a chi-square test over many seeded requests; every random
number comes from a fixed seed, so the statistic (and the test's outcome) is the same every run.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tandem.llm.engine import Engine, EngineLimits, GenInput, generate
from tandem.llm.model import load_weights
from tandem.llm.params import SamplingParams
from tandem.llm.sampling import SamplerState, choose, warp

PROMPT = [3, 4, 7, 7, 11]  # the tokens a repetition penalty applies to (7 twice: penalized once)
CPU = torch.device("cpu")


def _states(params: list[SamplingParams], vocab: int, prompt: list[int] = PROMPT) -> list[SamplerState]:
    return [SamplerState.create(p, prompt, vocab, CPU) for p in params]


def _reference(logits: torch.Tensor, p: SamplingParams, prompt: list[int] = PROMPT) -> torch.Tensor:
    """transformers' processors and warpers, in `generate`'s order -> probabilities [R, V]."""
    scores = logits.clone()
    ids = torch.tensor([prompt] * scores.shape[0])
    if p.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, scores)
    if p.temperature != 1.0:
        scores = TemperatureLogitsWarper(p.temperature)(ids, scores)
    if p.top_k:
        scores = TopKLogitsWarper(p.top_k)(ids, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(ids, scores)
    return scores.softmax(-1)


def _chi2_bound(df: int, z: float = 3.719) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile; z = 3.719 is the 0.9999 normal quantile."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


CASES = {
    "temperature": SamplingParams(do_sample=True, temperature=0.7),
    "top_k": SamplingParams(do_sample=True, top_k=5),
    "top_p": SamplingParams(do_sample=True, top_p=0.8),
    "penalty": SamplingParams(do_sample=True, repetition_penalty=1.5),
    "all": SamplingParams(do_sample=True, temperature=1.3, top_k=12, top_p=0.9, repetition_penalty=1.3),
    "hot_top_k_over_vocab": SamplingParams(do_sample=True, temperature=2.5, top_k=500, top_p=0.97),
}


@pytest.mark.parametrize("case", list(CASES))
def test_warped_distribution_equals_transformers_processors(case: str) -> None:
    p = CASES[case]
    torch.manual_seed(len(case))
    logits = torch.randn(5, 40) * 3
    logits[:, PROMPT] += 2.0  # the penalized tokens are likely ones: the penalty matters
    _, rows, filtered = warp(logits.clone(), _states([p] * 5, 40))
    assert rows == [0, 1, 2, 3, 4] and filtered is not None
    got, want = filtered.softmax(-1), _reference(logits, p)
    assert torch.equal(got > 0, want > 0)  # the same tokens may be drawn
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("seeded", [True, False])
def test_draws_follow_the_warped_distribution(seeded: bool) -> None:
    """20000 draws (one seeded request each, or one global seed): frequencies match transformers' distribution."""
    V, N = 16, 20_000
    g = torch.Generator().manual_seed(0)
    row = torch.randn(V, generator=g) * 1.5
    row[PROMPT] += 1.0
    p = SamplingParams(do_sample=True, temperature=0.8, top_k=10, top_p=0.95, repetition_penalty=1.3)
    torch.manual_seed(1234)  # the unseeded draws use the global generator
    params = [SamplingParams(do_sample=True, temperature=0.8, top_k=10, top_p=0.95, repetition_penalty=1.3,
                             seed=i if seeded else None) for i in range(N)]
    tokens, _ = choose(row.expand(N, V).clone(), _states(params, V))
    counts = torch.bincount(tokens, minlength=V).double()
    want = _reference(row[None], p)[0].double()
    support = want > 0
    assert counts[~support].sum() == 0  # nothing top-k / top-p removed is ever drawn
    assert 2 <= int(support.sum()) < V  # the filters really removed some tokens, and left a choice

    def chi2(probs: torch.Tensor) -> float:
        expected = N * probs[support]
        return float(((counts[support] - expected) ** 2 / expected).sum())

    df = int(support.sum()) - 1
    assert chi2(want) < _chi2_bound(df)
    # the test has power: the same draws against the distribution without the penalty are far off
    unpenalized = _reference(row[None], SamplingParams(do_sample=True, temperature=0.8, top_k=10, top_p=0.95))[0]
    assert chi2(unpenalized.double().where(support, torch.tensor(1e-12, dtype=torch.float64))) > 10 * _chi2_bound(df)


def test_mixed_batch_rows_equal_each_row_sampled_alone() -> None:
    """Per-row temperature / top-k / top-p / penalty / greedy in ONE batch: each row as if it were alone."""
    V = 40
    torch.manual_seed(0)
    logits = torch.randn(7, V) * 2
    for seed in range(25):
        params = [SamplingParams(),  # greedy
                  SamplingParams(do_sample=True, temperature=0.5, seed=seed, logprobs=True),
                  SamplingParams(do_sample=True, top_k=3, seed=seed + 100),
                  SamplingParams(do_sample=True, top_p=0.6, temperature=1.4, seed=seed + 200),
                  SamplingParams(do_sample=True, temperature=0.9, top_k=8, top_p=0.9, repetition_penalty=1.4,
                                 seed=seed + 300),
                  SamplingParams(repetition_penalty=2.0, logprobs=True),  # greedy with a penalty
                  SamplingParams(do_sample=True, temperature=3.0, seed=seed + 400, logprobs=True)]
        batch_tokens, batch_lp = choose(logits.clone(), _states(params, V))
        scaled, rows, filtered = warp(logits.clone(), _states(params, V))
        assert rows == [1, 2, 3, 4, 6] and filtered is not None
        assert batch_lp is not None
        for i, p in enumerate(params):
            alone, alone_lp = choose(logits[i:i + 1].clone(), _states([p], V))
            assert batch_tokens[i] == alone[0], (seed, i)
            if p.logprobs:
                assert alone_lp is not None
                assert batch_lp[i].item() == pytest.approx(alone_lp[0].item(), abs=1e-6)
            a_scaled, _, a_filtered = warp(logits[i:i + 1].clone(), _states([p], V))
            torch.testing.assert_close(scaled[i:i + 1], a_scaled, atol=0, rtol=0)
            if p.do_sample:
                assert a_filtered is not None
                torch.testing.assert_close(filtered[rows.index(i)][None], a_filtered, atol=0, rtol=0)
        assert batch_tokens[0] == logits[0].argmax()


def test_logprobs_are_of_the_penalized_tempered_distribution() -> None:
    V = 30
    torch.manual_seed(3)
    logits = torch.randn(4, V) * 2
    p = SamplingParams(do_sample=True, temperature=0.6, top_k=4, repetition_penalty=1.7, seed=9, logprobs=True)
    tokens, lp = choose(logits.clone(), _states([p] * 4, V))
    ids = torch.tensor([PROMPT] * 4)
    want = TemperatureLogitsWarper(0.6)(ids, RepetitionPenaltyLogitsProcessor(1.7)(ids, logits.clone()))
    assert lp is not None
    torch.testing.assert_close(lp, want.log_softmax(-1).gather(-1, tokens[:, None])[:, 0], atol=1e-5, rtol=0)


def test_sampled_differs_from_greedy_and_the_same_seed_reproduces() -> None:
    V = 30
    torch.manual_seed(5)
    logits = torch.randn(1, V)
    p = {s: SamplingParams(do_sample=True, temperature=1.5, seed=s) for s in range(200)}
    draws = [int(choose(logits.clone(), _states([p[s]], V))[0]) for s in range(200)]
    again = [int(choose(logits.clone(), _states([p[s]], V))[0]) for s in range(200)]
    assert draws == again  # same seed, same token
    greedy = int(logits.argmax())
    p_greedy = float(_reference(logits, p[0])[0, greedy])
    off = sum(t != greedy for t in draws) / len(draws)
    assert abs(off - (1 - p_greedy)) < 0.1  # draws leave the argmax as often as the distribution says
    assert len(set(draws)) > 10


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("llm-sampling") / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 bos_token_id=1, eos_token_id=2)).save_pretrained(root)
    return root


def test_engine_seeded_generation_reproduces_and_differs_from_greedy(tiny_llama: Path) -> None:
    def run(params: SamplingParams, mates: int = 0) -> list[int]:
        eng = Engine(load_weights(tiny_llama), EngineLimits(max_batch_size=4, max_total_tokens=64))
        inputs = [GenInput(100 + i, [1, 9 + i, 20], SamplingParams(max_new_tokens=5 + i, do_sample=True,
                                                                    ignore_eos=True)) for i in range(mates)]
        return [o.token for o in generate(eng, [*inputs, GenInput(1, [1, 5, 6, 7], params)])[1]]

    sampled = SamplingParams(max_new_tokens=16, do_sample=True, temperature=1.2, top_k=40, top_p=0.95,
                             repetition_penalty=1.1, seed=7, ignore_eos=True)
    first = run(sampled)
    assert len(first) == 16
    assert run(sampled) == first  # a fresh engine, the same seed: the same tokens
    assert run(sampled, mates=3) == first  # whatever shares the batch
    assert run(SamplingParams(max_new_tokens=16, do_sample=True, temperature=1.2, top_k=40, top_p=0.95,
                              repetition_penalty=1.1, seed=8, ignore_eos=True)) != first
    assert run(SamplingParams(max_new_tokens=16, ignore_eos=True)) != first  # greedy
