"""Content hashes for the step cache: files, folders, and a step's key."""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import sys
from pathlib import Path

from tandem.pipeline.spec import Step

__all__ = ["cache_key", "code_hash", "content_hash"]

_KEY_VERSION = "1"   # bump when the key's recipe changes, so old cache entries stop matching
_CHUNK = 1 << 20


def content_hash(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's (relative path, file hash) list; "missing" when absent."""
    if path.is_file():
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        return h.hexdigest()
    if path.is_dir():
        h = hashlib.sha256(b"dir\0")
        for p in sorted(path.rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts:
                h.update(f"{p.relative_to(path).as_posix()}\0{content_hash(p)}\0".encode())
        return h.hexdigest()
    return "missing"


def code_hash(step: Step, workdir: Path) -> str:
    """The code a step runs: its function's module file, argv elements naming files here, and `code:` paths."""
    parts: list[str] = []
    if step.function:
        module = step.function.split(":", 1)[0]
        origin = _module_file(module, workdir)
        parts.append(f"{module}={content_hash(origin) if origin else 'unknown'}")
    for arg in step.command or []:
        if "{" in arg or len(arg) > 300:
            continue
        p = Path(arg) if Path(arg).is_absolute() else workdir / arg
        try:
            if p.is_file():
                parts.append(f"{arg}={content_hash(p)}")
        except OSError:   # a name too long or otherwise odd: not a file
            continue
    for c in step.code:
        parts.append(f"{c}={content_hash(workdir / c)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _module_file(module: str, workdir: Path) -> Path | None:
    """The source file of `module` as the step's process finds it (its folder first on the path), not importing
    it: the runner stays light and a module's import-time side effects run only in the step."""
    search: list[str] | None = [str(workdir), *sys.path]
    spec = None
    for part in module.split("."):
        spec = importlib.machinery.PathFinder.find_spec(part, search)
        if spec is None:
            break
        search = list(spec.submodule_search_locations or [])
    if spec is None:   # an installed package behind an import hook (editable installs): ask the import system
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            return None
    return Path(spec.origin) if spec is not None and spec.origin else None


def cache_key(step: Step, inputs: dict[str, str], upstream: dict[str, str], workdir: Path) -> str:
    """The key of one step run: definition, input artifact hashes, values it reads, code, tandem's version."""
    import tandem

    definition = step.model_dump(include={"name", "command", "function", "args", "inputs", "outputs", "env",
                                          "image", "code"})
    blob = json.dumps({"v": _KEY_VERSION, "tandem": tandem.__version__, "step": definition, "inputs": inputs,
                       "values": upstream, "code": code_hash(step, workdir)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
