"""Multi-LoRA benchmark (issue 3): Tandem's engine vs transformers `generate` and PEFT mixed batches.

One run, one machine, one model: a random Llama with hidden 512, 8 layers, intermediate 1536 (about
27M parameters; the tiny-llm character vocabulary, so the HTTP part can decode) and 32 random PEFT
adapters (rank 8 on all seven projections, the shipped adapters' layout; part (a) also measures the
PEFT-default rank 8 on q_proj/v_proj).

  (a) decode-step time, batch 32, context 128: base only, and 1 / 8 / 32 distinct adapters, for each
      LoRA form (slots: per-sequence copies made at join; gathered: weights gathered every step;
      grouped: slot-sorted rows through F.grouped_mm) and two adapter layouts
  (b) end-to-end tokens/s, 64 requests, output lengths 16..128, batch 32:
        tandem          continuous batching, adapters mixed (request i uses adapter i % 33, 0 = base)
        hf_generate     transformers `generate`, static batches of 32, base model only (no LoRA at all)
        peft_mixed      PEFT `generate(adapter_names=...)`, static batches of 32, same adapters as tandem
      Useful tokens = what each request asked for; static batches run to their longest request.
  (c) through `tandem serve` (TGI /generate_stream): time to first token and time per output token,
      concurrency 1 and 16, random adapters
  (d) adapter cold-load: from disk into host memory (validate + transpose), and HTTP POST /v1/load_lora_adapter

    python benchmarks/lora.py --markdown bench-out/lora.md --json bench-out/lora.json
    python benchmarks/lora.py --quick        # smaller run to check the script
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tandem.llm.engine import Engine, EngineLimits, GenInput, generate  # noqa: E402
from tandem.llm.lora import load_adapter  # noqa: E402
from tandem.llm.model import LINEAR_MODULES, KVCache, forward, load_weights  # noqa: E402
from tandem.llm.params import SamplingParams  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import free_port, spawn, stop, tail  # noqa: E402  (the serving benchmark's process helpers)

TOKENIZER = ROOT / "tandem" / "default_repo" / "tiny-llm" / "base"
N_ADAPTERS = 32
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DTYPE = torch.float32  # --dtype: every system in (a) and (b) computes in it


# -- model and adapters ----------------------------------------------------------------------------
def build_model(root: Path, hidden: int, layers: int, inter: int) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=None)
    model = LlamaForCausalLM(cfg)
    path = root / "base"
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def write_adapter(path: Path, spec: Any, rank: int, modules: tuple[str, ...], seed: int) -> Path:
    """A PEFT-format LoRA folder with random A and B (B non-zero, so the adapter changes outputs)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(spec.n_layers):
        for m in modules:
            d_in, d_out = spec.module_dims(m)
            kind = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{kind}.{m}"
            tensors[key + ".lora_A.weight"] = torch.randn(rank, d_in, generator=g) / d_in ** 0.5
            tensors[key + ".lora_B.weight"] = torch.randn(d_out, rank, generator=g) * 0.02
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": list(modules), "bias": "none", "base_model_name_or_path": "bench-base",
        "fan_in_fan_out": False, "use_dora": False, "use_rslora": False}))
    return path


# -- (a) decode step -------------------------------------------------------------------------------
def decode_step(model: Path, adapters: list[Path], rank: int, reps: int, form: str) -> dict[str, float]:
    w = load_weights(model, "cpu", DTYPE)
    eng = Engine(w, EngineLimits(max_batch_size=32, max_total_tokens=256, max_loras=N_ADAPTERS,
                                 max_lora_rank=rank, lora_form=form))
    for i, p in enumerate(adapters):
        eng.bank.write(i + 1, load_adapter(p.name, p, w.spec, rank))
    S, ctx = 32, 128
    cache = KVCache.allocate(w.spec, S, 256, "cpu", DTYPE)
    toks = torch.randint(3, w.spec.vocab_size, (S, 1))
    starts = torch.full((S,), ctx)
    cases = {"base": [0] * S, "1 adapter": [1] * S, "8 adapters": [1 + i % 8 for i in range(S)],
             "32 adapters": [1 + i for i in range(S)]}

    def run(idx: list[int]) -> None:
        with torch.inference_mode():
            forward(w, toks, cache, torch.arange(S), starts, starts + 1, torch.zeros(S, dtype=torch.long),
                    eng.bank.hook(idx, eng.rows, 0))

    def place(idx: list[int]) -> None:  # form "slots": sequences joined with these adapters
        for row, slot in enumerate(idx):
            if eng.rows is not None:
                eng.rows.assign(row, slot)

    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(reps):  # interleaved, so drift in machine speed hits every case alike
        for k, idx in cases.items():
            place(idx)
            run(idx)
            t0 = time.perf_counter()
            for _ in range(5):
                run(idx)
            times[k].append((time.perf_counter() - t0) / 5 * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


# -- (b) end-to-end tokens/s -----------------------------------------------------------------------
def workload(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int, int]]:
    """(prompt ids, max_new_tokens, adapter index 0..32) per request."""
    rng = random.Random(seed)
    return [([1] + [rng.randrange(3, vocab) for _ in range(rng.randint(8, 32))], rng.randint(16, 128),
             i % (N_ADAPTERS + 1)) for i in range(n)]


