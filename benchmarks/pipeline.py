"""Pipeline runner benchmark (issue 13, item 7), one run, same machine.

Parts (--parts, comma-separated; default all):

    overhead  the same DAGs of trivial steps (`true`) run by three systems: Tandem's local runner (cache off),
              GNU make -j (a DAG runner every machine has) and a bare Python loop of subprocess.run (the floor: a
              process start and nothing else). DAGs: a chain of --chain steps and a fan-out/fan-in of --fan
              steps. Reported: wall time per step for each system and ratios, and Tandem's own per-step
              overhead from its clocks: a step's process start minus the exit of its last dependency (goal
              < 50 ms: median, p95, max).
    cached    a fully cached re-run of examples/pipelines/lora.py against a running `tandem serve` (goal < 2 s,
              measured as the wall time of the `tandem pipeline run` command, Python start included); the first,
              uncached run's time is printed beside it.
    deploy    the lora pipeline's deploy step under load: p50/p99 and failures of a served model's requests
              before, during and after the hot load of the trained adapter.

    .venv/bin/python benchmarks/pipeline.py                           # ~3 min on 2 cores
    .venv/bin/python benchmarks/pipeline.py --parts overhead --markdown
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tandem.pipeline.runner import run_pipeline  # noqa: E402
from tandem.pipeline.spec import Pipeline, Step  # noqa: E402


def _chain(n: int) -> Pipeline:
    pipe = Pipeline(name="chain")
    for i in range(n):
        pipe.add(Step(name=f"s{i}", command=["true"], after=[f"s{i - 1}"] if i else [], cache=False,
                      resources={"cpu": 0.1}))  # type: ignore[arg-type]
    return pipe


def _fan(n: int) -> Pipeline:
    pipe = Pipeline(name="fan")
    pipe.add(Step(name="start", command=["true"], cache=False))
    for i in range(n):
        pipe.add(Step(name=f"w{i}", command=["true"], after=["start"], cache=False,
                      resources={"cpu": 0.1}))  # type: ignore[arg-type]
    pipe.add(Step(name="end", command=["true"], after=[f"w{i}" for i in range(n)], cache=False))
    return pipe


def _makefile(pipe: Pipeline) -> str:
    lines = [".PHONY: all " + " ".join(s.name for s in pipe.steps), f"all: {pipe.steps[-1].name}"]
    for s in pipe.steps:
        lines.append(f"{s.name}: {' '.join(sorted(s.upstream()))}\n\t@true")
    return "\n".join(lines) + "\n"


def _tandem(pipe: Pipeline, home: Path) -> dict[str, float]:
    t0 = time.perf_counter()
    res = run_pipeline(pipe, None, home)
    wall = time.perf_counter() - t0
    assert res.status == "succeeded", res.failed()
    over = [(r.started_at - r.ready_at) * 1e3 for r in res.steps.values() if pipe.step(r.name).upstream()]
    over.sort()
    return {"wall_s": wall, "per_step_ms": wall / len(pipe.steps) * 1e3, "overhead_median_ms": statistics.median(over),
            "overhead_p95_ms": over[int(0.95 * (len(over) - 1))], "overhead_max_ms": over[-1]}


def _make(pipe: Pipeline, folder: Path, jobs: int) -> dict[str, float] | None:
    if shutil.which("make") is None:
        return None
    mk = folder / f"{pipe.name}.mk"
    mk.write_text(_makefile(pipe))
    t0 = time.perf_counter()
    subprocess.run(["make", "-s", f"-j{jobs}", "-f", str(mk)], check=True, cwd=folder)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "per_step_ms": wall / len(pipe.steps) * 1e3}


def _floor(pipe: Pipeline) -> dict[str, float]:
    t0 = time.perf_counter()
    for name in pipe.order():
        subprocess.run(pipe.step(name).command or ["true"], check=True)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "per_step_ms": wall / len(pipe.steps) * 1e3}


def part_overhead(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cpus = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        for pipe in (_chain(args.chain), _fan(args.fan)):
            rows: dict[str, Any] = {}
            best: dict[str, dict[str, float]] = {}
            for rep in range(args.repeats):   # interleaved repeats, best of each system
                for system, fn in (("tandem", lambda p=pipe, r=rep: _tandem(p, Path(tmp) / f"h{r}")),
                                   ("make -j", lambda p=pipe: _make(p, Path(tmp), cpus)),
                                   ("subprocess loop", lambda p=pipe: _floor(p))):
                    got = fn()
                    if got is not None and (system not in best or got["wall_s"] < best[system]["wall_s"]):
                        best[system] = got
            for system, got in best.items():
                rows[system] = {k: round(v, 2) for k, v in got.items()}
            t = best["tandem"]["wall_s"]
            for system in best:
                if system != "tandem":
                    rows[system]["tandem_wall_ratio"] = round(t / best[system]["wall_s"], 2)
            out[f"{pipe.name} ({len(pipe.steps)} steps)"] = rows
    return out


def _markdown(results: dict[str, Any]) -> str:
    lines = []
    for dag, rows in results.get("overhead", {}).items():
        lines += [f"**{dag}**", "", "| system | wall s | per step ms | Tandem wall / this | Tandem step overhead "
                                  "median / p95 / max ms |", "|---|---|---|---|---|"]
        for system, r in rows.items():
            over = (f"{r['overhead_median_ms']} / {r['overhead_p95_ms']} / {r['overhead_max_ms']}"
                    if "overhead_median_ms" in r else "")
            lines.append(f"| {system} | {r['wall_s']} | {r['per_step_ms']} | {r.get('tandem_wall_ratio', '')} | "
                         f"{over} |")
        lines.append("")
    for key in ("cached", "deploy"):
        if key in results:
            lines += [f"**{key}**", "", "```", json.dumps(results[key], indent=2), "```", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="overhead,cached,deploy")
    ap.add_argument("--chain", type=int, default=40)
    ap.add_argument("--fan", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    results: dict[str, Any] = {"machine": f"{platform.node()} {len(os.sched_getaffinity(0))} CPUs"}
    if "overhead" in parts:
        results["overhead"] = part_overhead(args)
    if parts & {"cached", "deploy"}:
        from benchmarks._pipeline_lora import part_cached_and_deploy

        results.update(part_cached_and_deploy(parts))
    print(json.dumps(results, indent=2))
    if args.markdown:
        print(_markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
