"""PEFT parity of `rank_pattern` / `alpha_pattern` / rsLoRA: which modules a key matches, and the logits.

PEFT matches each pattern key as a regex against the END of the full module name at a dot
boundary (`peft.utils.other.get_pattern_key`: `re.match(rf"(.*\\.)?({key})$", name)`, first key
in config order wins). A 12-layer tiny Llama makes '1.self_attn.q_proj' a key a plain suffix
test gets wrong (it also matches layer 11: 'model.layers.1|1.self_attn.q_proj').
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.other import get_pattern_key
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from tandem.llm.lora import AdapterError, LoraBank, _pattern_value, load_adapter
from tandem.llm.model import LINEAR_MODULES, KVCache, forward, load_weights
from tests.parity import assert_close_to_reference  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:The following alpha_pattern keys did not match")

N_LAYERS = 12
ALL = list(LINEAR_MODULES)

# name -> LoraConfig arguments; every one is rsLoRA (alpha / sqrt(r)) with per-module ranks and alphas
ADAPTERS: dict[str, dict[str, object]] = {
    # '1.self_attn.q_proj' is layer 1 only (suffix matching: layers 1 and 11); the regex covers the MLP of
    # layers 10 and 11; 'proj' matches nothing in PEFT (suffix matching: every module)
    "layer1": dict(r=4, lora_alpha=8, target_modules=ALL,
                   rank_pattern={"layers.1.self_attn.q_proj": 8, r"layers\.1[01]\.mlp\..*": 2},
                   alpha_pattern={"proj": 1000.0, "1.self_attn.q_proj": 40.0, r"layers\.1[01]\.mlp\..*": 3.0}),
    # several keys match v_proj of layer 0: the FIRST in config order wins ('v_proj'), not the last or longest
    "first_wins": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                       rank_pattern={r"layers\.[0-3]\.self_attn\.(q|v)_proj": 6},
                       alpha_pattern={"v_proj": 20.0, "layers.0.self_attn.v_proj": 0.5, "mlp.down_proj": 7.0,
                                      "1.mlp.down_proj": 0.25}),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("llm-peft")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=N_LAYERS,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 bos_token_id=1, eos_token_id=2)).save_pretrained(root / "llama")
    for name, kwargs in ADAPTERS.items():
        base = AutoModelForCausalLM.from_pretrained(root / "llama")
        peft = get_peft_model(base, LoraConfig(use_rslora=True, init_lora_weights=False, **kwargs))  # type: ignore[arg-type]
        peft.save_pretrained(str(root / name))
    return root


def _module_names() -> list[str]:
    kind = {m: "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp" for m in LINEAR_MODULES}
    return [f"model.layers.{i}.{kind[m]}.{m}" for i in range(N_LAYERS) for m in LINEAR_MODULES]


KEYS = ["q_proj", "proj", "_proj", "self_attn.q_proj", "layers.1.self_attn.q_proj", "1.self_attn.q_proj",
        r"layers\.[0-3]\.self_attn\.(q|v)_proj", r"layers\.1[01]\.mlp\..*", r"mlp\..*_proj", "layers.1", ".*",
        "model.layers.11.mlp.down_proj", "layers.1.mlp.down_proj", "1.mlp.down_proj", "o_proj|up_proj"]


@pytest.mark.parametrize("key", KEYS)
def test_pattern_key_matches_exactly_what_peft_matches(key: str) -> None:
    for module in _module_names():
        peft_hit = get_pattern_key([key], module) == key
        assert (_pattern_value({"rank_pattern": {key: 1}}, "rank_pattern", module, "t") == 1) == peft_hit, module


def test_pattern_key_first_match_wins_like_peft() -> None:
    patterns = {k: i for i, k in enumerate(KEYS)}
    for module in _module_names():
        want = patterns.get(get_pattern_key(list(patterns), module))
        assert _pattern_value({"alpha_pattern": patterns}, "alpha_pattern", module, "t") == want, module


def test_suffix_matching_would_differ() -> None:
    """The example keys really separate the two rules on this model (so the parity tests below mean something)."""
    key, names = "1.self_attn.q_proj", _module_names()
    assert [n for n in names if n.endswith(key)] == ["model.layers.1.self_attn.q_proj",
                                                     "model.layers.11.self_attn.q_proj"]
    assert [n for n in names if get_pattern_key([key], n) == key] == ["model.layers.1.self_attn.q_proj"]
    assert all(n.endswith("proj") for n in names) and not any(get_pattern_key(["proj"], n) == "proj" for n in names)


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_scaling_and_rank_of_every_module_equal_peft(models: Path, name: str) -> None:
    w = load_weights(models / "llama")
    ours = load_adapter(name, models / name, w.spec, 8)
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models / "llama"), str(models / name))
    peft_modules = {n.removeprefix("base_model.model."): m for n, m in ref.named_modules()
                    if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling}
    assert len(peft_modules) == len(ours.factors)
    seen_scales = set()
    for (layer, module), (at, bt) in ours.factors.items():
        kind = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        pm = peft_modules[f"model.layers.{layer}.{kind}.{module}"]
        assert at.shape[1] == pm.r["default"]
        b = pm.lora_B["default"].weight.detach()  # [out, r]
        torch.testing.assert_close(bt, b.t() * pm.scaling["default"], atol=1e-7, rtol=1e-6)
        seen_scales.add(round(pm.scaling["default"], 6))
    assert len(seen_scales) >= 3  # the patterns are in effect: several distinct per-module scalings


@pytest.mark.parametrize("form", ["gathered", "slots"])
def test_mixed_batch_logits_match_peft(models: Path, form: str) -> None:
    """Base and both pattern adapters in ONE batch: each row equals PEFT with its adapter, prefill and decode."""
    from tandem.llm.lora import SlotCopies

    w = load_weights(models / "llama")
    names = list(ADAPTERS)
    bank = LoraBank(w.spec, len(names), 8, "cpu", torch.float32, form=form)
    for i, name in enumerate(names):
        bank.write(i + 1, load_adapter(name, models / name, w.spec, 8))
    which = [0, 1, 2, 1, 2]
    g = torch.Generator().manual_seed(7)
    prompts = [[1] + torch.randint(3, 97, (n,), generator=g).tolist() for n in (5, 9, 3, 11, 7)]
    S, L = len(prompts), max(map(len, prompts))
    cache = KVCache.allocate(w.spec, S, 64, "cpu", torch.float32)
    rows = None
    if form == "slots":
        rows = SlotCopies(bank, S)
        for row, k in enumerate(which):
            rows.assign(row, k)
    hook = bank.hook(which, rows, 0)
    toks = torch.tensor([p + [0] * (L - len(p)) for p in prompts])
    lens = torch.tensor([len(p) for p in prompts])
    logits = forward(w, toks, cache, torch.arange(S), torch.zeros(S, dtype=torch.long), lens, lens - 1, hook)
    refs: dict[int, torch.nn.Module] = {0: AutoModelForCausalLM.from_pretrained(models / "llama").eval()}
    for i, name in enumerate(names):
        refs[i + 1] = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models / "llama"),
                                                str(models / name)).eval()
    seqs = [list(p) for p in prompts]
    for _ in range(3):
        with torch.no_grad():
            want = torch.stack([refs[k](torch.tensor([s])).logits[0, -1] for s, k in zip(seqs, which)])
        assert_close_to_reference(logits, want, "float32", what="logits vs PEFT")
        nxt = logits.argmax(-1)
        for s, t in zip(seqs, nxt.tolist()):
            s.append(t)
        logits = forward(w, nxt[:, None], cache, torch.arange(S), lens, lens + 1, torch.zeros(S, dtype=torch.long),
                         hook, n_ctx=int(lens.max()) + 1)
        lens = lens + 1
    # the adapters change the outputs, and differently from each other
    base_row, a1_row = logits[0], logits[1]
    assert not torch.allclose(base_row, a1_row, atol=1e-3)


def _edited_copy(models: Path, tmp_path: Path, name: str, **changes: object) -> Path:
    dst = tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(models / name, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_rank_pattern_disagreeing_with_weights_or_bad_regex_is_refused(models: Path, tmp_path: Path) -> None:
    spec = load_weights(models / "llama").spec
    # the suffix reading of this key would give layer 11's q_proj rank 8 too; its weights have rank 4
    wrong = _edited_copy(models, tmp_path, "layer1",
                         rank_pattern={"1.self_attn.q_proj": 8, r"layers\.1[01]\.mlp\..*": 2})
    load_adapter("ok", wrong, spec, 8)  # PEFT's rule: '1.self_attn.q_proj' is layer 1 only
    wrong = _edited_copy(models, tmp_path, "first_wins", rank_pattern={r"layers\.[0-4]\.self_attn\.(q|v)_proj": 6})
    with pytest.raises(AdapterError, match=r"model\.layers\.4\.self_attn\.q_proj has rank 2 .* rank 6"):
        load_adapter("w", wrong, spec, 8)
    bad = _edited_copy(models, tmp_path, "first_wins", alpha_pattern={"q_proj(": 2.0})
    with pytest.raises(AdapterError, match="not a valid regex"):
        load_adapter("b", bad, spec, 8)
