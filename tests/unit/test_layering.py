"""The serving core names no model kind: no module under tandem/serving imports a kind or the optimizer."""

from __future__ import annotations

import ast
from pathlib import Path

import tandem

SERVING = Path(tandem.__file__).resolve().parent / "serving"
# Packages the core must never import: model kinds, the built-in kind registry, the optimizer.
FORBIDDEN = ("tandem.llm", "tandem.diffusion", "tandem.kinds", "tandem.optimize", "tandem.train", "tandem.pipeline")


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def test_serving_core_imports_no_kind() -> None:
    files = sorted(SERVING.rglob("*.py"))
    assert len(files) > 10  # the walk really covers the core
    upward = [f"{p.relative_to(SERVING.parent)}:{line} imports {name}" for p in files
              for line, name in _imports(p) if name.startswith(FORBIDDEN)]
    assert upward == []


def test_the_walk_would_catch_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom tandem.llm.client import LLMClient\n")
    assert [name for _, name in _imports(bad) if name.startswith(FORBIDDEN)] == ["tandem.llm.client"]


def test_every_builtin_kind_implements_the_interface() -> None:
    from tandem.kinds import builtin_kinds

    kinds = builtin_kinds()
    assert sorted(kinds) == ["diffusion", "llm", "model"]
    for name, kind in kinds.items():
        assert kind.name == name
        for attr in ("entry", "arena_bytes", "worker", "client", "routes", "describe"):
            assert callable(getattr(kind, attr)), (name, attr)
        assert all(hasattr(t, "__struct_fields__") and "model" in t.__struct_fields__ for t in kind.messages)


def test_a_function_step_starts_without_numpy() -> None:
    """`import tandem.<sub>` must not load the public API's numpy (pipeline function steps pay it per step)."""
    import subprocess
    import sys

    code = "import sys, tandem.pipeline.call; assert 'numpy' not in sys.modules, 'numpy was imported'; " \
           "from tandem import Model; assert 'numpy' in sys.modules and Model.__module__ == 'tandem.model'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
