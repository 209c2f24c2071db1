"""LLM engine against the references: transformers (base) and PEFT (each adapter alone), fp32.

A random tiny Llama (GQA) and Qwen2 (qkv bias, tied embeddings) are built per session; three
PEFT adapters with different ranks and target modules share one mixed batch.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tandem.llm.engine import Engine, EngineLimits, GenInput, generate
from tandem.llm.lora import AdapterError, LoraBank, SlotCopies, load_adapter
from tandem.llm.model import KVCache, forward, load_weights
from tandem.llm.params import SamplingParams
from tandem.llm.sampling import SamplerState, choose
from tests.parity import assert_close_to_reference  # noqa: E402

ADAPTERS = {"a4qv": (4, ["q_proj", "v_proj"]),
            "a8all": (8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
            "a2mlp": (2, ["down_proj", "o_proj", "up_proj"])}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("llm")
    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(LlamaConfig(**common)).save_pretrained(root / "llama")
    Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True)).save_pretrained(root / "qwen2")
    MistralForCausalLM(MistralConfig(**common, sliding_window=64)).save_pretrained(root / "mistral")
    for name, (r, mods) in ADAPTERS.items():
        base = AutoModelForCausalLM.from_pretrained(root / "llama")
        peft = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=mods,
                                               init_lora_weights=False))
        peft.save_pretrained(root / name)
    return root


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 97, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_forward_matches_transformers_prefill_and_decode(models: Path, arch: str) -> None:
    ref = AutoModelForCausalLM.from_pretrained(models / arch).eval()
    w = load_weights(models / arch)
    prompts = _prompts(3)
    S, L = len(prompts), max(map(len, prompts))
    cache = KVCache.allocate(w.spec, S, 64, "cpu", torch.float32)
    toks = torch.tensor([p + [0] * (L - len(p)) for p in prompts])
    lens = torch.tensor([len(p) for p in prompts])
    logits = forward(w, toks, cache, torch.arange(S), torch.zeros(S, dtype=torch.long), lens, lens - 1)
    seqs = [list(p) for p in prompts]
    for _ in range(4):
        with torch.no_grad():
            want = torch.stack([ref(torch.tensor([s])).logits[0, -1] for s in seqs])
        assert_close_to_reference(logits, want, "float32", what="logits vs transformers")
        nxt = logits.argmax(-1)
        for s, t in zip(seqs, nxt.tolist()):
            s.append(t)
        logits = forward(w, nxt[:, None], cache, torch.arange(S), lens, lens + 1, torch.zeros(S, dtype=torch.long))
        lens = lens + 1


def _peft_refs(models: Path) -> dict[str, torch.nn.Module]:
    refs: dict[str, torch.nn.Module] = {"": AutoModelForCausalLM.from_pretrained(models / "llama").eval()}
    for name in ADAPTERS:
        refs[name] = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models / "llama"),
                                               str(models / name)).eval()
    return refs


@pytest.mark.parametrize("form", ["slots", "gathered", "grouped"])
def test_mixed_batch_logits_match_peft_alone(models: Path, form: str) -> None:
    """Base and every adapter in ONE batch: each row's logits equal PEFT with that adapter alone."""
    w = load_weights(models / "llama")
    bank = LoraBank(w.spec, 3, 8, "cpu", torch.float32, form=form)
    names = list(ADAPTERS)
    for i, name in enumerate(names):
        bank.write(i + 1, load_adapter(name, models / name, w.spec, 8))
    which = [0, 1, 2, 3, 2, 0, 1]
    prompts = _prompts(len(which), seed=1)
    S, L = len(prompts), max(map(len, prompts))
    cache = KVCache.allocate(w.spec, S, 64, "cpu", torch.float32)
    toks = torch.tensor([p + [0] * (L - len(p)) for p in prompts])
    lens = torch.tensor([len(p) for p in prompts])
    rows = None
    if form == "slots":  # each sequence's adapter copied to its row when it "joins"
        rows = SlotCopies(bank, S)
        for s, k in enumerate(which):
            rows.assign(s, k)
    hook = bank.hook(which, rows, 0)
    logits = forward(w, toks, cache, torch.arange(S), torch.zeros(S, dtype=torch.long), lens, lens - 1, hook)
    refs = _peft_refs(models)
    seqs = [list(p) for p in prompts]
    for _ in range(3):
        with torch.no_grad():
            want = torch.stack([refs["" if k == 0 else names[k - 1]](torch.tensor([s])).logits[0, -1]
                                for s, k in zip(seqs, which)])
        assert_close_to_reference(logits, want, "float32", what="logits vs transformers")
        nxt = logits.argmax(-1)
        for s, t in zip(seqs, nxt.tolist()):
            s.append(t)
        logits = forward(w, nxt[:, None], cache, torch.arange(S), lens, lens + 1, torch.zeros(S, dtype=torch.long),
                         hook)
        lens = lens + 1


