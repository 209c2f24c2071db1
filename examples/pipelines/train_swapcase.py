"""Train the swap-case LoRA adapter of tiny-llm on a data folder (swapcase.make_data's): a `tandem train` script.

    tandem train train_swapcase.py --data DATA --out ADAPTER --steps 200

The model, LoRA configuration, collation, learning-rate schedule and adapter format are those of
examples/train/lora_swapcase.py (r=8 on all 7 projections, the server's bank is sized for it); only the data comes
from the folder instead of the generator, so the pipeline's held-out set is the one the evaluation step reads.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from swapcase import example, read_inputs

from tandem.train import Trainer


def file_dataset(tok: object, inputs: list[str]) -> torch.utils.data.Dataset[dict[str, list[int]]]:
    """The example's SwapCaseDataset (its prompt/completion encoding), with its inputs from a file instead of
    its generator."""
    cls = example().SwapCaseDataset
    dataset = cls.__new__(cls)   # skip __init__: it would generate inputs
    dataset.inputs, dataset.tok = inputs, tok
    return dataset  # type: ignore[no-any-return]


def train(data: Path, out: Path, *, steps: int, batch_size: int, lr: float, seed: int) -> float:
    """Train `steps` steps on data/train.txt and write the adapter folder to `out`; returns the seconds taken."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ex = example()
    tok = AutoTokenizer.from_pretrained(ex.BASE_DIR)
    rows = read_inputs(data / "train.txt")
    if len(rows) < steps * batch_size:
        raise SystemExit(f"{data / 'train.txt'} has {len(rows)} rows; {steps} steps x {batch_size} need more")
    trainer = Trainer(precision="32", seed=seed, grad_clip=1.0, progress=False, log_every=max(1, steps // 10))
    model = AutoModelForCausalLM.from_pretrained(ex.BASE_DIR, dtype=torch.float32)
    model.name_or_path = ex.BASE_NAME   # what adapter_config.json records: never a local path
    peft_model = get_peft_model(model, ex.lora_config())
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr,
                                  betas=(0.9, 0.98), weight_decay=0.0)
    train_model, optimizer = trainer.setup(peft_model, optimizer)
    loader = trainer.loader(file_dataset(tok, rows[: steps * batch_size]), batch_size=batch_size, drop_last=True,
                            collate_fn=ex.Collate(tok.pad_token_id), num_workers=0, pin_memory=False,
                            persistent_workers=False)
    train_model.train()
    start, step = time.perf_counter(), 0
    for _ in trainer.epochs(1):
        for batch in loader:
            for group in optimizer.param_groups:
                group["lr"] = ex.lr_at(step, steps, lr)
            optimizer.zero_grad()
            trainer.backward(train_model(**batch).loss)
            optimizer.step()
            step += 1
    seconds = time.perf_counter() - start
    if trainer.is_main:
        ex.save_adapter(peft_model, out)
    trainer.finish()
    return seconds


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="folder with train.txt")
    ap.add_argument("--out", type=Path, required=True, help="adapter folder to write")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    seconds = train(args.data, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    print(f"trained {args.steps} steps x {args.batch_size} in {seconds:.1f}s; adapter: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
