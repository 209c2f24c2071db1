"""A/B of two Tandem checkouts on the diffusion workloads: both servers up at once, load alternated.

A change to the serving path of a few percent is below what one-after-another runs can resolve on a
noisy 2-CPU machine (`diffusion_rounds.py` saw rounds of the same server 1.4x apart). Here both
checkouts serve the same `benchmarks/diffusion.py` repository side by side, each health-checked
against stock diffusers, and the load alternates between them so that drift hits both alike:

  c=1    20-step requests one at a time, A B B A A B ...: endpoint p50/mean, the worker's denoise time
         (`X-Tandem-Timings`) and the server processes' CPU seconds per request
  c=8    short closed-loop windows of the 20/30/50 step mix, A B B A ...: images/s, Little's-law
         throughput and CPU seconds per image

Make the other checkout with `git worktree add ../tandem-base <rev>`; it uses this checkout's .venv.

    .venv/bin/python benchmarks/diffusion_ab.py ../tandem-base . --models shipped       # ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

import diffusion as bench  # noqa: E402  (benchmarks/diffusion.py, beside this script)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="A/B two Tandem checkouts, both served at once, load alternated.")
    p.add_argument("a", type=Path, help="checkout A (the baseline)")
    p.add_argument("b", type=Path, help="checkout B (the change)")
    p.add_argument("--models", type=lambda v: bench._csv(v, bench.MODELS), default=["shipped"])
    p.add_argument("--system", choices=["tandem", "tandem-ort"], default="tandem", help="UNet runtime: torch / ORT")
    p.add_argument("--requests", type=int, default=40, help="c=1 requests per checkout")
    p.add_argument("--windows", type=int, default=4, help="c=8 windows per checkout")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per c=8 window")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def abba(i: int) -> int:
    """0 1 1 0 0 1 1 0 ...: which checkout takes turn i."""
    return (i + i // 2) % 2


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its children (the supervisor: fronts and workers)."""
    total = 0.0
    proc = psutil.Process(pid)
    for q in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = q.cpu_times()
            total += t.user + t.system
    return total


def c1_turns(urls: list[str], pids: list[int], body: dict[str, Any], n: int) -> list[dict[str, list[float]]]:
    out: list[dict[str, list[float]]] = [{"ms": [], "denoise_ms": [], "cpu_ms": []} for _ in urls]
    for i in range(2 * n + 4):  # the first 4 warm both
        k = abba(i)
        c0, t0 = cpu_s(pids[k]), time.perf_counter()
        r = httpx.post(urls[k], json=body, timeout=bench.REQUEST_TIMEOUT_S)
        r.raise_for_status()
        if i >= 4:
            timings = dict(kv.split("=") for kv in r.headers["x-tandem-timings"].split(";"))
            out[k]["ms"].append((time.perf_counter() - t0) * 1000)
            out[k]["denoise_ms"].append(float(timings["denoise"]))
            out[k]["cpu_ms"].append((cpu_s(pids[k]) - c0) * 1000)
    return out


def c8_turns(urls: list[str], pids: list[int], bodies: list[dict[str, Any]], n: int,
             duration_s: float) -> list[dict[str, list[float]]]:
    out: list[dict[str, list[float]]] = [{"ips": [], "little_ips": [], "cpu_s": []} for _ in urls]
    for i in range(2 * n):
        k = abba(i)
        c0 = cpu_s(pids[k])
        level = bench.load_level(urls[k], bodies, bench.HIGH, (4.0, duration_s), ("", "", "mix"))
        out[k]["ips"].append(level.images_per_s or 0.0)
        out[k]["little_ips"].append(level.extra["little_ips"] or 0.0)
        out[k]["cpu_s"].append((cpu_s(pids[k]) - c0) / max(1, level.requests))
        print(f"  c=8 window {i + 1}: {'AB'[k]} {level.images_per_s:.3f} images/s", flush=True)
    return out


def report(name: str, metric: str, a: list[float], b: list[float], lower_is_better: bool) -> str:
    ma, mb = statistics.median(a), statistics.median(b)
    better = (ma / mb) if lower_is_better else (mb / ma)
    return f"| {name} | {metric} | {ma:.3f} | {mb:.3f} | {better:.3f} |"


def run_model(key: str, args: argparse.Namespace, s: bench.Settings, workdir: Path) -> list[str]:
    case = bench.make_case(key, s, workdir)
    if case is None:
        return [f"{key}: skipped, no pipeline at {bench.SHIPPED_PIPELINE}"]
    reference, _ = bench.offline_run(case, s, False, workdir)
    with contextlib.ExitStack() as stack:
        urls, pids = [], []
        for tag, root in (("a", args.a), ("b", args.b)):
            bench.ROOT = root.resolve()  # server_command runs `-m tandem.cli` with this checkout first on the path
            base, db, pid = stack.enter_context(bench.served(args.system, case, s, reference, workdir, tag=f"-{tag}"))
            if db < bench.PSNR_MIN_DB:
                raise RuntimeError(f"checkout {tag}'s image differs from stock diffusers ({bench.fmt_db(db)})")
            urls.append(f"{base}/predictions/{bench.NAME}")
            pids.append(pid)  # `tandem serve` itself: cpu_s adds its fronts and workers
        one = c1_turns(urls, pids, bench.health_body(s, case), args.requests)
        eight = c8_turns(urls, pids, bench.mix_bodies(s, case), args.windows, args.duration)
    c = f"{case.key}, {args.system}"
    return [report(c, "c=1 endpoint p50 ms", one[0]["ms"], one[1]["ms"], True),
            report(c, "c=1 endpoint mean ms", [statistics.mean(one[0]["ms"])], [statistics.mean(one[1]["ms"])], True),
            report(c, "c=1 worker denoise p50 ms", one[0]["denoise_ms"], one[1]["denoise_ms"], True),
            report(c, "c=1 server CPU ms / request", one[0]["cpu_ms"], one[1]["cpu_ms"], True),
            report(c, "c=8 images/s (window median)", eight[0]["ips"], eight[1]["ips"], False),
            report(c, "c=8 c / mean latency", eight[0]["little_ips"], eight[1]["little_ips"], False),
            report(c, "c=8 server CPU s / image", eight[0]["cpu_s"], eight[1]["cpu_s"], True)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = bench.Settings(args.duration, 4.0, bench.C1_STEPS, bench.STEP_MIX, bench.PREVIEW_STEPS, (1, bench.HIGH),
                       bench.SD_SHAPED_SIZE, args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="tandem-diffusion-ab-"))
    print(f"A = {args.a}, B = {args.b}; logs in {workdir}", flush=True)
    rows = [row for key in args.models for row in run_model(key, args, s, workdir)]
    print("\n| model, UNet | metric | A | B | B better by |\n|---|---|---:|---:|---:|\n" + "\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
