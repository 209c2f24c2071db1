"""Training engine benchmark (issue 12, item 9): workload (a), one run, same machine, same model, same steps.

Parts (--parts, comma-separated; default all):

    loaders    the same CNN on the same JPEG folder, same batch size and number of steps, four loaders:
                 naive        num_workers=0
                 before       the seed's "before": num_workers=4, no pinning (non-persistent, prefetch 2)
                 hand-tuned   Lightning's rule cpu_count // local_world_size - 1 (min 1), pin_memory on CUDA,
                              persistent_workers, prefetch_factor=4
                 tandem       Tandem's auto-tuned Loader (its measured trial is inside the run)
               samples/s, step time, data_time share (after --warmup steps, and over all steps), ratios
               tandem/naive (goal >= 1.5x) and tandem/hand-tuned (goal >= 0.97x), data_time < 5% of step time
    precision  bf16-mixed vs fp32, and compile vs eager: the model step alone (batches already decoded, in
               memory), so the data pipeline does not hide the compute; compile seconds apart from steady state,
               from dynamo's own timers, with a cold inductor cache and again warm. The compile pair runs in
               its own processes with the usable CPUs as threads (the threads column), the in-process rows
               with --threads
    ddp        2 processes vs 1 on the same global batch, through torchrun (gloo on CPU), threads per process
               stated: cpus // processes each
    comm       DDP comm options A/B on 2 processes (bucket_cap_mb, fp16/bf16 compression, PowerSGD): step time;
               allreduce bandwidth against message size (tandem.train.distributed.all_reduce_bandwidth)
    placement  why loader rows differ between in-process and fresh-process runs: the naive loader on the JPEG
               folder and the model step alone (in-memory batches), each run in this process and in a fresh
               one, alternating over 3 rounds (--rounds); step, data and compute (step - data) ms, median per
               variant

All four loaders are tandem.train.Loader with explicit settings (explicit values skip the trial), so each is
timed by the same clock; only "tandem" leaves them "auto". Each loader run is a fresh process, the four
interleaved over 2 rounds (--rounds), the best round reported. Fresh processes and in-process runs measure the
same within noise (the placement part: medians 2-8% apart, each variant spreading 30-40% between runs); the
fresh processes keep one loader's run from sharing a process with the others.
Numbers come from Trainer.summary(); in-process runs use torch's default intra-op threads (the usable CPUs).
Parts whose pieces are missing print "not available", and a run that crashes (a compiler segfault, a failed
torchrun) becomes an error row, not a failed benchmark.
On a 2-core machine --threads 1 leaves a core to the loader's workers (measured: tandem 1.71x naive, 1.05x
hand-tuned with 1 thread; with torch's 2 threads the tuner rightly keeps 0 workers and all loaders tie).
--quick is a smoke run: its steps are too few for the Tandem loader's trial to be over before measurement.

    .venv/bin/python benchmarks/training.py                      # ~10 min on 2 cores
    .venv/bin/python benchmarks/training.py --quick --markdown   # ~2 min
    .venv/bin/python benchmarks/training.py --data data/shapes --parts loaders --steps 200 --json out.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples/train/image_folder.py"
PARTS = ("loaders", "precision", "ddp", "comm", "placement")
COMM_VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("default (25 MB buckets)", {}), ("bucket_cap_mb=1", {"bucket_cap_mb": 1.0}),
    ("bucket_cap_mb=100", {"bucket_cap_mb": 100.0}), ("fp16 compression", {"compression": "fp16"}),
    ("bf16 compression", {"compression": "bf16"}), ("powersgd rank 1", {"compression": "powersgd"}),
]


def _example() -> Any:
    spec = importlib.util.spec_from_file_location("tandem_example_image_folder", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _available(module: str, name: str) -> bool:
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


def usable_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class MemoryDataset:
    """Pre-made tensors of the workload's shape: the model step without the data pipeline."""

    def __init__(self, n: int, size: int, classes: int = 6, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = torch.randint(0, classes, (n,), generator=g)
        self.classes = list(range(classes))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def example_args(opts: argparse.Namespace, **over: Any) -> argparse.Namespace:
    """The example's flags for one benchmark run."""
    argv = ["--data", str(opts.data), "--epochs", "1000", "--batch-size", str(opts.batch_size), "--size",
            str(opts.size), "--max-steps", str(opts.steps), "--warmup", str(opts.warmup), "--no-eval",
            "--no-progress", "--log-every", "1000"]
    args = _example().parse_args(argv)
    for k, v in over.items():
        setattr(args, k, v)
    return args


def _row(name: str, result: dict[str, Any], all_steps: dict[str, Any] | None = None) -> dict[str, Any]:
    s = result["summary"]
    row = {"name": name, "steps": s["optimizer_steps"], "step_ms": 1e3 * (s["mean_time"] or float("nan")),
           "data_share": s["data_time_share"], "samples_per_s": s["samples_per_s"],
           "loader": result.get("loader_settings"), "threads": result.get("threads"),
           "first_step_s": result.get("first_step_time"), "train_seconds": result.get("train_seconds")}
    if all_steps is not None:
        row["samples_per_s_all"] = all_steps.get("samples_per_s")
    return row


# --- parts ---------------------------------------------------------------------------------------------------

def loader_variants(cuda: bool, cpus: int, local_world_size: int = 1) -> list[tuple[str, dict[str, Any] | None]]:
    """(name, explicit Loader settings or None for Tandem's auto-tuning)."""
    lightning = max(1, cpus // local_world_size - 1)
    return [("naive (num_workers=0)", {"num_workers": 0, "pin_memory": False, "persistent_workers": False}),
            ("before (4 workers, no pin)", {"num_workers": 4, "prefetch_factor": 2, "pin_memory": False,
                                            "persistent_workers": False}),
            (f"hand-tuned ({lightning} workers, Lightning rule)",
             {"num_workers": lightning, "prefetch_factor": 4, "pin_memory": cuda, "persistent_workers": True}),
            ("tandem (auto-tuned)", None)]


def part_loaders(opts: argparse.Namespace, tmp: Path, rounds: int = 2) -> dict[str, Any]:
    """The four loaders on the JPEG folder, each run in a fresh process, interleaved, best of `rounds`.

    Fresh processes keep the loaders from sharing state (worker pools, allocator, page cache warmed by the
    one before). The in-process "slowdown" that motivated it (56 ms fresh against 104 ms in-process) compared
    2 torch threads (torchrun's OMP_NUM_THREADS) with 1; at equal threads the placement part finds no gap.
    """
    best: dict[str, dict[str, Any]] = {}
    for _ in range(rounds):
        for name, kwargs in loader_variants(torch.cuda.is_available(), usable_cpus()):
            spec = {"loader": kwargs, "threads": opts.threads, "opts": _opts_json(opts)}
            result = _own_process(spec, tmp)
            row = _row(name, result, result["summary_all"])   # all steps: the trial's cost included
            if kwargs is None:
                row["tune_report"] = result["tune_report"]
            print(f"  {name}: {row['samples_per_s']:.1f} samples/s, {row['step_ms']:.1f} ms/step, "
                  f"data_time {row['data_share']:.1%}", flush=True)
            if name not in best or row["samples_per_s"] > best[name]["samples_per_s"]:
                best[name] = row
    rows = list(best.values())
    by = {r["name"].split(" ")[0]: r for r in rows}
    tandem, naive, hand = by["tandem"], by["naive"], by["hand-tuned"]
    goals = {"tandem/naive": tandem["samples_per_s"] / naive["samples_per_s"],
             "tandem/hand-tuned": tandem["samples_per_s"] / hand["samples_per_s"],
             "tandem data_time share": tandem["data_share"]}
    goals["met"] = {"tandem/naive >= 1.5": goals["tandem/naive"] >= 1.5,
                    "tandem/hand-tuned >= 0.97": goals["tandem/hand-tuned"] >= 0.97,
                    "data_time < 5%": goals["tandem data_time share"] < 0.05}
    return {"rows": rows, "goals": goals}


def part_precision(opts: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """bf16-mixed vs fp32, compile vs eager, on in-memory batches (the model step alone)."""
    ex = _example()
    data = MemoryDataset(opts.batch_size * 8, opts.size)
    fixed = {"num_workers": 0, "pin_memory": False, "persistent_workers": False}
    rows = []
    # a throwaway short run first: the first run in this process measured slower (one-time set-up, workers of
    # the loaders part still winding down)
    ex.train(example_args(opts, max_steps=3, warmup=0), loader_kwargs=fixed, train_set=data)
    runs: list[tuple[str, dict[str, Any]]] = [("fp32 eager", {"precision": "32"}),
                                            ("bf16-mixed eager", {"precision": "bf16-mixed"})]
    for name, over in runs:
        result = ex.train(example_args(opts, **over), loader_kwargs=fixed, train_set=data)
        rows.append(_row(name, result))
        print(f"  {name}: {rows[-1]['step_ms']:.1f} ms/step", flush=True)
    out: dict[str, Any] = {"rows": rows, "bf16_speedup": rows[0]["step_ms"] / rows[1]["step_ms"]}
    if not _available("tandem.train.compile", "compile_module"):
        out["compile"] = "not available (tandem.train.compile.compile_module missing)"
        return out
    # compile vs eager each in its own process (a crash in the compiler costs this row, not the benchmark). The
    # compiled run goes twice on one fresh inductor cache folder: cold (what a first run pays) and warm (a
    # re-run on this machine, the FX graph cache filled)
    cache = {"TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor-cache")}
    pair = []
    for name, compiled in (("fp32 eager (own process)", False), ("fp32 compiled features, cold cache", True),
                           ("fp32 compiled features, warm cache", True)):
        spec = {"args": {"compile": compiled}, "memory": True, "opts": _opts_json(opts)}
        try:
            pair.append(_row(name, result := _torchrun(opts, 1, spec, tmp, cache)))
            pair[-1]["compiler_s"] = result.get("compiler_seconds")
            print(f"  {name}: {pair[-1]['step_ms']:.1f} ms/step, compiler {pair[-1]['compiler_s'] or 0:.1f} s",
                  flush=True)
        except RuntimeError as exc:
            pair.append({"name": name, "error": str(exc)[-300:]})
            print(f"  {name}: failed: {str(exc)[-300:]}", flush=True)
    rows += pair
    if all("error" not in r for r in pair):
        eager, cold, warm = pair
        out["compile_speedup"] = eager["step_ms"] / cold["step_ms"]   # one run each; warm is a row
        # dynamo's own timers of the compiled run (tandem.train.compiler_seconds): compile only, no run time
        out["compile_seconds"] = cold["compiler_s"]
        out["compile_seconds_warm_cache"] = warm["compiler_s"]
        # the older figure, kept for comparison: first iteration compiled minus first iteration eager
        out["compile_first_step_difference_s"] = (cold["first_step_s"] or 0.0) - (eager["first_step_s"] or 0.0)
    else:
        out["compile"] = "failed (see the rows)"
    return out


def part_placement(opts: argparse.Namespace, tmp: Path, rounds: int = 3) -> dict[str, Any]:
    """The naive loader and the in-memory model step, in this process and in fresh ones, alternating."""
    ex = _example()
    naive = {"num_workers": 0, "pin_memory": False, "persistent_workers": False}
    data = MemoryDataset(opts.batch_size * 8 * 2, opts.size)   # the worker's in-memory set, same size
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(rounds):
        for name, fresh, loader in (("jpeg naive, in-process", False, True), ("jpeg naive, fresh", True, True),
                                    ("memory, in-process", False, False), ("memory, fresh", True, False)):
            if fresh:
                spec: dict[str, Any] = {"threads": opts.threads, "opts": _opts_json(opts)}
                spec |= {"loader": naive} if loader else {"memory": True}
                result = _own_process(spec, tmp)
            else:
                result = ex.train(example_args(opts), loader_kwargs=naive, train_set=None if loader else data)
            row = _row(name, result)
            row["data_ms"] = row["step_ms"] * (row["data_share"] or 0.0)
            row["compute_ms"] = row["step_ms"] - row["data_ms"]
            runs.setdefault(name, []).append(row)
            print(f"  {name}: {row['step_ms']:.1f} ms/step (data {row['data_ms']:.1f}, compute "
                  f"{row['compute_ms']:.1f}), threads {row['threads']}", flush=True)
    rows = []
    for name, got in runs.items():
        med = {k: statistics.median(r[k] for r in got) for k in ("step_ms", "data_ms", "compute_ms")}
        rows.append(got[0] | med | {"name": f"{name} (median of {len(got)})", "samples_per_s": statistics.median(
            r["samples_per_s"] for r in got), "data_share": med["data_ms"] / med["step_ms"],
            "each_step_ms": [round(r["step_ms"], 1) for r in got]})
    by = {r["name"].split(" (")[0]: r for r in rows}
    ratios = {f"fresh/in-process {what} {k}": by[f"{what}, fresh"][k] / by[f"{what}, in-process"][k]
              for what in ("jpeg naive", "memory") for k in ("step_ms", "compute_ms")}
    return {"rows": rows, "ratios": ratios}


def _opts_json(opts: argparse.Namespace) -> dict[str, Any]:
    """The benchmark's options as a worker spec carries them (JSON: the data folder as a string)."""
    return vars(opts) | {"data": str(opts.data)}


def _run_worker(launcher: list[str], spec: dict[str, Any], tmp: Path, env: dict[str, str] | None = None,
                failure: Callable[[str], str] = lambda stderr: stderr[-500:]) -> dict[str, Any]:
    """Run this script's worker under `launcher` (python, or torchrun) and return the JSON it writes."""
    out = tmp / f"worker-{time.monotonic_ns()}.json"
    cmd = [*launcher, str(Path(__file__).resolve()), "--_worker", json.dumps({**spec, "out": str(out)}, default=str)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed ({proc.returncode}): {failure(proc.stderr)}")
    return dict(json.loads(out.read_text()))


def _torchrun_failure(stderr: str) -> str:
    """The worker's own exception line, else torchrun's summary (a signal: a crash in native code)."""
    errors = [ln.strip() for ln in stderr.splitlines()
              if re.match(r"^(\[rank\d+\]: )?[\w.]*(Error|Exception): ", ln) and "ChildFailedError" not in ln]
    summary = [ln.strip() for ln in stderr.splitlines() if "exitcode" in ln or "Signal" in ln]
    return "torchrun: " + " | ".join((errors[-1:] or []) + summary[-2:])


def _torchrun(opts: argparse.Namespace, nproc: int, spec: dict[str, Any], tmp: Path,
              env: dict[str, str] | None = None) -> dict[str, Any]:
    threads = max(1, usable_cpus() // nproc)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    result = _run_worker(launcher, spec, tmp, {"OMP_NUM_THREADS": str(threads), **(env or {})}, _torchrun_failure)
    result["threads_per_process"] = threads
    return result


def _own_process(spec: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """One run of this script's worker in a fresh process (no torchrun: one rank, no process group)."""
    return _run_worker([sys.executable], spec, tmp)


def _ddp_missing() -> str | None:
    if not _available("tandem.train.distributed", "init_distributed"):
        return "not available (tandem.train.distributed missing)"
    return None


def part_ddp(opts: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """2 processes vs 1 on the same global batch (per-process batch halved), the real JPEG pipeline."""
    missing = _ddp_missing()
    if missing:
        return {"status": missing}
    rows = []
    for nproc in (1, 2):
        spec = {"args": {"batch_size": opts.batch_size // nproc}, "opts": _opts_json(opts)}
        result = _torchrun(opts, nproc, spec, tmp)
        rows.append(_row(f"{nproc} process(es) x {result['threads_per_process']} threads", result))
        print(f"  {rows[-1]['name']}: {rows[-1]['samples_per_s']:.1f} samples/s", flush=True)
    return {"rows": rows, "speedup": rows[1]["samples_per_s"] / rows[0]["samples_per_s"]}


def part_comm(opts: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Comm options A/B on 2 processes (in-memory batches, so the step is compute + allreduce) + bandwidth."""
    missing = _ddp_missing()
    if missing:
        return {"status": missing}
    rows = []
    steps = max(10, opts.steps // 3)
    for name, comm in COMM_VARIANTS:
        spec = {"args": {"max_steps": steps, "warmup": min(opts.warmup, steps // 3)}, "comm": comm,
                "memory": True, "opts": _opts_json(opts)}
        try:
            rows.append(_row(name, _torchrun(opts, 2, spec, tmp)))
            print(f"  {name}: {rows[-1]['step_ms']:.1f} ms/step", flush=True)
        except RuntimeError as exc:
            rows.append({"name": name, "error": str(exc)[-300:]})
    out: dict[str, Any] = {"rows": rows}
    if _available("tandem.train.distributed", "all_reduce_bandwidth"):
        out["bandwidth"] = _torchrun(opts, 2, {"bandwidth": True}, tmp).get("bandwidth")
    else:
        out["bandwidth"] = "not available (tandem.train.distributed.all_reduce_bandwidth missing)"
    return out


def worker(spec: dict[str, Any]) -> None:
    """One process of the loaders part, or one torchrun process of the precision / ddp / comm parts."""
    out = Path(spec["out"])
    if spec.get("bandwidth"):
        from tandem.train.distributed import all_reduce_bandwidth, init_distributed

        env = init_distributed("ddp", "auto")
        sizes = [4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]   # 4 KiB .. 64 MiB
        result: dict[str, Any] = {"bandwidth": all_reduce_bandwidth(sizes, device=env.device)}
    else:
        opts = argparse.Namespace(**spec["opts"])
        opts.data = Path(opts.data)
        args = example_args(opts, **spec.get("args", {}))
        trainer_kwargs = {}
        if "comm" in spec:
            from tandem.train.distributed import CommOptions

            trainer_kwargs["comm"] = CommOptions(**spec["comm"])
        data = MemoryDataset(args.batch_size * 8 * 2, args.size) if spec.get("memory") else None
        kwargs = {"num_workers": 0, "pin_memory": False, "persistent_workers": False} if data is not None else None
        if "loader" in spec:   # the loaders part: these settings (None: auto-tuned) on the JPEG folder
            kwargs = spec["loader"]
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        result = _example().train(args, loader_kwargs=kwargs, trainer_kwargs=trainer_kwargs, train_set=data)
    if int(os.environ.get("RANK", "0")) == 0:
        out.write_text(json.dumps(result, default=str))


# --- output --------------------------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus_usable": usable_cpus(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict[str, Any]], markdown: bool) -> str:
    """Rows as an aligned text table or a markdown table."""
    head = ["setting", "threads", "steps", "step ms", "data_time share", "samples/s", "samples/s all steps"]
    body = [[r["name"], str(r.get("threads") or "-"), str(r.get("steps", "-")), _fmt(r.get("step_ms"), ".1f"),
             _fmt(r.get("data_share"), ".1%"), _fmt(r.get("samples_per_s"), ".1f"),
             _fmt(r.get("samples_per_s_all"), ".1f")]
            if "error" not in r else [r["name"], "", "error", "", "", "", ""] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in [head, *body])


def report(results: dict[str, Any], markdown: bool) -> str:
    """Everything measured, readable."""
    lines = [f"machine: {json.dumps(results['machine'])}", ""]
    for part in PARTS:
        if part not in results:
            continue
        res = results[part]
        lines.append(f"## {part}" if markdown else f"[{part}]")
        if "status" in res:
            lines += [res["status"], ""]
            continue
        lines += [table(res["rows"], markdown), ""]
        lines += [r["tune_report"] + "\n" for r in res["rows"] if r.get("tune_report")]
        lines += [f"{r['name']}: {r['error']}" for r in res["rows"] if "error" in r]
        if isinstance(res.get("bandwidth"), list):
            lines += ["allreduce bandwidth (2 processes):", "  bytes         ms  algbw GB/s  busbw GB/s"]
            lines += [f"  {int(b['bytes']):>9} {b['seconds'] * 1e3:>9.3f} {b['algbw_gbs']:>11.3f} "
                      f"{b['busbw_gbs']:>11.3f}" for b in res["bandwidth"]]
        for key, value in res.items():
            if key not in ("rows", "bandwidth") or not isinstance(value, list):
                lines.append(f"{key}: {json.dumps(value, default=str)}")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="ImageFolder root (default: generate into a temp dir)")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default 80, --quick 24)")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of the means (default: steps // 4)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=128, help="crop side")
    ap.add_argument("--images", type=int, default=3000, help="training images to generate (no --data)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads of the in-process runs "
                    "(default: torch's, the usable CPUs); the same for every variant")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds of the loaders (default 2, best "
                    "of) and placement (default 3, median of) parts")
    ap.add_argument("--quick", action="store_true", help="~2 min: fewer steps, fewer images")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    opts = ap.parse_args()
    # the "before" baseline asks for 4 workers on purpose, whatever the CPU count
    warnings.filterwarnings("ignore", message=".*worker processes in total.*")
    if opts._worker is not None:
        worker(json.loads(opts._worker))
        return
    if opts.threads:
        torch.set_num_threads(opts.threads)
    opts.steps = opts.steps or (24 if opts.quick else 80)
    opts.warmup = opts.steps // 4 if opts.warmup is None else opts.warmup
    parts = [p.strip() for p in opts.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    with tempfile.TemporaryDirectory(prefix="tandem-bench-train-") as tmp_name:
        tmp = Path(tmp_name)
        if opts.data is None:
            sys.path.insert(0, str(ROOT / "scripts"))
            from make_image_folder import make_image_folder

            count = 600 if opts.quick else opts.images
            t0 = time.perf_counter()
            opts.data = make_image_folder(tmp / "shapes", count, count // 5, 0)
            (opts.data / ".complete").touch()
            print(f"generated {count} + {count // 5} JPEGs in {time.perf_counter() - t0:.1f} s", flush=True)
        opts_clean = argparse.Namespace(**{k: v for k, v in vars(opts).items() if k != "_worker"})
        results: dict[str, Any] = {"machine": machine(), "steps": opts.steps, "warmup": opts.warmup,
                                   "batch_size": opts.batch_size}
        print(f"machine: {json.dumps(results['machine'])}", flush=True)
        rounds = {"rounds": opts.rounds} if opts.rounds else {}
        runners = {"loaders": lambda: part_loaders(opts_clean, tmp, **rounds),
                   "precision": lambda: part_precision(opts_clean, tmp),
                   "ddp": lambda: part_ddp(opts_clean, tmp), "comm": lambda: part_comm(opts_clean, tmp),
                   "placement": lambda: part_placement(opts_clean, tmp, **rounds)}
        for part in parts:
            print(f"[{part}] ...", flush=True)
            t0 = time.perf_counter()
            results[part] = runners[part]()
            results[part]["seconds"] = round(time.perf_counter() - t0, 1)
    print()
    print(report(results, opts.markdown))
    if opts.json is not None:
        opts.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
