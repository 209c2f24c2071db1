"""Evaluation steps: a metrics JSON artifact plus one output parameter per metric, for ``when`` gates.

A function step's evaluation function takes ``metrics_file`` and ends with ``return write_metrics(metrics_file,
{...})``: the JSON goes to the artifact, the returned dict becomes the step's output parameters.

A command step runs through this module, which reads the JSON the command wrote and writes each metric's
output-parameter file (``templates.evaluate`` builds the argv)::

    python -m tandem.pipeline.evaluate --metrics-file M --result accuracy=R1 -- CMD ARG ...

The command must write a JSON object of numbers to M (its argv names it with ``{outputs.metrics}``); a metric
that is missing or not a number fails the step, naming it.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

__all__ = ["main", "read_metrics", "write_metrics"]


def write_metrics(path: Path | str, metrics: Mapping[str, float | int]) -> dict[str, float]:
    """Write `metrics` as a JSON object to `path` and return them (a function step's output parameters)."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"metric {name!r} must be a finite number, got {value!r}")
        out[name] = float(value)
    Path(path).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    return out


def read_metrics(path: Path, names: list[str]) -> dict[str, float]:
    """The metrics `names` from a JSON file; a missing file, field or non-number is a ValueError naming it."""
    if not path.is_file():
        raise ValueError(f"the command wrote no metrics file at {path} (pass {{outputs.metrics}} to it)")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object of metrics, got {type(data).__name__}")
    missing = [n for n in names if n not in data]
    if missing:
        raise ValueError(f"{path} lacks metric(s) {missing}; it has {sorted(data)}")
    for n in names:
        if isinstance(data[n], bool) or not isinstance(data[n], int | float):
            raise ValueError(f"metric {n!r} in {path} must be a number, got {data[n]!r}")
    return {n: float(data[n]) for n in names}


def main(argv: list[str] | None = None) -> int:
    """Run the command after ``--``, then turn its metrics JSON into output-parameter files."""
    ap = argparse.ArgumentParser(prog="python -m tandem.pipeline.evaluate")
    ap.add_argument("--metrics-file", type=Path, required=True)
    ap.add_argument("--result", action="append", default=[], help="METRIC=FILE: where the value goes")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    ns = ap.parse_args(argv)
    command = ns.command[1:] if ns.command[:1] == ["--"] else ns.command
    if not command:
        print("no command given after --", file=sys.stderr)
        return 2
    results = dict(pair.split("=", 1) for pair in ns.result)
    rc = subprocess.call(command)
    if rc != 0:
        print(f"the evaluation command exited with {rc}", file=sys.stderr)
        return rc
    try:
        metrics = read_metrics(ns.metrics_file, list(results))
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 1
    for name, file in results.items():
        Path(file).write_text(repr(metrics[name]))
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
