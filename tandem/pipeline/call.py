"""Run one function step: ``python -m tandem.pipeline.call module:qualname --arg NAME=VALUE ... --results-dir D``.

The same argv runs a function step locally and in an Argo container, so both behave alike. Each ``--arg``
value (a string) is converted to the parameter's annotation (int, float, bool, str, Path); a returned dict's
items are written to ``D/KEY`` as text (the step's output parameters). A missing or extra argument is an error
naming it; the exit code is 2 for a bad call, 1 when the function raises (its traceback goes to the log).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_type_hints

__all__ = ["convert", "main", "resolve"]


def resolve(target: str) -> Callable[..., Any]:
    """The callable named ``module:qualname``."""
    module_name, _, qualname = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{target} is not callable")
    return obj  # type: ignore[no-any-return]


def convert(value: str, annotation: Any) -> Any:
    """`value` as `annotation` (str when unannotated)."""
    if annotation is bool:
        low = value.lower()
        if low not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{value!r} is not a boolean")
        return low in ("true", "1", "yes")
    if annotation in (int, float, Path):
        return annotation(value)
    if annotation in (dict, list) or getattr(annotation, "__origin__", None) in (dict, list):
        return json.loads(value)
    return value


def _kwargs(fn: Callable[..., Any], pairs: list[str]) -> dict[str, Any]:
    try:
        hints = get_type_hints(fn)
    except Exception:   # unresolvable annotations: pass strings
        hints = {}
    params = inspect.signature(fn).parameters
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--arg {pair!r}: write NAME=VALUE")
        if name not in params:
            raise SystemExit(f"argument {name!r}: {fn.__qualname__} takes {', '.join(params)}")
        try:
            out[name] = convert(value, hints.get(name))
        except ValueError as exc:
            raise SystemExit(f"argument {name!r}: {exc}") from None
    missing = [n for n, p in params.items() if p.default is p.empty and n not in out
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if missing:
        raise SystemExit(f"missing argument(s) {missing} for {fn.__qualname__}")
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    ap = argparse.ArgumentParser(prog="python -m tandem.pipeline.call")
    ap.add_argument("target")
    ap.add_argument("--arg", action="append", default=[])
    ap.add_argument("--results-dir", type=Path, default=None)
    ns = ap.parse_args(argv)
    try:
        fn = resolve(ns.target)
    except (ImportError, AttributeError, TypeError) as exc:
        print(f"cannot load {ns.target}: {exc}", file=sys.stderr)
        return 2
    try:
        kwargs = _kwargs(fn, ns.arg)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    result = fn(**kwargs)
    if isinstance(result, dict):
        if ns.results_dir is None:
            print("the function returned results but no --results-dir was given", file=sys.stderr)
            return 2
        ns.results_dir.mkdir(parents=True, exist_ok=True)
        for key, value in result.items():
            (ns.results_dir / str(key)).write_text(value if isinstance(value, str) else json.dumps(value))
    return 0


if __name__ == "__main__":
    sys.exit(main())
