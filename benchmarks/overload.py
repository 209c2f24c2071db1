"""Overload benchmark (issue 12): goodput past the knee, and what a rejected request costs.

One `tandem serve` with one front process and a slow echo model (the test fixture's echo model with
a predict delay: capacity = batch / delay requests per second, independent of this machine's CPU
speed since predict sleeps), then closed-loop load from `tandem.bench.loadgen` on the same machine:

  knee      concurrency 1, 2, 4, ... up to the model's queue: the peak goodput (2xx/s)
  4x        4 x the knee's concurrency, twice: clients that send again at once after a 503
            ("hammer") and clients that wait the answer's Retry-After first ("honour")

For each level it reads the front process's CPU time (/proc/<pid>/stat via psutil) at the start and
end of the measured window. The CPU of one successful request comes from the knee run (no
rejections there); the CPU of one rejected request is (front CPU - successes x that) / 503s.
Goal: goodput at 4x overload >= 80 % of the peak when clients honour Retry-After.

    python benchmarks/overload.py                    # about a minute on 2 cores
    python benchmarks/overload.py --json overload.json --delay 0.05 --batch 4 --queue 4
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tandem.bench.loadgen import LoadResult, run_load_sync  # noqa: E402

ECHO = ROOT / "tests" / "fixtures" / "repo" / "echo" / "model.py"
BODY = b'{"x": [1.0, 2.0, 3.0]}'


@dataclass
class Level:
    name: str
    concurrency: int
    honour: bool
    goodput: float
    requests: int
    ok: int
    rejected: int
    retries: int
    other_errors: int
    p50_ms: float
    p99_ms: float
    front_cpu_s: float
    cpu_us_per_ok: float | None = None
    cpu_us_per_rejected: float | None = None


def make_repo(tmp: Path, delay: float, batch: int, queue: int) -> Path:
    folder = tmp / "repo" / "echo"
    folder.mkdir(parents=True)
    (folder / "model.py").write_text(ECHO.read_text())
    (folder / "tandem.yaml").write_text(
        f"name: echo\ninstances: 1\ndevice: cpu\nthreads: 1\n"
        f"batching: {{max_batch_size: {batch}, max_batch_delay_ms: 1}}\n"
        f"timeout_s: 30\nqueue_size: {queue}\nparams: {{predict_delay_s: {delay}}}\n")
    return tmp / "repo"


def start_server(repo: Path) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "tandem.cli", "serve", str(repo), "--port", "0", "--cpu-workers", "1",
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 180
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise RuntimeError("server exited:\n" + "".join(lines))
        lines.append(line)
        if line.startswith("tandem ready on "):
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
            return proc, line.split("tandem ready on ", 1)[1].strip()
    proc.kill()
    raise RuntimeError("server not ready:\n" + "".join(lines))


def front_process(server: subprocess.Popen[str], port: int) -> psutil.Process:
    """The child of the supervisor that holds the listening socket (the supervisor holds it too)."""
    for child in psutil.Process(server.pid).children(recursive=True):
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in child.net_connections("tcp")):
                return child
        except psutil.Error:
            continue
    raise RuntimeError("no front process found")


def cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


def run_level(url: str, front: psutil.Process, name: str, concurrency: int, honour: bool, warmup: float,
              duration: float) -> tuple[Level, LoadResult]:
    samples: list[float] = []
    t0 = time.monotonic()

    def sample_at(when: float) -> None:
        time.sleep(max(0.0, t0 + when - time.monotonic()))
        samples.append(cpu_s(front))

    sampler = threading.Thread(target=lambda: (sample_at(warmup), sample_at(warmup + duration)), daemon=True)
    sampler.start()
    r = run_load_sync(url, BODY, concurrency=concurrency, duration_s=duration, warmup_s=warmup, timeout_s=30,
                      honour_retry_after=honour, label=name)
    sampler.join()
    ok = r.status_counts.get(200, 0)
    level = Level(name, concurrency, honour, r.qps, r.requests, ok, r.rejected, r.retries,
                  r.errors - r.rejected, r.p50_ms, r.p99_ms, samples[1] - samples[0])
    print(f"  {name:<8} c={concurrency:<3} goodput {r.qps:7.1f}/s  ok {ok:6d}  rejected {r.rejected:7d}  "
          f"retries {r.retries:5d}  p50 {r.p50_ms:7.1f} ms  p99 {r.p99_ms:7.1f} ms  "
          f"front CPU {level.front_cpu_s:5.2f} s", flush=True)
    return level, r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delay", type=float, default=0.05, help="predict seconds per batch")
    ap.add_argument("--batch", type=int, default=4, help="max batch size")
    ap.add_argument("--queue", type=int, default=4, help="queue_size (slots of the one front)")
    ap.add_argument("--overload", type=int, default=4, help="overload factor over the knee's concurrency")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repo(Path(tmp), args.delay, args.batch, args.queue)
        server, base = start_server(repo)
        try:
            front = front_process(server, int(base.rsplit(":", 1)[1]))
            url = f"{base}/predictions/echo"
            print(f"server {base}: echo, predict {args.delay * 1000:g} ms per batch <= {args.batch}, "
                  f"queue {args.queue}, 1 front (pid {front.pid}); {os.cpu_count()} CPUs", flush=True)
            levels: list[Level] = []
            c = 1
            while c <= args.queue:
                levels.append(run_level(url, front, "knee", c, True, args.warmup, args.duration)[0])
                c *= 2
            peak = max(levels, key=lambda lv: lv.goodput)
            knee = min((lv for lv in levels if lv.goodput >= 0.95 * peak.goodput), key=lambda lv: lv.concurrency)
            cpu_ok = knee.front_cpu_s / max(1, knee.ok)
            knee.cpu_us_per_ok = cpu_ok * 1e6
            over = args.overload * knee.concurrency
            results = {}
            for name, honour in (("hammer", False), ("honour", True)):
                lv, _ = run_level(url, front, name, over, honour, args.warmup, args.duration)
                lv.cpu_us_per_ok = cpu_ok * 1e6
                if lv.rejected:
                    lv.cpu_us_per_rejected = max(0.0, lv.front_cpu_s - lv.ok * cpu_ok) / lv.rejected * 1e6
                levels.append(lv)
                results[name] = lv
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()

    hammer, honour = results["hammer"], results["honour"]
    summary: dict[str, Any] = {
        "peak_goodput": peak.goodput, "knee_concurrency": knee.concurrency, "overload_concurrency": over,
        "cpu_us_per_ok": knee.cpu_us_per_ok,
        "hammer_goodput": hammer.goodput, "hammer_over_peak": hammer.goodput / peak.goodput,
        "honour_goodput": honour.goodput, "honour_over_peak": honour.goodput / peak.goodput,
        "cpu_us_per_rejected": hammer.cpu_us_per_rejected,
        "rejected_per_s": {"hammer": hammer.rejected / args.duration, "honour": honour.rejected / args.duration},
        "goal_met": honour.goodput >= 0.8 * peak.goodput,
    }
    print(f"\npeak goodput {peak.goodput:.1f}/s at c={knee.concurrency}; "
          f"{knee.cpu_us_per_ok:.0f} µs front CPU per successful request")
    print(f"{args.overload}x overload (c={over}): hammering clients {hammer.goodput:.1f}/s "
          f"({summary['hammer_over_peak']:.0%} of peak, {hammer.rejected / args.duration:.0f} rejections/s), "
          f"Retry-After honoured {honour.goodput:.1f}/s ({summary['honour_over_peak']:.0%} of peak, "
          f"{honour.rejected / args.duration:.0f} rejections/s)")
    if hammer.cpu_us_per_rejected is not None:
        print(f"front CPU per rejected request: {hammer.cpu_us_per_rejected:.0f} µs")
    print(f"goal (honoured >= 80% of peak): {'met' if summary['goal_met'] else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "levels": [asdict(lv) for lv in levels], "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
