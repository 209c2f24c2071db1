"""Train adapters, serve them together, end to end (issue 12, 7b): the swapcase LoRA example trains on the
built-in tiny-llm with tandem.train, its adapter loads in PEFT, and a running `tandem serve` hot-loads it through
/v1/load_lora_adapter (admin key) and answers held-out inputs through the OpenAI and TGI routes."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import httpx
import pytest
import torch

from tests.conftest import ROOT, TINY_LLM, Server, start_server

EXAMPLE = ROOT / "examples" / "train" / "lora_swapcase.py"
ADMIN_KEY = "swapcase-admin-key"
SERVED = 20  # held-out inputs asked through the server


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lora_swapcase_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return _example()


@pytest.fixture(scope="module")
def trained(example: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The example's default run (in process, 2 threads), its adapter written under <tmp>/adapters/swapcase."""
    out = tmp_path_factory.mktemp("swapcase") / "adapters" / "swapcase"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return example.train(out)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(trained: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`tandem serve` on the built-in tiny-llm base, with the trained adapter's folder as its allowed adapter dir
    (no start-up adapters: the swapcase one arrives at run time) and an admin key for the mutating routes."""
    repo = tmp_path_factory.mktemp("swapcase-repo")
    entry = repo / "tiny-llm"
    entry.mkdir()
    (entry / "tandem.yaml").write_text(
        "kind: llm\ncpu_workers: 1\ntimeout_s: 60\nllm:\n"
        f"  path: {TINY_LLM / 'base'}\n  adapter_dirs: [{trained.out.parent}]\n"
        "  max_batch_size: 32\n  max_total_tokens: 64\n  max_loras: 4\n  max_lora_rank: 16\n"
        "  default_max_new_tokens: 16\n")
    srv = start_server(repo, "--cpu-workers", "1", "--admin-key", ADMIN_KEY)
    yield srv
    srv.stop()


def test_example_reaches_target_accuracy(example: ModuleType, trained: Any) -> None:
    assert trained.accuracy >= example.TARGET_ACCURACY, trained
    files = sorted(p.name for p in trained.out.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    config = (trained.out / "adapter_config.json").read_text()
    assert '"base_model_name_or_path": "tiny-llm-base"' in config and str(ROOT) not in config
    heldout = {inp for inp, _ in trained.heldout}
    dataset = example.SwapCaseDataset  # the training inputs are regenerated from the same seed: none held out
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(example.BASE_DIR)
    assert not heldout & set(dataset(tok, trained.steps * 64, 0, exclude=heldout).inputs)


def test_adapter_loads_in_peft(example: ModuleType, trained: Any) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(example.BASE_DIR)
    base = AutoModelForCausalLM.from_pretrained(example.BASE_DIR, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(trained.out))
    inputs = [inp for inp, _ in trained.heldout[:8]]
    got = example.generate(model, tok, inputs)
    assert sum(g == inp.swapcase() for g, inp in zip(got, inputs)) >= 7, list(zip(inputs, got))
    with model.disable_adapter():  # the base alone does not swap: the adapter does
        assert not any(g == inp.swapcase() for g, inp in zip(example.generate(model, tok, inputs), inputs))


def _load(client: httpx.Client, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.post("/v1/load_lora_adapter", headers=headers,
                       json={"lora_name": "swapcase", "lora_path": "swapcase"})  # relative to the adapter dir


def test_hot_loaded_adapter_answers_through_the_server(trained: Any, server: Server) -> None:
    pairs = trained.heldout[:SERVED]
    with server.client(timeout=60) as c:
        assert _load(c, None).status_code == 401  # mutating route: the admin key is needed
        assert c.post("/v1/completions", json={"model": "swapcase", "prompt": "aB=", "max_tokens": 4}
                      ).status_code == 404  # not loaded yet
        r = _load(c, ADMIN_KEY)
        assert r.status_code == 200 and r.json()["status"] == "loaded", r.text
        assert "swapcase" in [m["id"] for m in c.get("/v1/models").json()["data"]]
        r = c.post("/v1/completions", json={"model": "swapcase", "prompt": [inp + "=" for inp, _ in pairs],
                                            "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        texts = [ch["text"] for ch in sorted(r.json()["choices"], key=lambda ch: ch["index"])]
        right = sum(t == want for t, (_, want) in zip(texts, pairs))
        assert right >= 0.95 * SERVED, list(zip(pairs, texts))
        for i, (inp, want) in enumerate(pairs[:3]):  # TGI route, adapter by adapter_id, next to the base
            body = {"inputs": inp + "=", "parameters": {"max_new_tokens": 12, "adapter_id": "swapcase"}}
            swapped = c.post("/generate", json=body).json()["generated_text"]
            copied = c.post("/generate", json={"inputs": inp + "=", "parameters": {"max_new_tokens": 12}}).json()
            assert swapped == texts[i]  # the same greedy answer on both routes
            assert copied["generated_text"] != want  # the base alone does not swap: the adapter does