def run_tandem(model: Path, adapters: list[Path], rank: int, reqs: list[Any], form: str) -> tuple[float, int]:
    eng = Engine(load_weights(model, "cpu", DTYPE), EngineLimits(
        max_batch_size=32, max_total_tokens=256, max_loras=N_ADAPTERS, max_lora_rank=rank, lora_form=form))
    for p in adapters:
        eng.add_adapter_now(p.name, p)
    inputs = [GenInput(i, prompt, SamplingParams(max_new_tokens=n, ignore_eos=True),
                       adapters[a - 1].name if a else "") for i, (prompt, n, a) in enumerate(reqs)]
    generate(eng, inputs[:2])  # warm-up
    t0 = time.perf_counter()
    out = generate(eng, inputs)
    wall = time.perf_counter() - t0
    return wall, sum(len(v) for v in out.values())


def _static_batches(reqs: list[Any], size: int) -> list[list[Any]]:
    return [reqs[i:i + size] for i in range(0, len(reqs), size)]


def run_hf(model_obj: Any, reqs: list[Any], adapter_names: Callable[[list[Any]], list[str]] | None) -> float:
    t0 = time.perf_counter()
    for batch in _static_batches(reqs, 32):
        L = max(len(p) for p, _, _ in batch)
        ids = torch.tensor([[0] * (L - len(p)) + p for p, _, _ in batch])  # left padding
        mask = (torch.arange(L)[None, :] >= torch.tensor([L - len(p) for p, _, _ in batch])[:, None]).long()
        kw: dict[str, Any] = {"adapter_names": adapter_names(batch)} if adapter_names else {}
        with torch.inference_mode():
            model_obj.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(n for _, n, _ in batch),
                               min_new_tokens=max(n for _, n, _ in batch), do_sample=False, pad_token_id=0,
                               eos_token_id=None, **kw)
    return time.perf_counter() - t0


def end_to_end(model: Path, adapters: list[Path], rank: int, n_requests: int, form: str
               ) -> dict[str, dict[str, float]]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = load_weights(model).spec
    reqs = workload(n_requests, spec.vocab_size)
    useful = sum(n for _, n, _ in reqs)
    res: dict[str, dict[str, float]] = {}
    wall, produced = run_tandem(model, adapters, rank, reqs, form)
    assert produced == useful, (produced, useful)
    res["tandem"] = {"wall_s": wall, "tokens": useful, "tok_s": useful / wall}
    base = AutoModelForCausalLM.from_pretrained(str(model), dtype=DTYPE).eval()
    run_hf(base, reqs[:2], None)
    wall = run_hf(base, reqs, None)
    res["hf_generate"] = {"wall_s": wall, "tokens": useful, "tok_s": useful / wall}
    peft = PeftModel.from_pretrained(base, str(adapters[0]), adapter_name=adapters[0].name).eval()
    for p in adapters[1:]:
        peft.load_adapter(str(p), adapter_name=p.name)

    def names(batch: list[Any]) -> list[str]:
        return [adapters[a - 1].name if a else "__base__" for _, _, a in batch]

    run_hf(peft, reqs[:2], names)
    wall = run_hf(peft, reqs, names)
    res["peft_mixed"] = {"wall_s": wall, "tokens": useful, "tok_s": useful / wall}
    return res


