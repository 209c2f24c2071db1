"""Model repository: one folder per model with `model.py` (a Model subclass) and `tandem.yaml`.

A folder may instead hold version sub-folders (`1/`, `2/`), each with a `tandem.yaml` and
optionally its own `model.py`; a version without one uses the model folder's `model.py`, so
versions that differ only in settings or weights share their code. A folder with only a
`tandem.yaml` is an entry when its `kind:` names a kind that needs no code (e.g. `kind: llm`).
Each entry is built by its kind (`Kind.entry`); this module names no kind.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from tandem.config import BatchingConfig, ModelConfig, available_cpus, load_model_config
from tandem.errors import ConfigError
from tandem.model import Model, TensorSpec, check_signature

if TYPE_CHECKING:
    from tandem.serving.kinds import Kinds

__all__ = ["Found", "ModelEntry", "build_entry", "default_repository", "find_model", "instantiate", "load_model_class",
           "repository_versions", "resolve_device", "scan_repository", "share_cpus", "tensor_entry"]


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
    try:
        check_signature(cls)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: {e}") from None
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
    # The `device` setting of every worker replica that shares this machine, this entry's own
    # included; the supervisor sets it when it spawns the workers (`share_cpus`), and `threads()`
    # splits the CPUs among those that run on the CPU. Empty: not known (an entry built outside a
    # server, e.g. by `tandem optimize` or a test): only this entry's own replicas count.
    replica_devices: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return self.config.key

    @property
    def uid(self) -> str:
        """Unique for the server's lifetime, also while a replaced version drains: routes messages."""
        return f"{self.config.key}@{self.index}"

    @property
    def platform(self) -> str:
        """The KServe v2 metadata `platform` of this entry."""
        return _PLATFORMS.get(self.config.runtime, "tandem_pytorch")

    @property
    def item_bytes(self) -> int:
        return max(sum(s.max_bytes for s in self.inputs), sum(s.max_bytes for s in self.outputs))

    @property
    def slot_payload(self) -> int:
        """Bytes of one request's slot: every tensor of max_request_rows rows, each 64-byte aligned."""
        n = len(self.inputs) + len(self.outputs)
        return self.item_bytes * self.max_request_rows + 64 * n

    def threads(self) -> int:
        """Intra-op threads (torch, ONNX Runtime) of each replica: `threads: N`, else a fair slice of the CPUs.

        `auto` splits the CPUs among the worker replicas in `replica_devices` that run on the CPU,
        at least one thread each: when every worker takes all cores, several models on one machine
        oversubscribe it (3 models on 2 cores timed out requests at low load). A replica on a GPU
        counts in no one's share and keeps CPUs / instances, as its predict does not run on them.
        """
        t = self.config.threads
        if isinstance(t, int):
            return t
        sharing = self.config.instances
        if self.replica_devices and not self.device().startswith("cuda"):
            sharing = sum(1 for d in self.replica_devices if not resolve_device(d).startswith("cuda"))
        return max(1, available_cpus() // max(1, sharing))

    def device(self) -> str:
        return resolve_device(self.config.device)


def resolve_device(device: str) -> str:
    """A `device` setting as it runs here: `auto` is CUDA when torch sees a GPU, else the CPU.

    Imports torch only for `auto`, so the supervisor can count explicit devices without it.
    """
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def share_cpus(entry: ModelEntry, entries: Iterable[ModelEntry]) -> ModelEntry:
    """`entry` as its workers start beside the server's `entries`: with every replica's device recorded.

    `entries` is the set the server runs once these workers are up (`entry` counts once, whether
    it is in there or not). Devices stay as configured: `auto` is resolved in the worker, which
    imports torch anyway. When the set changes later (a live load or unload), workers already
    running keep the threads they started with, which is acceptable: re-splitting would need a
    message to every running worker. A worker started or restarted afterwards gets the new share.
    """
    others = [e for e in entries if e.uid != entry.uid]
    devices = tuple(e.config.device for e in (entry, *others) for _ in range(e.config.instances))
    return dataclasses.replace(entry, replica_devices=devices)


_PLATFORMS = {"torch": "tandem_pytorch", "onnxruntime": "onnxruntime_onnx"}


def tensor_entry(index: int, config: ModelConfig, code: Path) -> ModelEntry:
    """A tensor-model entry: model.py's Model subclass gives the signature and default batching."""
    artefact = config.onnx_path()
    if artefact is not None and not artefact.is_file():
        raise ConfigError(f"{config.path / 'tandem.yaml'}: onnx.path {artefact} not found (fix: write the ONNX "
                          "artefact there, e.g. with `tandem optimize`, or correct onnx.path)")
    cls = load_model_class(code, config.key)
    batching = config.batching or BatchingConfig(
        max_batch_size=cls.max_batch_size, max_batch_delay_ms=cls.max_batch_delay_ms)
    rows = min(batching.max_batch_size, config.max_request_rows)
    return ModelEntry(index, config, batching, tuple(cls.inputs), tuple(cls.outputs), max(1, rows), code)


def _entry(index: int, kinds: Kinds, folder: Path, code: Path, name: str, version: str | None) -> ModelEntry:
    config = load_model_config(folder, name, version)
    kind = kinds.get(config.kind)
    if kind is None:
        raise ConfigError(f"{folder / 'tandem.yaml'}: kind {config.kind!r} is not served by this build "
                          f"(fix: one of {sorted(kinds)})")
    return kind.entry(index, config, code)


def _codeless_kind(folder: Path, kinds: Kinds) -> bool:
    """A folder without model.py whose tandem.yaml names a kind that needs none."""
    path = folder / "tandem.yaml"
    if (folder / "model.py").exists() or not path.exists():
        return False
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return False
    kind = kinds.get(raw.get("kind", "")) if isinstance(raw, dict) else None
    return kind is not None and not kind.needs_code


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


def _model_folders(repo: Path, kinds: Kinds) -> list[_Found]:
    """Every model version in `repo`: a model folder, or its version sub-folders."""
    if (repo / "model.py").exists():  # a single model folder passed directly
        return [(repo, repo, repo.name, None)]
    found: list[_Found] = []
    for child in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        versions = _versions(child)
        if versions:
            found.extend(versions)
        elif (child / "model.py").exists() or _codeless_kind(child, kinds):
            found.append((child, child, child.name, None))
    return found


Found = _Found


def find_model(repo: Path, kinds: Kinds, name: str) -> list[_Found]:
    """The version folders of the model served as `name` (its tandem.yaml `name`, else its folder name)."""
    if not repo.is_dir():
        raise ConfigError(f"{repo}: model repository not found")
    matches = []
    for found in _model_folders(repo, kinds):
        folder, _, default_name, version = found
        if default_name == name or load_model_config(folder, default_name, version).name == name:
            matches.append(found)
    return matches


def repository_versions(repo: Path, kinds: Kinds) -> list[tuple[str, str]]:
    """(name, version) of every model version in the repository, read from tandem.yaml only; broken ones skipped."""
    out = []
    for folder, _, default_name, version in _model_folders(repo, kinds) if repo.is_dir() else []:
        try:
            config = load_model_config(folder, default_name, version)
        except ConfigError:
            out.append((default_name, version or "1"))
            continue
        out.append((config.name, config.version))
    return out


def build_entry(index: int, kinds: Kinds, found: _Found) -> ModelEntry:
    """The entry of one found version folder (the same on every process that builds it)."""
    return _entry(index, kinds, *found)


def scan_repository(repo: Path, kinds: Kinds, *, allow_empty: bool = False) -> list[ModelEntry]:
    """Load and validate every model of a repository with the kinds given; errors name the file and field.

    `allow_empty`: an empty repository is fine (models are added at run time through the repository API)."""
    if not repo.is_dir():
        raise ConfigError(f"{repo}: model repository not found (fix: pass a folder of model folders)")
    folders = _model_folders(repo, kinds)
    if not folders and not allow_empty:
        raise ConfigError(f"{repo}: no model folders with a model.py inside (fix: add one, or start with "
                          "--model-control explicit|poll to add models at run time)")
    entries = [_entry(i, kinds, *found) for i, found in enumerate(folders)]
    keys = [e.key for e in entries]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ConfigError(f"{repo}: model versions defined twice: {dupes} (fix: give each a distinct version)")
    return entries


def instantiate(entry: ModelEntry) -> Model:
    """Build the user's Model object for this entry (in whichever process calls it)."""
    cls = load_model_class(entry.code, entry.key)
    return cls(entry.config.path, entry.config.params, entry.config.weights_path())
