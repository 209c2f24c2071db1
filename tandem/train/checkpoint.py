"""Checkpoints as directories written atomically, with a `latest` pointer beside them.

    checkpoints/
      step-0000100/
        model.safetensors   the unwrapped module's state dict (safetensors: no pickle)
        state.pt            optimizer, scaler, RNG per rank, counters, loader positions, extra
                            (torch.save; read back with torch.load(weights_only=True), never full pickle)
      latest                the name of the newest complete checkpoint (one line)

A checkpoint is written to `.step-XXXXXXX.tmp-PID/` and renamed into place with os.replace, then `latest`
is replaced the same way, so a process killed at any moment leaves either the old or the new checkpoint.
Files are not fsynced: the guarantee is against a killed process (the page cache survives), not power loss.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["latest_checkpoint", "load_checkpoint", "rng_state", "save_checkpoint", "set_rng_state"]

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
LATEST = "latest"


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch, CUDA, python, numpy) as tensors and plain values (weights_only safe)."""
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _replace_dir(tmp: Path, final: Path) -> None:
    # os.replace cannot rename a directory over a non-empty one: move the old one aside first.
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _write_latest(folder: Path, name: str) -> None:
    tmp = folder / f".{LATEST}.tmp-{os.getpid()}"
    tmp.write_text(name + "\n")
    os.replace(tmp, folder / LATEST)


def save_checkpoint(path: Path, *, model: nn.Module, state: dict[str, Any]) -> Path:
    """Write `model` (safetensors) and `state` (torch.save) to the directory `path` atomically; point
    `path.parent/latest` at it."""
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".*.tmp-*"):   # left by a process killed while saving
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    tmp = folder / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / MODEL_FILE))
    torch.save(state, tmp / STATE_FILE)
    _replace_dir(tmp, path)
    _write_latest(folder, path.name)
    logger.info("saved checkpoint %s", path)
    return path


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint `folder/latest` names, or None when there is none yet."""
    pointer = Path(folder) / LATEST
    if not pointer.is_file():
        return None
    path = Path(folder) / pointer.read_text().strip()
    return path if (path / STATE_FILE).is_file() else None


def resolve(path: Path) -> Path:
    """A checkpoint directory from itself, or from a checkpoints folder holding `latest`."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no checkpoint at {path} (neither {STATE_FILE} nor a '{LATEST}' pointer)")
    return found


def load_checkpoint(path: Path, *, model: nn.Module, device: torch.device) -> dict[str, Any]:
    """Load the weights into `model` (strict) and return the rest of the state (weights_only=True)."""
    path = resolve(path)
    load_model(model, str(path / MODEL_FILE), strict=True, device=str(device))
    state: dict[str, Any] = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    return state
