"""Build and train the tiny character-level Llama LM and its 4 LoRA adapters shipped in ``default_repo/tiny-llm``.

What it does (all on CPU, 2 threads, fully seeded):

1. Builds a character-level ``tokenizers`` tokenizer (printable ASCII 32..126, one token per character, plus
   ``<pad>``/``<s>``/``</s>``/``<unk>``), wrapped as a ``PreTrainedTokenizerFast`` with a chat template.
2. Writes ``heldout.jsonl``: 200 held-out examples per task (``copy``, ``reverse``, ``upper``, ``sort``,
   ``increment``). Their inputs are never used for training.
3. Trains a tiny ``LlamaForCausalLM`` (GQA: 4 query heads, 2 key/value heads) from scratch on the *copy* task
   (``hello=`` -> ``hello</s>``) over lowercase-letter and digit strings (plus 20% arbitrary printable-ASCII strings so
   every output token, e.g. the uppercase letters ``upper`` emits, has trained embedding/lm_head rows), and saves it
   to ``base/`` (fp32 safetensors).
4. Trains one PEFT LoRA adapter per task (``reverse``, ``upper``, ``sort``, ``increment``) on top of the frozen base
   and saves each to ``adapters/<task>/``.
5. Reloads everything from disk and reports greedy exact-match accuracy on the held-out set.

Prompt format: ``<input>=``; completion: ``<output></s>``. Loss is computed on completion tokens only.

Usage::

    .venv/bin/python scripts/train_tiny_llm.py --out tandem/default_repo/tiny-llm [--seed 0]

Runtime: about 8 minutes wall on 2 CPU cores (up to ~9.5 when the machine is shared); the final report prints
per-phase timings. Output is bit-for-bit reproducible for a given seed on the same machine/torch build.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

CausalLM = PreTrainedModel | PeftModel  # anything with .generate(); evaluation works on both

BASE_NAME = "tiny-llm-base"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
CHARS = [chr(c) for c in range(32, 127)]
MAX_LEN = 64
MIN_INPUT_LEN, MAX_INPUT_LEN = 3, 10
HELDOUT_PER_TASK = 200
IGNORE = -100
# Chat template: BOS + content of the last user message + "=" (the generation prompt). System/assistant ignored.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set users = messages | selectattr('role', 'equalto', 'user') | list -%}"
    "{%- if users %}{{ users[-1]['content'] }}{% endif -%}"
    "{%- if add_generation_prompt %}={% endif -%}"
)

LETTERS = string.ascii_lowercase
DIGITS = string.digits


def _increment(s: str) -> str:
    return "".join(str((int(c) + 1) % 10) for c in s)


TASK_FNS: dict[str, Callable[[str], str]] = {
    "copy": lambda s: s,
    "reverse": lambda s: s[::-1],
    "upper": str.upper,
    "sort": lambda s: "".join(sorted(s)),
    "increment": _increment,
}
# Alphabets each task draws its inputs from ("copy" uses both, half and half).
TASK_ALPHABETS: dict[str, tuple[str, ...]] = {
    "copy": (LETTERS, DIGITS),
    "reverse": (LETTERS,),
    "upper": (LETTERS,),
    "sort": (LETTERS,),
    "increment": (DIGITS,),
}
ADAPTER_TASKS = ["reverse", "upper", "sort", "increment"]
# Training steps per adapter (batch 128); reverse and sort are the hardest.
ADAPTER_STEPS = {"reverse": 400, "upper": 250, "sort": 700, "increment": 200}
# The base is trained on copy over lowercase letters (40%), digits (40%) and, so that every output token (notably the
# uppercase letters the `upper` adapter must emit; LoRA cannot retrain lm_head rows) gets a trained embedding and
# lm_head row, arbitrary printable ASCII without "=" (20%). Held-out copy rows are letters/digits only.
PRINTABLE_NO_EQ = "".join(c for c in CHARS if c != "=")
BASE_TRAIN_ALPHABETS = (LETTERS, DIGITS, LETTERS, DIGITS, PRINTABLE_NO_EQ)


@dataclass(frozen=True)
class TrainSpec:
    """Hyper-parameters of one training run (base or adapter)."""

    steps: int
    lr: float
    batch_size: int
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.05
    weight_decay: float = 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------------


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: specials first (ids 0..3), then printable ASCII 32..126 (ids 4..98)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=MAX_LEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
        model_input_names=["input_ids", "attention_mask"],
    )
    return tok


def check_tokenizer(tok: PreTrainedTokenizerFast) -> None:
    """Assert the properties callers rely on (round trip, BOS handling, chat template)."""
    text = "Hello, World! ~ {a b}  x=1;"
    ids = tok(text)["input_ids"]
    assert ids[0] == BOS_ID and ids[-1] != EOS_ID and len(ids) == len(text) + 1, ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.convert_tokens_to_ids(SPECIALS) == [PAD_ID, BOS_ID, EOS_ID, UNK_ID]
    msgs = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "abc"}]
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == "<s>abc=", rendered
    want = tok("abc=")["input_ids"]
    assert tok(rendered, add_special_tokens=False)["input_ids"] == want
    assert list(tok.apply_chat_template(msgs, add_generation_prompt=True)) == want
    assert encode_prompt("abc") == want


def encode_prompt(inp: str) -> list[int]:
    """Fast equivalent of ``tok(inp + "=")["input_ids"]`` (checked in ``check_tokenizer``)."""
    return [BOS_ID] + [4 + ord(c) - 32 for c in inp + "="]


def encode_chars(text: str) -> list[int]:
    return [4 + ord(c) - 32 for c in text]


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def sample_input(alphabets: Sequence[str], rng: random.Random) -> str:
    alphabet = rng.choice(alphabets)
    n = rng.randint(MIN_INPUT_LEN, MAX_INPUT_LEN)
    return "".join(rng.choice(alphabet) for _ in range(n))


def make_heldout(rng: random.Random) -> list[dict[str, str]]:
    """200 distinct inputs per task (copy: 100 letter + 100 digit strings); distinct across all tasks too."""
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for task in TASK_FNS:
        per_alphabet = HELDOUT_PER_TASK // len(TASK_ALPHABETS[task])
        for alphabet in TASK_ALPHABETS[task]:
            count = 0
            while count < per_alphabet:
                inp = sample_input((alphabet,), rng)
                if inp in seen:
                    continue
                seen.add(inp)
                rows.append({"task": task, "prompt": inp + "=", "target": TASK_FNS[task](inp)})
                count += 1
    return rows


def write_jsonl(path: Path, rows: Sequence[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_batch(tasks: Sequence[str], rng: random.Random, exclude: set[str], size: int) -> dict[str, torch.Tensor]:
    """Random training batch, right padded; labels only on completion tokens (output chars + EOS)."""
    seqs: list[list[int]] = []
    labels: list[list[int]] = []
    while len(seqs) < size:
        task = rng.choice(tasks)
        inp = sample_input(BASE_TRAIN_ALPHABETS if task == "copy" else TASK_ALPHABETS[task], rng)
        if inp in exclude:
            continue
        prompt = encode_prompt(inp)
        completion = encode_chars(TASK_FNS[task](inp)) + [EOS_ID]
        seqs.append(prompt + completion)
        labels.append([IGNORE] * len(prompt) + completion)
    width = max(len(s) for s in seqs)
    ids = torch.full((size, width), PAD_ID, dtype=torch.long)
    lab = torch.full((size, width), IGNORE, dtype=torch.long)
    for i, (s, lb) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(lb)] = torch.tensor(lb)
    # Right padding + causal attention: pads never influence real tokens, so no attention mask is needed.
    return {"input_ids": ids, "labels": lab}


# ---------------------------------------------------------------------------------------------------------------------
# Model / training
# ---------------------------------------------------------------------------------------------------------------------


def build_base_config(vocab_size: int, hidden: int, layers: int) -> LlamaConfig:
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_LEN,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        initializer_range=0.02,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        dtype="float32",
    )
    cfg._name_or_path = BASE_NAME
    return cfg


def lr_at(step: int, spec: TrainSpec) -> float:
    """Linear warmup then cosine decay to ``min_lr_frac * lr``."""
    warmup = max(1, int(spec.warmup_frac * spec.steps))
    if step < warmup:
        return spec.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, spec.steps - warmup)
    return spec.lr * (spec.min_lr_frac + (1 - spec.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    model: torch.nn.Module, tasks: Sequence[str], spec: TrainSpec, rng: random.Random, exclude: set[str], label: str
) -> float:
    """Train the model's trainable parameters with AdamW; returns wall seconds."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, betas=(0.9, 0.98), weight_decay=spec.weight_decay)
    model.train()
    start = time.perf_counter()
    running = 0.0
    for step in range(spec.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, spec)
        loss = model(**make_batch(tasks, rng, exclude, spec.batch_size)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running = 0.9 * running + 0.1 * loss.item() if step else loss.item()
        if (step + 1) % max(1, spec.steps // 10) == 0:
            print(f"  [{label}] step {step + 1}/{spec.steps} loss {running:.4f} ({time.perf_counter() - start:.0f}s)")
    model.eval()
    return time.perf_counter() - start


def lora_config() -> LoraConfig:
    return LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        bias="none",
        use_dora=False,
        use_rslora=False,
        task_type="CAUSAL_LM",
        base_model_name_or_path=BASE_NAME,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_batch(
    model: CausalLM, tok: PreTrainedTokenizerFast, prompts: Sequence[str], max_new_tokens: int = 16
) -> list[str]:
    """Greedy completions (text after the prompt, special tokens removed) for a batch of prompts."""
    tok.padding_side = "left"
    enc = tok(list(prompts), return_tensors="pt", padding=True)
    out = model.generate(  # type: ignore[operator]  # PeftModel forwards generate() dynamically
        **enc,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


@torch.no_grad()
def min_margins(model: torch.nn.Module, rows: Sequence[dict[str, str]]) -> list[float]:
    """Per row: smallest (target logit - best other logit) over the completion tokens, teacher forced."""
    model.eval()
    margins: list[float] = []
    for r in rows:
        prompt, completion = encode_prompt(r["prompt"][:-1]), encode_chars(r["target"]) + [EOS_ID]
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
        target = torch.tensor(completion)
        correct = logits.gather(1, target[:, None])[:, 0]
        others = logits.scatter(1, target[:, None], float("-inf")).max(dim=1).values
        margins.append(float((correct - others).min()))
    return margins


def evaluate(
    model: CausalLM, tok: PreTrainedTokenizerFast, rows: Sequence[dict[str, str]], batch_size: int = 256
) -> float:
    """Greedy exact-match accuracy of ``model`` on ``rows`` ({"prompt", "target"} dicts)."""
    model.eval()
    correct = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        preds = generate_batch(model, tok, [r["prompt"] for r in chunk])
        correct += sum(p == r["target"] for p, r in zip(preds, chunk))
    return correct / max(1, len(rows))


# ---------------------------------------------------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------------------------------------------------


def save_base(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, base_dir: Path) -> None:
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False, max_new_tokens=16
    )
    model.save_pretrained(base_dir, safe_serialization=True)
    tok.save_pretrained(base_dir, save_jinja_files=False)
    cfg_path = base_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["_name_or_path"] = BASE_NAME
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def train_base(tok: PreTrainedTokenizerFast, args: argparse.Namespace, exclude: set[str], base_dir: Path) -> float:
    torch.manual_seed(args.seed)
    cfg = build_base_config(len(tok), args.hidden, args.layers)
    model = LlamaForCausalLM(cfg).float()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"base: {n_params:,} params ({n_params * 4 / 1e6:.2f} MB fp32)")
    spec = TrainSpec(steps=args.base_steps, lr=args.base_lr, batch_size=args.batch_size, weight_decay=0.01)
    secs = train(model, ["copy"], spec, random.Random(args.seed * 1000 + 1), exclude, "base/copy")
    save_base(model, tok, base_dir)
    return secs


def train_adapter(
    task: str, idx: int, args: argparse.Namespace, exclude: set[str], base_dir: Path, out_dir: Path
) -> float:
    torch.manual_seed(args.seed * 1000 + 10 + idx)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base.name_or_path = BASE_NAME  # get_peft_model copies this into adapter_config.json (no local paths shipped)
    model = get_peft_model(base, lora_config())
    steps = args.adapter_steps or ADAPTER_STEPS[task]
    spec = TrainSpec(steps=steps, lr=args.adapter_lr, batch_size=args.batch_size)
    secs = train(model, [task], spec, random.Random(args.seed * 1000 + 10 + idx), exclude, f"lora/{task}")
    model.save_pretrained(str(out_dir), safe_serialization=True, save_embedding_layers=False)
    readme = out_dir / "README.md"  # PEFT writes a model card; we only ship config + weights.
    if readme.exists():
        readme.unlink()
    return secs


def report_model(
    model: CausalLM, tok: PreTrainedTokenizerFast, name: str, rows: Sequence[dict[str, str]], demo: Sequence[str]
) -> tuple[float, float]:
    """Print and return (held-out accuracy, smallest teacher-forced logit margin) of one model on its task."""
    acc, margin = evaluate(model, tok, rows), min(min_margins(model, rows))
    print(f"  {name:<10} acc {acc:.3f}  min-margin {margin:5.2f}  demo {generate_batch(model, tok, demo)}")
    return acc, margin


def final_report(out: Path, rows: Sequence[dict[str, str]], tasks: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Reload base + adapters from disk and evaluate each on its own task (base on copy)."""
    tok = AutoTokenizer.from_pretrained(out / "base")
    check_tokenizer(tok)
    base = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out / "adapters" / tasks[0], adapter_name=tasks[0])
    for task in tasks[1:]:
        model.load_adapter(str(out / "adapters" / task), adapter_name=task)
    by_task = {t: [r for r in rows if r["task"] == t] for t in TASK_FNS}
    demo = ["abc=", "hello=", "zebra=", "129="]
    results: dict[str, tuple[float, float]] = {}
    with model.disable_adapter():
        results["copy"] = report_model(model, tok, "base/copy", by_task["copy"], demo)
    for task in tasks:
        model.set_adapter(task)
        results[task] = report_model(model, tok, task, by_task[task], demo)
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("tandem/default_repo/tiny-llm"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--base-steps", type=int, default=400)
    p.add_argument("--base-lr", type=float, default=3e-3)
    p.add_argument("--adapter-steps", type=int, default=0, help="steps for every adapter (default: per task)")
    p.add_argument("--adapter-lr", type=float, default=5e-3)
    p.add_argument("--tasks", nargs="*", default=ADAPTER_TASKS, help="adapters to train (default: all)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    out: Path = args.out
    for sub in ("base", "adapters"):
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / "adapters").mkdir(parents=True)
    tok = build_tokenizer()
    check_tokenizer(tok)
    rows = make_heldout(random.Random(args.seed))
    write_jsonl(out / "heldout.jsonl", rows)
    exclude = {r["prompt"][:-1] for r in rows}
    timings = {"base": train_base(tok, args, exclude, out / "base")}
    for task in args.tasks:
        idx = ADAPTER_TASKS.index(task)
        timings[task] = train_adapter(task, idx, args, exclude, out / "base", out / "adapters" / task)
    print("final evaluation (reloaded from disk, greedy, exact match):")
    t_eval = time.perf_counter()
    results = final_report(out, rows, args.tasks)
    timings["eval"] = time.perf_counter() - t_eval
    print("report:")
    for name, (acc, margin) in results.items():
        print(f"  accuracy {name:<10} {acc:.3f} (min logit margin {margin:.2f})")
    for name, secs in timings.items():
        print(f"  time     {name:<10} {secs:.0f}s")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"  total wall {time.perf_counter() - t0:.0f}s, shipped size {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
