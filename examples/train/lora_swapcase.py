"""LoRA fine-tuning of the built-in tiny-llm on a new task, swapping letter case ("aBc=" -> "AbC"), with tandem.train.

The base (tandem/default_repo/tiny-llm/base, a character-level Llama trained by scripts/train_tiny_llm.py) copies its
input; this trains a PEFT LoRA adapter (r=8, alpha=16 on all 7 projections, like the shipped ones) on generated
mixed-case letter strings of length 3-10, writes the adapter folder (adapter_config.json + adapter_model.safetensors)
and reports greedy exact-match accuracy on held-out inputs never used for training. Exit status 1 below 95%.

    .venv/bin/python examples/train/lora_swapcase.py --out runs/swapcase/adapter

Serve it next to the other adapters: put the folder under an entry's `llm.adapter_dirs` and hot-load it with
POST /v1/load_lora_adapter {"lora_name": "swapcase", "lora_path": "..."} (admin key), then ask model "swapcase".
"""

from __future__ import annotations

import argparse
import math
import random
import string
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from tandem.train import Trainer

BASE_DIR = Path(__file__).resolve().parents[2] / "tandem" / "default_repo" / "tiny-llm" / "base"
BASE_NAME = "tiny-llm-base"  # what adapter_config.json records: a hub-style name, never a local path
LETTERS = string.ascii_letters
MIN_LEN, MAX_LEN = 3, 10
IGNORE = -100
HELDOUT = 200
TARGET_ACCURACY = 0.95


@dataclass(frozen=True)
class Result:
    """What a run produced: the adapter folder, its held-out accuracy, the rows it was measured on, timings."""

    out: Path
    accuracy: float
    heldout: list[tuple[str, str]]  # (input, expected output); prompts are input + "="
    train_seconds: float
    steps: int


def swapcase_input(rng: random.Random) -> str:
    """A mixed-case letter string of length 3-10."""
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


def make_heldout(seed: int, count: int = HELDOUT) -> list[str]:
    """Distinct held-out inputs, drawn from their own generator so training never sees them."""
    rng = random.Random(f"swapcase-heldout-{seed}")
    seen: dict[str, None] = {}
    while len(seen) < count:
        seen.setdefault(swapcase_input(rng), None)
    return list(seen)


class SwapCaseDataset(torch.utils.data.Dataset[dict[str, list[int]]]):
    """A map-style dataset of generated examples: prompt ids ("<s>" + input + "=") and completion ids (output + EOS)."""

    def __init__(self, tok: PreTrainedTokenizerBase, size: int, seed: int, exclude: set[str]) -> None:
        rng = random.Random(f"swapcase-train-{seed}")
        self.inputs: list[str] = []
        while len(self.inputs) < size:
            text = swapcase_input(rng)
            if text not in exclude:
                self.inputs.append(text)
        self.tok = tok

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        text = self.inputs[index]
        prompt = self.tok(text + "=")["input_ids"]
        completion = self.tok(text.swapcase(), add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        return {"prompt": list(prompt), "completion": list(completion)}


class Collate:
    """Right-pads a batch; labels are -100 on prompt and padding tokens, so the loss covers the completion only."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, samples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(s["prompt"]) + len(s["completion"]) for s in samples)
        ids = torch.full((len(samples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
        for row, s in enumerate(samples):
            seq = s["prompt"] + s["completion"]
            ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, len(s["prompt"]) : len(seq)] = torch.tensor(s["completion"])
        # Right padding under causal attention: pads come after every real token, so no attention mask is needed.
        return {"input_ids": ids, "labels": labels}


def lora_config() -> LoraConfig:
    """The shipped adapters' configuration (scripts/train_tiny_llm.py): the server's bank is sized for it."""
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                      base_model_name_or_path=BASE_NAME)


def lr_at(step: int, steps: int, lr: float, warmup_frac: float = 0.05, min_frac: float = 0.05) -> float:
    """Linear warmup, then cosine decay to min_frac * lr."""
    warmup = max(1, int(warmup_frac * steps))
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def generate(model: Any, tok: PreTrainedTokenizerBase, inputs: Sequence[str], max_new_tokens: int = 16) -> list[str]:
    """Greedy completions (text after the prompt, special tokens removed) of `input=` prompts."""
    model.eval()
    tok.padding_side = "left"
    enc = tok([s + "=" for s in inputs], return_tensors="pt", padding=True)
    out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    return list(tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True))


def accuracy(model: Any, tok: PreTrainedTokenizerBase, inputs: Sequence[str]) -> float:
    """Greedy exact-match accuracy of swapping the case of `inputs`."""
    preds = generate(model, tok, inputs)
    return sum(p == s.swapcase() for p, s in zip(preds, inputs)) / max(1, len(inputs))


def save_adapter(model: Any, out: Path) -> None:
    """Write config + safetensors weights only (PEFT also writes a model card, which we drop)."""
    model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    readme = out / "README.md"
    if readme.exists():
        readme.unlink()


def train(out: Path, *, steps: int = 200, batch_size: int = 64, lr: float = 5e-3, seed: int = 0,
          base: Path = BASE_DIR, run_dir: Path | None = None, progress: bool = False) -> Result:
    """Train the swapcase adapter with tandem.train.Trainer, save it to `out` and measure held-out accuracy."""
    tok = AutoTokenizer.from_pretrained(base)
    heldout = make_heldout(seed)
    dataset = SwapCaseDataset(tok, steps * batch_size, seed, exclude=set(heldout))
    trainer = Trainer(precision="32", seed=seed, run_dir=run_dir, grad_clip=1.0, progress=progress,
                      log_every=max(1, steps // 10))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.name_or_path = BASE_NAME  # get_peft_model records it in adapter_config.json: no local path shipped
    peft_model = get_peft_model(model, lora_config())
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.98),
                                  weight_decay=0.0)
    train_model, optimizer = trainer.setup(peft_model, optimizer)
    # The examples are tiny in-memory token lists: worker processes would only cost start-up time here.
    loader = trainer.loader(dataset, batch_size=batch_size, drop_last=True, collate_fn=Collate(tok.pad_token_id),
                            num_workers=0, pin_memory=False, persistent_workers=False)
    train_model.train()
    start = time.perf_counter()
    step = 0
    for _ in trainer.epochs(1):
        for batch in loader:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, lr)
            optimizer.zero_grad()
            trainer.backward(train_model(**batch).loss)
            optimizer.step()
            step += 1
    seconds = time.perf_counter() - start
    save_adapter(peft_model, out)
    acc = accuracy(peft_model, tok, heldout)
    return Result(out=out, accuracy=acc, heldout=[(s, s.swapcase()) for s in heldout], train_seconds=seconds,
                  steps=step)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/swapcase/adapter"), help="adapter folder to write")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", type=Path, default=BASE_DIR, help="base model folder (default: the built-in tiny-llm)")
    p.add_argument("--run-dir", type=Path, default=None, help="tandem.train run folder (logs, PNG); none by default")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Train, save, evaluate; 0 when held-out accuracy reaches 95%, else 1."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result = train(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                   base=args.base, run_dir=args.run_dir, progress=sys.stderr.isatty())
    print(f"trained {result.steps} steps x {args.batch_size} in {result.train_seconds:.1f}s; adapter: {result.out}")
    print(f"held-out greedy exact match: {result.accuracy:.3f} on {len(result.heldout)} inputs "
          f"(need {TARGET_ACCURACY:.2f})")
    return 0 if result.accuracy >= TARGET_ACCURACY else 1


if __name__ == "__main__":
    sys.exit(main())
