"""Repeated, interleaved c=8 rounds of two or more text-to-image servers: is a ratio real or noise?

`benchmarks/diffusion.py` runs each system once, one after another, so a ratio between two systems rests
on one window each, minutes apart. On a noisy 2-CPU machine that is not enough to tell 1.14x from 1.42x.
This script reuses that benchmark's servers, client, request bodies and image check, and runs only its
workload 2 (c=8, steps drawn from 20/30/50) for `--rounds` rounds. The order of the systems alternates
from round to round (A B, B A, A B, ...), so drift over the run does not favour the one that goes first.
Every server is started fresh for each round and its health image checked against stock diffusers.

It prints each round's images/s, the per-round ratio of the first system to each other one, and the
median and range of those ratios; each also by Little's law (concurrency / mean latency), which a server
that answers a whole batch at once cannot move by where its batches fall in the window.

    .venv/bin/python benchmarks/diffusion_rounds.py --systems tandem,litserve --rounds 4 \\
        --markdown bench-out/rounds.md --json bench-out/rounds.json        # ~15 min on 2 cores
    .venv/bin/python benchmarks/diffusion_rounds.py --rounds 2 --duration 10 --warmup 3 --models shipped
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import diffusion as bench  # noqa: E402  (benchmarks/diffusion.py, beside this script)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Interleaved c=8 rounds of text-to-image servers.")
    servers = tuple(x for x in bench.SYSTEMS if x != "offline")
    p.add_argument("--systems", type=lambda v: bench._csv(v, servers), default=["tandem", "litserve"],
                   help="the first is compared with each other one (default tandem,litserve)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--models", type=lambda v: bench._csv(v, bench.MODELS), default=["sd-shaped"])
    p.add_argument("--duration", type=float, default=60.0, help="measured seconds per window")
    p.add_argument("--warmup", type=float, default=15.0, help="unmeasured warm-up seconds per window")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads of every system")
    p.add_argument("--markdown", type=Path)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if len(args.systems) < 2 or args.rounds < 1:
        p.error("give at least two --systems and --rounds >= 1")
    return args


def one_window(system: str, case: bench.ModelCase, s: bench.Settings, reference: Any, workdir: Path,
               round_no: int) -> dict[str, Any]:
    """Start `system`, check its image, run one c=8 step-mix window, stop it."""
    with bench.served(system, case, s, reference, workdir, tag=f"-round{round_no}") as (base, db, _):
        if db < bench.PSNR_MIN_DB:
            raise RuntimeError(f"{system}'s image differs from stock diffusers ({bench.fmt_db(db)})")
        url = f"{base}/predictions/{bench.NAME}"
        step_s = bench.warm_request_s(url, bench.health_body(s, case)) / s.c1_steps
        bodies = bench.mix_bodies(s, case)
        timing = bench.window(s, bench.HIGH, step_s * bench.mean_steps(bodies))
        level = bench.load_level(url, bodies, bench.HIGH, timing, (case.key, system, "mix"))
        bench.print_level(level)
        return {"round": round_no, "system": system, "psnr_db": db, **asdict(level)}


def order(systems: list[str], round_no: int) -> list[str]:
    """A B C in even rounds, C B A in odd ones."""
    return systems if round_no % 2 == 0 else systems[::-1]


def _little(w: dict[str, Any] | None) -> float | None:
    return None if w is None else w["extra"].get("little_ips")


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, little: bool = False) -> float | None:
    """a / b in images/s (completed inside the window), or by Little's law (c / mean latency)."""
    x, y = (_little(a), _little(b)) if little else (a and a["images_per_s"], b and b["images_per_s"])
    return x / y if x is not None and y else None


def ratios(windows: list[dict[str, Any]], systems: list[str]) -> dict[str, dict[str, Any]]:
    """Per other system: the per-round ratios first / other of images/s, their median and range; the same
    by Little's law (`little_*`)."""
    by = {(w["round"], w["system"]): w for w in windows}
    rounds = sorted({w["round"] for w in windows})
    out = {}
    for other in systems[1:]:
        out[other] = {}
        for prefix, little in (("", False), ("little_", True)):
            per = [x for n in rounds if (x := _ratio(by.get((n, systems[0])), by.get((n, other)), little)) is not None]
            out[other] |= {f"{prefix}per_round": per, f"{prefix}median": statistics.median(per) if per else None,
                           f"{prefix}min": min(per, default=None), f"{prefix}max": max(per, default=None)}
    return out