@pytest.mark.parametrize("form", ["slots", "gathered", "grouped"])
def test_continuous_batching_greedy_equals_peft_generate(models: Path, form: str) -> None:
    """More requests than KV slots and more adapters than bank slots: joins, leaves, evictions."""
    eng = Engine(load_weights(models / "llama"), EngineLimits(max_batch_size=3, max_total_tokens=64, max_loras=2,
                                                              max_lora_rank=8, lora_form=form))
    for name in ADAPTERS:
        eng.add_adapter_now(name, models / name)
    names = ["", *ADAPTERS]
    inputs = [GenInput(i, p, SamplingParams(max_new_tokens=4 + i % 5, ignore_eos=True), names[i % 4])
              for i, p in enumerate(_prompts(10, seed=2))]
    results = generate(eng, inputs)
    refs = _peft_refs(models)
    for inp in inputs:
        out = refs[inp.adapter].generate(torch.tensor([inp.prompt]), max_new_tokens=inp.params.max_new_tokens,
                                         do_sample=False, eos_token_id=None, pad_token_id=0)
        assert [o.token for o in results[inp.req_id]] == out[0, len(inp.prompt):].tolist(), inp
        assert results[inp.req_id][-1].finish == "length"
    assert not eng.running and not eng.waiting
    assert eng.adapters.refs == [0, 0, 0]


def test_cancel_frees_slot_and_eos_finishes(models: Path) -> None:
    eng = Engine(load_weights(models / "llama"), EngineLimits(max_batch_size=2, max_total_tokens=64))
    eng.eos = {int(i) for i in range(97)}  # every token ends a sequence
    assert eng.submit(GenInput(1, [1, 5, 6], SamplingParams(max_new_tokens=10))) is None
    outs = eng.step()
    assert outs[0].finish == "eos_token" and not eng.running
    eng.eos = set()
    for i in (2, 3, 4):
        eng.submit(GenInput(i, [1, 5, 6], SamplingParams(max_new_tokens=50)))
    eng.step()
    assert len(eng.running) == 2 and len(eng.waiting) == 1
    assert eng.cancel(2)
    assert len(eng.running) == 1
    eng.step()  # request 4 takes the freed slot at once
    assert sorted(s.inp.req_id for s in eng.running) == [3, 4]


def test_mistral_window_larger_than_the_cache_is_refused(models: Path) -> None:
    with pytest.raises(ValueError, match="sliding window 64"):
        Engine(load_weights(models / "mistral"), EngineLimits(max_total_tokens=100))


def test_submit_errors(models: Path) -> None:
    eng = Engine(load_weights(models / "llama"), EngineLimits(max_batch_size=1, max_total_tokens=16, max_waiting=1))
    err = eng.submit(GenInput(1, [1, 2], SamplingParams(), adapter="nope"))
    assert err is not None and err.error_kind == "not_found" and "nope" in err.error
    err = eng.submit(GenInput(2, [1] * 10, SamplingParams(max_new_tokens=7)))
    assert err is not None and err.error_kind == "invalid" and "16" in err.error
    assert eng.submit(GenInput(3, [1, 2], SamplingParams(max_new_tokens=4))) is None
    err = eng.submit(GenInput(4, [1, 2], SamplingParams(max_new_tokens=4)))
    assert err is not None and err.error_kind == "overloaded"


