"""Where `tandem optimize` gets its graph and its calibration batches.

- a model-repository entry (a folder, or a name in the built-in repository): calibration requests
  (a JSONL file of request bodies, or a folder of files, one body each) go through the model's own
  `preprocess` and are batched as the server batches them; `predict` is exported to ONNX;
- a `torch.nn.Module` (or any callable on a dict of tensors) with a sample and calibration batches;
- an `.onnx` file with calibration inputs in an `.npz` (one array per graph input, rows = samples).
"""

from __future__ import annotations

import json
import mimetypes
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from tandem.errors import ConfigError, InvalidInput, OptimizeError
from tandem.model import Model, Request
from tandem.optimize.onnx_io import load_onnx
from tandem.optimize.runtime import Feeds

__all__ = ["Source", "batches_of", "entry_source", "load_requests", "module_source", "onnx_source"]


@dataclass
class Source:
    """A graph to optimize, its calibration batches, and (for repository entries) where it came from."""

    model: onnx.ModelProto
    calibration: list[Feeds]
    name: str
    entry_dir: Path | None = None
    model_class: type[Model] | None = None
    exporter: str = ""


def load_requests(path: Path, limit: int | None = None) -> list[Request]:
    """Calibration requests: JSONL (one JSON body per line) or a folder (one raw body per file)."""
    if not path.exists():
        raise OptimizeError(f"calibration data {path} not found")
    requests: list[Request] = []
    if path.is_dir():
        for file in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
            kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
            requests.append(Request(body=file.read_bytes(), content_type=kind))
    else:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                body = json.loads(line)
            except ValueError as e:
                raise OptimizeError(f"{path}:{n}: not a JSON request body: {e}") from None
            requests.append(Request(body=line.encode(), content_type="application/json", json=body))
    if not requests:
        raise OptimizeError(f"calibration data {path} holds no requests")
    return requests[:limit]


def batches_of(items: Sequence[dict[str, np.ndarray]], specs: Sequence[Any], batch_size: int) -> list[Feeds]:
    """Items (no batch dim) stacked into batches of `batch_size`, padded as the server pads them."""
    from tandem.serving.batcher import assemble

    out = []
    for start in range(0, len(items), batch_size):
        chunk = [{k: v[None, ...] for k, v in item.items()} for item in items[start:start + batch_size]]
        out.append(assemble(chunk, tuple(specs)))
    return out


def _preprocess_all(model: Model, requests: Sequence[Request], where: Path) -> list[dict[str, np.ndarray]]:
    model.setup_cpu()
    items = []
    for i, request in enumerate(requests):
        try:
            items.append(model.preprocess(request))
        except InvalidInput as e:
            raise OptimizeError(f"calibration request {i + 1} of {where}: the model refused it: {e}") from None
    return items


def entry_source(entry: Path, calibration: Path | None, out_dir: Path, batch_size: int = 32,
                 limit: int | None = None) -> Source:
    """Export a repository entry's `predict` and batch its calibration requests through `preprocess`."""
    import torch

    from tandem.optimize.export import export_callable
    from tandem.serving.repository import default_repository, instantiate, scan_repository
    from tandem.serving.tensor_kind import TensorKind

    folder = entry if entry.is_dir() else default_repository() / str(entry)
    if not folder.is_dir():
        raise OptimizeError(f"{entry}: not a model folder nor a model of the built-in repository")
    try:
        found = scan_repository(folder, {"model": TensorKind()})[0]
    except ConfigError as e:
        raise OptimizeError(str(e)) from None
    calibration = calibration or folder / "calibration.jsonl"
    requests = load_requests(calibration, limit)
    model = instantiate(found)
    items = _preprocess_all(model, requests, calibration)
    feeds = batches_of(items, found.inputs, batch_size)
    model.setup("cpu")
    sample = {k: torch.from_numpy(v[:2]) for k, v in feeds[0].items()}
    path = out_dir / "export.onnx"
    out_dir.mkdir(parents=True, exist_ok=True)
    result = export_callable(model.predict, sample, path, output_names=[s.name for s in found.outputs])
    graph = load_onnx(result.path)
    path.unlink(missing_ok=True)
    return Source(graph, feeds, found.config.name, folder, type(model), result.exporter)


def module_source(module: Callable[..., Any], sample: dict[str, Any], calibration: Sequence[Feeds],
                  out_dir: Path, name: str = "model") -> Source:
    """Export a torch module (called with the sample's tensors by keyword) or a dict -> dict callable."""
    from tandem.optimize.export import export_callable, export_module

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "export.onnx"
    import torch

    if isinstance(module, torch.nn.Module):
        result = export_module(module, sample, path)
    else:
        result = export_callable(module, sample, path)
    graph = load_onnx(result.path)
    path.unlink(missing_ok=True)
    return Source(graph, list(calibration), name, exporter=result.exporter)


def onnx_source(path: Path, calibration: Path | None, batch_size: int = 32) -> Source:
    """An ONNX file plus calibration inputs from an .npz (one array per graph input, rows = samples)."""
    graph = load_onnx(path)
    if calibration is None:
        raise OptimizeError(f"{path}: an ONNX model needs --calibration inputs.npz (one array per graph input, "
                            "first axis = samples)")
    try:
        arrays = dict(np.load(calibration, allow_pickle=False))
    except (OSError, ValueError) as e:
        raise OptimizeError(f"{calibration}: not a readable .npz of arrays: {e}") from None
    rows = {k: v.shape[0] for k, v in arrays.items()}
    if len(set(rows.values())) != 1:
        raise OptimizeError(f"{calibration}: arrays have different numbers of samples: {rows}")
    n = next(iter(rows.values()))
    feeds = [{k: v[i:i + batch_size] for k, v in arrays.items()} for i in range(0, n, batch_size)]
    return Source(graph, feeds, path.stem)