def markdown(case: bench.ModelCase, windows: list[dict[str, Any]], systems: list[str],
             r: dict[str, dict[str, Any]]) -> list[str]:
    """Per-round table, then the ratios' median and range and each system's images/s."""
    rounds = sorted({w["round"] for w in windows})
    by = {(w["round"], w["system"]): w for w in windows}
    head = ["| round (order) | " + " | ".join(f"{x} images/s, c / mean latency (p50 / p95 ms)" for x in systems)
            + " | " + " | ".join(f"{systems[0]} / {x} (by latency)" for x in systems[1:]) + " |",
            "|---|" + "---:|" * (2 * len(systems) - 1)]
    rows = []
    for n in rounds:
        cells = []
        for x in systems:
            w = by.get((n, x))
            cells.append("-" if w is None else f"{bench.fmt(w['images_per_s'], 3)}, {bench.fmt(_little(w), 3)} "
                         f"({bench.fmt(w['p50_ms'], 0)} / {bench.fmt(w['p95_ms'], 0)})")
        first = by.get((n, systems[0]))
        ratio_cells = [f"{bench.fmt(_ratio(first, w), 2)} ({bench.fmt(_ratio(first, w, True), 2)})"
                       for w in (by.get((n, x)) for x in systems[1:])]
        rows.append(f"| {n + 1} ({', '.join(order(systems, n))}) | " + " | ".join(cells + ratio_cells) + " |")
    lines = [f"### {case.key} ({case.label}): c={bench.HIGH}, steps drawn from "
             f"{'/'.join(map(str, bench.STEP_MIX))}", "", *head, *rows, ""]
    for other, v in r.items():
        lines.append(f"- {systems[0]} / {other}: median {bench.fmt(v['median'], 2)}x over {len(v['per_round'])} "
                     f"rounds (range {bench.fmt(v['min'], 2)}-{bench.fmt(v['max'], 2)}x); by Little's law "
                     f"(c / mean latency) median {bench.fmt(v['little_median'], 2)}x (range "
                     f"{bench.fmt(v['little_min'], 2)}-{bench.fmt(v['little_max'], 2)}x)")
    for x in systems:
        ips = [w["images_per_s"] for w in windows if w["system"] == x]
        if ips:
            lines.append(f"- {x}: images/s median {bench.fmt(statistics.median(ips), 3)}, range "
                         f"{bench.fmt(min(ips), 3)}-{bench.fmt(max(ips), 3)}")
    return lines + [""]


def run_model(key: str, s: bench.Settings, args: argparse.Namespace, workdir: Path) -> dict[str, Any] | None:
    case = bench.make_case(key, s, workdir)
    if case is None:
        print(f"== {key}: skipped, no pipeline at {bench.SHIPPED_PIPELINE}", flush=True)
        return None
    print(f"\n== {case.key}: {case.label}", flush=True)
    reference, _ = bench.offline_run(case, s, False, workdir)
    windows: list[dict[str, Any]] = []
    for n in range(args.rounds):
        print(f"  round {n + 1}/{args.rounds}: {', '.join(order(args.systems, n))}", flush=True)
        for system in order(args.systems, n):
            time.sleep(1.0)  # let the previous server's processes leave the CPUs
            try:
                windows.append(one_window(system, case, s, reference, workdir, n))
            except (RuntimeError, httpx.HTTPError, ValueError, KeyError) as e:
                print(f"  {system}: FAILED: {e}", flush=True)
    r = ratios(windows, args.systems)
    return {"case": asdict(case), "windows": windows, "ratios": r,
            "markdown": markdown(case, windows, args.systems, r)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = bench.Settings(args.duration, args.warmup, bench.C1_STEPS, bench.STEP_MIX, bench.PREVIEW_STEPS,
                       (bench.HIGH,), bench.SD_SHAPED_SIZE, args.threads)
    meta = {"command": "python " + " ".join([f"benchmarks/{Path(__file__).name}", *sys.argv[1:]]),
            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": bench.machine(),
            "versions": bench.versions(), "revision": bench.revision()}
    workdir = Path(tempfile.mkdtemp(prefix="tandem-diffusion-rounds-"))
    print(f"diffusion rounds: {meta['machine']['cpus']} CPUs ({meta['machine']['cpu_model']}); logs in {workdir}",
          flush=True)
    results = [x for key in args.models if (x := run_model(key, s, args, workdir)) is not None]
    m = meta["machine"]
    text = "\n".join([f"Command: `{meta['command']}`", "",
                      f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), no GPU; date {meta['date']}; revision "
                      f"{meta['revision']}; {s.duration_s:g} s + warm-up {s.warmup_s:g} s per window (longer where "
                      f"a window needs it); torch threads {s.threads} per system; every server fresh per round.", "",
                      *(line for x in results for line in x["markdown"])])
    print("\n" + text)
    if args.markdown:
        args.markdown.write_text(text + "\n", encoding="utf-8")
    if args.json:
        data = {"meta": meta, "settings": asdict(s), "systems": args.systems,
                "models": [{k: v for k, v in x.items() if k != "markdown"} for x in results]}
        args.json.write_text(json.dumps(bench._clean(data), indent=2) + "\n", encoding="utf-8")
    complete = all(len(v["per_round"]) == args.rounds for x in results for v in x["ratios"].values())
    return 0 if results and complete else 1  # a failed window (server, image check) leaves a round short


if __name__ == "__main__":
    sys.exit(main())
