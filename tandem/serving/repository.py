"""Model repository: one folder per model with `model.py` (a Model subclass) and `tandem.yaml`.

A folder may instead hold version sub-folders (`1/`, `2/`), each with a `tandem.yaml` and
optionally its own `model.py`; a version without one uses the model folder's `model.py`, so
versions that differ only in settings or weights share their code.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from tandem.config import BatchingConfig, ModelConfig, available_cpus, load_model_config
from tandem.errors import ConfigError
from tandem.model import Model, TensorSpec

__all__ = ["ModelEntry", "default_repository", "instantiate", "load_model_class", "scan_repository"]


def default_repository() -> Path:
    return Path(__file__).resolve().parent.parent / "default_repo"


def load_model_class(folder: Path, key: str) -> type[Model]:
    """Import `folder/model.py` and return its single Model subclass."""
    path = folder / "model.py"
    if not path.exists():
        raise ConfigError(f"{folder}: no model.py (fix: add one defining a tandem.Model subclass)")
    mod_name = "tandem_user_model_" + "".join(c if c.isalnum() else "_" for c in key)
    spec = importlib.util.spec_from_file_location(mod_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(f"{path}: import failed: {type(e).__name__}: {e}") from e
    classes = [c for c in vars(module).values()
               if inspect.isclass(c) and issubclass(c, Model) and c is not Model
               and c.__module__ == mod_name]
    if len(classes) != 1:
        names = ", ".join(c.__name__ for c in classes) or "none"
        raise ConfigError(f"{path}: expected exactly one tandem.Model subclass, found {names}")
    cls = classes[0]
    if not cls.inputs or not cls.outputs:
        raise ConfigError(f"{path}: {cls.__name__} must declare `inputs` and `outputs` TensorSpec lists")
    return cls


@dataclass(frozen=True)
class ModelEntry:
    """A model version as the server runs it: its config plus everything derived from it."""

    index: int
    config: ModelConfig
    batching: BatchingConfig
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_request_rows: int
    code: Path  # the folder whose model.py defines the class

    @property
    def key(self) -> str:
        return self.config.key

    @property
    def is_llm(self) -> bool:
        return self.config.kind == "llm"

    @property
    def runtime(self) -> str:
        """What runs each batch: "torch" (model.py's predict) or "onnxruntime" (the `onnx:` artefact)."""
        return self.config.runtime

    @property
    def platform(self) -> str:
        """The KServe v2 metadata `platform` of this entry."""
        return _PLATFORMS.get(self.config.runtime, "tandem_pytorch")

    @property
    def item_bytes(self) -> int:
        return max(sum(s.max_bytes for s in self.inputs), sum(s.max_bytes for s in self.outputs))

    @property
    def slot_payload(self) -> int:
        if self.is_llm:  # token ids travel in messages: no arena
            return 0
        # Each tensor is 64-byte aligned inside a slot.
        n = len(self.inputs) + len(self.outputs)
        return self.item_bytes * self.max_request_rows + 64 * n

    def threads(self) -> int:
        t = self.config.threads
        return t if isinstance(t, int) else max(1, available_cpus() // self.config.instances)

    def device(self) -> str:
        dev = self.config.device
        if dev != "auto":
            return dev
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


_PLATFORMS = {"torch": "tandem_pytorch", "onnxruntime": "onnxruntime_onnx"}


def _entry(index: int, folder: Path, code: Path, name: str, version: str | None) -> ModelEntry:
    config = load_model_config(folder, name, version)
    if config.kind == "llm":
        return llm_entry(index, config)
    artefact = config.onnx_path()
    if artefact is not None and not artefact.is_file():
        raise ConfigError(f"{folder / 'tandem.yaml'}: onnx.path {artefact} not found (fix: write the ONNX "
                          "artefact there, e.g. with `tandem optimize`, or correct onnx.path)")
    cls = load_model_class(code, config.key)
    batching = config.batching or BatchingConfig(
        max_batch_size=cls.max_batch_size, max_batch_delay_ms=cls.max_batch_delay_ms)
    rows = min(batching.max_batch_size, config.max_request_rows)
    return ModelEntry(index, config, batching, tuple(cls.inputs), tuple(cls.outputs), max(1, rows), code)


def llm_entry(index: int, config: ModelConfig) -> ModelEntry:
    """An LLM entry: no model.py, no tensor signature; its worker streams tokens."""
    assert config.llm is not None
    model_dir = config.llm.model_dir(config.path)
    if not (model_dir / "config.json").exists():
        raise ConfigError(f"{config.path / 'tandem.yaml'}: llm.path {config.llm.path!r} -> {model_dir} has no "
                          "config.json (fix: point it at a Hugging Face model folder)")
    return ModelEntry(index, config, BatchingConfig(max_batch_size=config.llm.max_batch_size), (), (), 1,
                      config.path)


def _is_llm_folder(folder: Path) -> bool:
    path = folder / "tandem.yaml"
    if (folder / "model.py").exists() or not path.exists():
        return False
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return False
    return isinstance(raw, dict) and raw.get("kind") == "llm"


_Found = tuple[Path, Path, str, str | None]  # (settings folder, code folder, name, version)


def _versions(child: Path) -> list[_Found]:
    found: list[_Found] = []
    for v in sorted(p for p in child.iterdir() if p.is_dir()):
        if not ((v / "model.py").exists() or (v / "tandem.yaml").exists()):
            continue
        code = v if (v / "model.py").exists() else child
        if not (code / "model.py").exists():
            raise ConfigError(f"{v}: version folder has no model.py and {child} has none to share "
                              "(fix: add model.py to one of them)")
        found.append((v, code, child.name, v.name))
    return found


def _model_folders(repo: Path) -> list[_Found]:
    """Every model version in `repo`: a model folder, or its version sub-folders."""
    if (repo / "model.py").exists():  # a single model folder passed directly
        return [(repo, repo, repo.name, None)]
    found: list[_Found] = []
    for child in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        versions = _versions(child)
        if versions:
            found.extend(versions)
        elif (child / "model.py").exists() or _is_llm_folder(child):
            found.append((child, child, child.name, None))
    return found


def scan_repository(repo: Path) -> list[ModelEntry]:
    """Load and validate every model of a repository; errors name the file and field."""
    if not repo.is_dir():
        raise ConfigError(f"{repo}: model repository not found (fix: pass a folder of model folders)")
    folders = _model_folders(repo)
    if not folders:
        raise ConfigError(f"{repo}: no model folders with a model.py inside")
    entries = [_entry(i, *found) for i, found in enumerate(folders)]
    keys = [e.key for e in entries]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ConfigError(f"{repo}: model versions defined twice: {dupes} (fix: give each a distinct version)")
    return entries


def instantiate(entry: ModelEntry) -> Model:
    """Build the user's Model object for this entry (in whichever process calls it)."""
    cls = load_model_class(entry.code, entry.key)
    return cls(entry.config.path, entry.config.params, entry.config.weights_path())