# -- (c) through the HTTP server -------------------------------------------------------------------
def start_server(model: Path, adapters: list[Path], rank: int, form: str) -> tuple[subprocess.Popen[bytes], str]:
    """`tandem serve` on a one-entry repository (kind: llm) with every adapter in a device slot."""
    port = free_port()
    entry = model.parent / "repo" / "bench-llm"
    entry.mkdir(parents=True, exist_ok=True)
    (entry / "tandem.yaml").write_text(json.dumps({"kind": "llm", "llm": {
        "path": str(model), "adapters": {p.name: str(p) for p in adapters}, "adapter_dirs": [str(adapters[0].parent)],
        "max_loras": N_ADAPTERS + 1, "max_lora_rank": rank, "max_batch_size": 32, "max_total_tokens": 256,
        "lora_form": form}}))  # JSON is YAML
    log = model.parent / "server.log"
    proc = spawn([sys.executable, "-m", "tandem.cli", "serve", str(entry.parent), "--port", str(port)], log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    stop(proc)
    raise RuntimeError("server did not start:\n" + tail(log))


async def _one_stream(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    stamps = []
    async with client.stream("POST", "/generate_stream", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return stamps[0] - t0, gaps


async def _http_level(url: str, adapters: list[Path], concurrency: int, n: int, new_tokens: int
                      ) -> dict[str, float]:
    rng = random.Random(concurrency)
    bodies = [{"inputs": "".join(rng.choice("abcdefghij") for _ in range(16)) + "=",
               "parameters": {"max_new_tokens": new_tokens,
                              "adapter_id": rng.choice(adapters).name}} for _ in range(n)]
    ttfts: list[float] = []
    gaps: list[float] = []
    queue = list(bodies)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def worker() -> None:
            while queue:
                ttft, g = await _one_stream(client, queue.pop())
                ttfts.append(ttft)
                gaps.extend(g)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    q = statistics.quantiles
    return {"ttft_p50_ms": statistics.median(ttfts) * 1000, "ttft_p90_ms": q(ttfts, n=10)[-1] * 1000,
            "tpot_p50_ms": statistics.median(gaps) * 1000, "tpot_p90_ms": q(gaps, n=10)[-1] * 1000,
            "tok_s": len(gaps + ttfts) / wall}


def http_part(model: Path, adapters: list[Path], rank: int, n: int, new_tokens: int, form: str) -> dict[str, Any]:
    proc, url = start_server(model, adapters, rank, form)
    try:
        asyncio.run(_http_level(url, adapters, 4, 8, 8))  # warm-up
        out: dict[str, Any] = {f"c={c}": asyncio.run(_http_level(url, adapters, c, n, new_tokens)) for c in (1, 16)}
        extra = write_adapter(model.parent / "adapters" / "cold", load_weights(model).spec, rank, LINEAR_MODULES, 999)
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "cold", "lora_path": str(extra)}, timeout=60)
        out["http_load_ms"] = (time.perf_counter() - t0) * 1000
        assert r.status_code == 200, r.text
        return out
    finally:
        stop(proc)


def cold_load(model: Path, adapters: list[Path], rank: int) -> float:
    spec = load_weights(model).spec
    times = []
    for p in adapters[:8]:
        t0 = time.perf_counter()
        load_adapter(p.name, p, spec, rank)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


# -- report ----------------------------------------------------------------------------------------
def markdown(r: dict[str, Any], cmd: str) -> str:
    a = r["decode_step_ms"]
    lines = [f"Command: `{cmd}`", "", f"Machine: {r['machine']}; torch {r['torch']}; {r['threads']} threads; "
             f"model {r['params_m']:.1f}M parameters (hidden {r['hidden']}, {r['layers']} layers); "
             f"adapters rank {r['rank']}; {r['dtype']}; parts (b) and (c) use lora_form={r['form']}", ""]
    if a:
        lines += ["(a) decode step, batch 32, context 128 (median ms; ratio to base only)", ""]
        cols = list(a)  # "form / targets"
        lines += ["| adapters in batch | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for case in next(iter(a.values())):
            cells = [f"{a[c][case]:.2f} ({a[c][case] / a[c]['base']:.2f}x)" for c in cols]
            lines.append(f"| {case} | " + " | ".join(cells) + " |")
    if "end_to_end" in r:
        lines += _table_b(r)
    if "http" in r:
        lines += _tables_cd(r)
    return "\n".join(lines) + "\n"


def _table_b(r: dict[str, Any]) -> list[str]:
    b = r["end_to_end"]
    lines = ["", f"(b) {r['n_requests']} requests, output 16..128 tokens, batch 32 (useful tokens/s)", "",
             "| system | wall s | tokens/s | Tandem / system |", "|---|---|---|---|"]
    for k, v in b.items():
        lines.append(f"| {k} | {v['wall_s']:.2f} | {v['tok_s']:.1f} | {b['tandem']['tok_s'] / v['tok_s']:.2f}x |")
    return lines


def _tables_cd(r: dict[str, Any]) -> list[str]:
    lines = ["", "(c) through `tandem serve`, TGI /generate_stream, random adapters", "",
             "| concurrency | TTFT p50 ms | TTFT p90 ms | per-token p50 ms | per-token p90 ms | tokens/s |",
             "|---|---|---|---|---|---|"]
    for k in ("c=1", "c=16"):
        v = r["http"][k]
        lines.append(f"| {k[2:]} | {v['ttft_p50_ms']:.1f} | {v['ttft_p90_ms']:.1f} | {v['tpot_p50_ms']:.1f} | "
                     f"{v['tpot_p90_ms']:.1f} | {v['tok_s']:.1f} |")
    lines += ["", f"(d) adapter cold load: {r['cold_load_ms']:.1f} ms from disk to host memory (median of 8); "
              f"{r['http']['http_load_ms']:.1f} ms for HTTP POST /v1/load_lora_adapter (load + validate + reply)"]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model and workload, to check the script")
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--forms", default="slots,gathered,grouped", help="LoRA forms measured in (a)")
    ap.add_argument("--form", default="slots", help="LoRA form used in (b) and (c)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="compute dtype of (a) and (b)")
    ap.add_argument("--parts", default="abcd", help="which parts to run, e.g. 'b'")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global DTYPE
    DTYPE = DTYPES[args.dtype]
    hidden, layers, inter, n_req, reps = (128, 2, 384, 8, 2) if args.quick else (512, 8, 1536, 64, 9)
    rank = 8
    with tempfile.TemporaryDirectory(prefix="tandem-lora-bench-") as tmp:
        root = Path(tmp)
        model = build_model(root, hidden, layers, inter)
        w = load_weights(model)
        adapters = [write_adapter(root / "adapters" / f"a{i:02d}", w.spec, rank, LINEAR_MODULES, i)
                    for i in range(N_ADAPTERS)]
        qv = [write_adapter(root / "adapters-qv" / f"q{i:02d}", w.spec, rank, ("q_proj", "v_proj"), 100 + i)
              for i in range(N_ADAPTERS)]
        params = sum(p.numel() for p in [w.embed, w.lm_head, w.norm]) + sum(
            t.numel() for lw in w.layers for t in (lw.qkv, lw.o, lw.gate_up, lw.down, lw.ln1, lw.ln2))
        r: dict[str, Any] = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs", "torch": torch.__version__,
                             "threads": args.threads, "params_m": params / 1e6, "hidden": hidden, "layers": layers,
                             "rank": rank, "n_requests": n_req, "form": args.form, "dtype": args.dtype}
        print("(a) decode step ...", flush=True)
        r["decode_step_ms"] = {}
        for form in args.forms.split(",") if "a" in args.parts else []:
            for label, ads in (("all 7 projections", adapters), ("q_proj+v_proj", qv)):
                r["decode_step_ms"][f"{form} / {label}"] = decode_step(model, ads, rank, reps, form)
                print(form, label, json.dumps(r["decode_step_ms"][f"{form} / {label}"]), flush=True)
        if "b" in args.parts:
            print("(b) end to end ...", flush=True)
            r["end_to_end"] = end_to_end(model, adapters, rank, n_req, args.form)
            print(json.dumps(r["end_to_end"]), flush=True)
        if "c" in args.parts or "d" in args.parts:
            print("(c, d) HTTP and cold load ...", flush=True)
            r["cold_load_ms"] = cold_load(model, adapters, rank)
            r["http"] = http_part(model, adapters, rank, 16 if args.quick else 48, 32 if args.quick else 64,
                                  args.form)
    cmd = "python benchmarks/lora.py " + " ".join(sys.argv[1:])
    text = markdown(r, cmd)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
