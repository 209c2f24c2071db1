"""Function steps of the `lora` pipeline (lora.py): the swap-case task's data, and the adapter's evaluation.

    make_data         train.txt and heldout.txt: mixed-case letter strings of length 3-10, one per line, disjoint
    evaluate_adapter  greedy exact match of tiny-llm + the adapter on heldout.txt (PEFT, in process), and of the
                      base alone (which copies its input, so it should score about 0)

    serving_repo      a model repository serving tiny-llm that the pipeline can deploy into (not a step)

The task, tokenizer and generation come from examples/train/lora_swapcase.py; this module imports nothing heavy
at import time, so the runner's `python -m tandem.pipeline.call` starts quickly.
"""

from __future__ import annotations

import importlib.util
import random
import string
import sys
from pathlib import Path
from types import ModuleType

from tandem.pipeline.evaluate import write_metrics

EXAMPLE = Path(__file__).resolve().parents[1] / "train" / "lora_swapcase.py"
MIN_LEN, MAX_LEN = 3, 10   # as lora_swapcase.py


def example() -> ModuleType:
    """examples/train/lora_swapcase.py as a module (torch, transformers and peft load with it)."""
    name = "lora_swapcase_example"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # its dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def serving_repo(root: Path | str) -> tuple[Path, Path]:
    """(repository, publish folder): tiny-llm with two shipped adapters, whose runtime loads may read `publish`.

        tandem serve ROOT/repo --admin-key KEY    # then: tandem pipeline run lora.py --param adapter_dir=ROOT/published

    A server loads adapters at run time only from its entry's llm.adapter_dirs and `tandem serve --adapter-dir`
    folders, so the pipeline publishes the trained adapter into such a folder first.
    """
    from tandem.serving.repository import default_repository

    root = Path(root)
    tiny, publish, entry = default_repository() / "tiny-llm", root / "published", root / "repo" / "tiny-llm"
    publish.mkdir(parents=True, exist_ok=True)
    entry.mkdir(parents=True, exist_ok=True)
    adapters = tiny / "adapters"
    (entry / "tandem.yaml").write_text(
        "kind: llm\ncpu_workers: 1\ntimeout_s: 60\nllm:\n"
        f"  path: {tiny / 'base'}\n  adapters: {{reverse: {adapters / 'reverse'}, upper: {adapters / 'upper'}}}\n"
        f"  adapter_dirs: [{publish}]\n"
        "  max_batch_size: 32\n  max_total_tokens: 64\n  max_loras: 4\n  max_lora_rank: 16\n"
        "  default_max_new_tokens: 16\n")
    return root / "repo", publish


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_letters) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


def make_data(out: Path, seed: int = 0, train: int = 12800, heldout: int = 200) -> dict[str, str]:
    """Write out/train.txt (`train` inputs) and out/heldout.txt (`heldout` distinct inputs never trained on)."""
    rng = random.Random(f"swapcase-data-{seed}")
    held: dict[str, None] = {}
    while len(held) < heldout:
        held.setdefault(_word(rng), None)
    rows: list[str] = []
    while len(rows) < train:
        word = _word(rng)
        if word not in held:
            rows.append(word)
    out.mkdir(parents=True)
    (out / "train.txt").write_text("\n".join(rows) + "\n")
    (out / "heldout.txt").write_text("\n".join(held) + "\n")
    return {"train_rows": str(len(rows)), "heldout_rows": str(len(held))}


def read_inputs(path: Path) -> list[str]:
    """The inputs of a data file, one per line."""
    return [line for line in path.read_text().splitlines() if line]


def evaluate_adapter(adapter: Path, data: Path, metrics_file: Path, threads: int = 1) -> dict[str, float]:
    """Held-out greedy exact-match accuracy of base + `adapter`, and of the base alone."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    ex = example()
    inputs = read_inputs(data / "heldout.txt")
    tok = AutoTokenizer.from_pretrained(ex.BASE_DIR)
    base = AutoModelForCausalLM.from_pretrained(ex.BASE_DIR, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter))
    accuracy = ex.accuracy(model, tok, inputs)
    with model.disable_adapter():
        base_accuracy = ex.accuracy(model, tok, inputs)
    return write_metrics(metrics_file, {"accuracy": accuracy, "base_accuracy": base_accuracy,
                                        "heldout": len(inputs)})