def _adapter_copy(models: Path, tmp_path: Path, name: str, **cfg_changes: object) -> Path:
    dst = tmp_path / name
    dst.mkdir()
    (dst / "adapter_model.safetensors").write_bytes((models / "a4qv" / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((models / "a4qv" / "adapter_config.json").read_text())
    cfg.update(cfg_changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_adapter_validation_errors(models: Path, tmp_path: Path) -> None:
    spec = load_weights(models / "llama").spec
    with pytest.raises(AdapterError, match="DoRA"):
        load_adapter("d", _adapter_copy(models, tmp_path, "dora", use_dora=True), spec, 8)
    with pytest.raises(AdapterError, match="rank 4 exceeds max_lora_rank 2"):
        load_adapter("r", models / "a4qv", spec, 2)
    with pytest.raises(AdapterError, match="peft_type"):
        load_adapter("p", _adapter_copy(models, tmp_path, "ia3", peft_type="IA3"), spec, 8)
    qwen = load_weights(models / "qwen2").spec  # same dims: shapes agree, so this one loads
    assert load_adapter("q", models / "a4qv", qwen, 8).rank == 4
    other = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(other).save_pretrained(tmp_path / "small")
    with pytest.raises(AdapterError, match="another base model"):
        load_adapter("s", models / "a4qv", load_weights(tmp_path / "small").spec, 8)
    bin_only = tmp_path / "binonly"
    bin_only.mkdir()
    (bin_only / "adapter_config.json").write_text((models / "a4qv" / "adapter_config.json").read_text())
    (bin_only / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(AdapterError, match="pickled"):
        load_adapter("b", bin_only, spec, 8)
    corrupt = _adapter_copy(models, tmp_path, "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(AdapterError, match="cannot read"):
        load_adapter("c", corrupt, spec, 8)


def test_host_lru_reloads_evicted_adapter_in_background(models: Path) -> None:
    eng = Engine(load_weights(models / "llama"), EngineLimits(max_batch_size=4, max_total_tokens=32, max_loras=1,
                                                              max_cpu_loras=1, max_lora_rank=8))
    eng.add_adapter_now("a4qv", models / "a4qv")
    eng.add_adapter_now("a8all", models / "a8all")  # evicts a4qv from host memory
    assert list(eng.adapters.host) == ["a8all"]
    inputs = [GenInput(1, [1, 5, 6], SamplingParams(max_new_tokens=3, ignore_eos=True), "a4qv"),
              GenInput(2, [1, 7], SamplingParams(max_new_tokens=3, ignore_eos=True), "")]
    results = generate(eng, inputs)
    assert all(len(results[i]) == 3 for i in (1, 2))
    assert "a4qv" in eng.adapters.host


def _states(params: list[SamplingParams], vocab: int = 50) -> list[SamplerState]:
    return [SamplerState.create(p, [3, 4], vocab, torch.device("cpu")) for p in params]


def test_sampling_seed_is_reproducible_whatever_the_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    p = SamplingParams(do_sample=True, temperature=0.9, seed=1234)
    alone, _ = choose(logits[:1].clone(), _states([p]))
    mixed, _ = choose(logits.clone(), _states([p, SamplingParams(do_sample=True), SamplingParams(),
                                               SamplingParams(do_sample=True, seed=5)]))
    assert alone[0] == mixed[0]


def test_sampling_filters_and_penalty_match_transformers() -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    toks, _ = choose(logits.clone(), _states([SamplingParams(do_sample=True, top_k=1),
                                              SamplingParams(do_sample=True, top_p=1e-6),
                                              SamplingParams()]))
    assert toks.tolist() == logits.argmax(-1).tolist()
    pen = SamplingParams(repetition_penalty=1.7, logprobs=True)
    got, lp = choose(logits[:1].clone(), _states([pen]))
    want = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([[3, 4]]), logits[:1].clone())
    assert got.item() == want.argmax().item()
    assert lp is not None and abs(lp.item() - want.log_softmax(-1)[0, got.item()].item()) < 1e-5



def test_adapter_gone_while_waiting_answers_the_request(models: Path, tmp_path: Path) -> None:
    """Unloaded, or its files gone when it must be reloaded: the waiting request gets a 404-kind error."""
    eng = Engine(load_weights(models / "llama"), EngineLimits(max_batch_size=1, max_total_tokens=32, max_loras=1,
                                                              max_cpu_loras=1, max_lora_rank=8))
    eng.add_adapter_now("a4qv", models / "a4qv")
    eng.submit(GenInput(1, [1, 5, 6], SamplingParams(max_new_tokens=3, ignore_eos=True)))
    eng.submit(GenInput(2, [1, 5, 6], SamplingParams(max_new_tokens=3, ignore_eos=True), "a4qv"))
    eng.step()  # request 1 takes the only KV slot; 2 waits
    eng.adapters.remove("a4qv")
    errors = [o for _ in range(5) for o in eng.step() if o.error]
    assert [(o.req_id, o.error_kind) for o in errors] == [(2, "not_found")] and "unloaded" in errors[0].error

    moved = tmp_path / "moved"
    shutil.copytree(models / "a4qv", moved)
    eng.add_adapter_now("gone", moved)
    eng.add_adapter_now("a8all", models / "a8all")  # evicts "gone" from host memory (max_cpu_loras=1)
    shutil.rmtree(moved)
    eng.submit(GenInput(3, [1, 5, 6], SamplingParams(max_new_tokens=2, ignore_eos=True), "gone"))
    errors = []
    for _ in range(500):
        errors += [o for o in eng.step() if o.error]
        if errors or not eng.has_work:
            break
        time.sleep(0.01)  # the reload runs on the background thread
    assert [(o.req_id, o.error_kind) for o in errors] == [(3, "not_found")]
    assert "could not be reloaded" in errors[0].error


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["slots", "gathered"])
def test_engine_on_cuda_matches_cpu(models: Path, form: str) -> None:
    """The same mixed-adapter workload on CUDA (fp32) and on CPU gives the same greedy tokens."""
    inputs = [GenInput(i, p, SamplingParams(max_new_tokens=6, ignore_eos=True), ["", *ADAPTERS][i % 4])
              for i, p in enumerate(_prompts(8, seed=3))]
    outs = []
    for device in ("cpu", "cuda"):
        eng = Engine(load_weights(models / "llama", device), EngineLimits(max_batch_size=4, max_total_tokens=64,
                                                                          max_loras=3, max_lora_rank=8,
                                                                          lora_form=form))
        for name in ADAPTERS:
            eng.add_adapter_now(name, models / name)
        res = generate(eng, inputs)
        outs.append({k: [o.token for o in v] for k, v in res.items()})
    assert outs[0] == outs[1]


def test_seeded_sampling_with_penalty_is_reproducible_across_batch_mates(models: Path) -> None:
    eng = Engine(load_weights(models / "llama"), EngineLimits(max_batch_size=4, max_total_tokens=64))
    p = SamplingParams(max_new_tokens=8, do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
                       repetition_penalty=1.3, seed=11, ignore_eos=True)
    prompt = [1, 5, 6, 7]
    alone = generate(eng, [GenInput(1, prompt, p)])[1]
    mates = [GenInput(i, q, SamplingParams(max_new_tokens=3 + i, do_sample=True, repetition_penalty=1.1))
             for i, q in enumerate(_prompts(5, seed=4), start=10)]
    mixed = generate(eng, [*mates[:2], GenInput(1, prompt, p), *mates[2:]])[1]
    assert [o.token for o in mixed] == [o.token for o in alone] and len(alone) == 8


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 0.9), (5, 1.0), (10, 0.5), (0, 0.3)])
def test_top_k_top_p_filter_matches_transformers_warpers(top_k: int, top_p: float) -> None:
    """The batched filter keeps exactly the tokens transformers' TopK + TopP warpers keep."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from tandem.llm.sampling import _filter

    torch.manual_seed(top_k + int(top_p * 100))
    logits = torch.randn(6, 50) * 3
    got = _filter(logits.clone(), torch.full((6,), top_k), torch.full((6,), top_p))
    want = logits.clone()
    if top_k:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p < 1.0:
        want = TopPLogitsWarper(top_p)(None, want)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    torch.testing.assert_close(got[torch.isfinite(got)], logits[torch.isfinite(got)])


def test_one_token_prompt_joining_running_sequences_matches_alone(models: Path) -> None:
    """A one-token prompt is a prefill ([S, 1]) into slots after the running ones, not a decode of rows 0..S-1."""
    p = SamplingParams(max_new_tokens=5, ignore_eos=True)
    eng = Engine(load_weights(models / "llama"), EngineLimits(max_batch_size=2, max_total_tokens=64))
    alone = [o.token for o in generate(eng, [GenInput(2, [7], p)])[2]]
    eng.submit(GenInput(1, [1, 5, 6], p))
    eng.step()  # request 1 holds slot 0
    eng.submit(GenInput(2, [7], p))
    got: list[int] = []
    while eng.has_work:
        got += [o.token for o in eng.step() if o.req_id == 2]
    assert got == alone


def test_decode_step_reads_the_device_once(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One device -> host transfer per decode step (tokens and logprobs together); none per layer.

    On CUDA each of these is a sync; on CPU they are counted at the Python level.
    """
    eng = Engine(load_weights(models / "llama"), EngineLimits(max_batch_size=4, max_total_tokens=64, max_loras=3,
                                                              max_lora_rank=8))
    for name in ADAPTERS:
        eng.add_adapter_now(name, models / name)
    for i, prompt in enumerate(_prompts(4, seed=5)):
        params = SamplingParams(max_new_tokens=20, ignore_eos=True, do_sample=i % 2 == 1, seed=i if i == 3 else None,
                                top_k=10, repetition_penalty=1.2, logprobs=True)
        assert eng.submit(GenInput(i, prompt, params, ["", *ADAPTERS][i])) is None
    eng.step()  # prefill
    reads: list[str] = []
    for name in ("tolist", "item", "__int__", "__float__", "__bool__", "__index__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args: object, _original: object = original, _name: str = name,
                    **kwargs: object) -> object:
            reads.append(_name)
            return _original(self, *args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(torch.Tensor, name, counted)
    for _ in range(3):
        reads.clear()
        outs = eng.step()
        assert eng.last_phase == "decode" and len(outs) == 4
        assert reads == ["tolist"]
