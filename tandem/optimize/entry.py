"""Write a model-repository entry that serves an optimized artefact with `runtime: onnxruntime`.

The new folder holds the artefact, its precision.yaml, a tandem.yaml (the source entry's settings
plus the runtime) and a model.py for pre/post-processing: a subclass of the source's Model when
that class can be imported by module name (the built-in repository), else a copy of its model.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from tandem.errors import OptimizeError
from tandem.model import Model

__all__ = ["claim_folder", "write_entry"]


def _importable(cls: type[Model], source_dir: Path) -> str | None:
    """The module name `cls` can be imported by: its own, or the built-in repository's path."""
    from tandem.serving.repository import default_repository

    if not cls.__module__.startswith("tandem_user_model_"):
        return cls.__module__
    try:
        rel = source_dir.resolve().relative_to(default_repository().resolve())
    except ValueError:
        return None
    return ".".join(("tandem", "default_repo", *rel.parts, "model"))


def _model_py(cls: type[Model], source_dir: Path) -> str:
    module = _importable(cls, source_dir)
    if module is not None:  # importable by name: subclass it, copy nothing
        return (f'"""{cls.__name__} of {module}, served from the optimized ONNX artefact (see tandem.yaml)."""\n\n'
                f"from {module} import {cls.__name__} as _Source\n\n\n"
                f"class {cls.__name__}(_Source):\n"
                f'    """Pre/post-processing of {cls.__name__}; ONNX Runtime runs the batches."""\n')
    return (source_dir / "model.py").read_text()


def _settings(source_dir: Path, name: str, artefact: str) -> dict[str, Any]:
    path = source_dir / "tandem.yaml"
    raw = yaml.safe_load(path.read_text()) if path.exists() else {}
    settings: dict[str, Any] = dict(raw or {})
    settings.pop("weights", None)  # the artefact carries the weights
    settings.update(name=name, runtime="onnxruntime", onnx={"path": artefact})
    return settings


def claim_folder(dest: Path) -> None:
    """Create `dest` for a written entry: empty, or written by tandem optimize before; else a clear error."""
    if dest.exists() and any(dest.iterdir()) and not (dest / ".tandem-optimized").exists():
        raise OptimizeError(f"{dest} exists and was not written by tandem optimize; choose another folder")
    dest.mkdir(parents=True, exist_ok=True)


def write_entry(dest: Path, *, name: str, source_dir: Path, model_class: type[Model], artefact: Path,
                precision_yaml: Path | None) -> Path:
    """Create `dest` (a model folder) serving `artefact`; refuses to overwrite a different entry."""
    claim_folder(dest)
    shutil.copyfile(artefact, dest / "model.onnx")
    if precision_yaml is not None and precision_yaml.exists():
        shutil.copyfile(precision_yaml, dest / "precision.yaml")
    (dest / "model.py").write_text(_model_py(model_class, source_dir))
    header = f"# Written by `tandem optimize` from {source_dir.name}: {artefact.parent.name} artefact.\n"
    (dest / "tandem.yaml").write_text(header + yaml.safe_dump(_settings(source_dir, name, "model.onnx"),
                                                              sort_keys=False))
    (dest / ".tandem-optimized").write_text("")
    return dest
