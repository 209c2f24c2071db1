"""tandem.train: wrap a plain PyTorch loop (Trainer), with a measured data loader, AMP, DDP and compile helpers.

See Trainer's docstring for the five-line adoption. Names are imported on first use, so `tandem` commands that
only need a sub-module (`tandem data resize`, `tandem train`'s launcher) start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module defining it
_EXPORTS = {
    "BatchTiming": "tandem.train.data", "Loader": "tandem.train.data", "LoaderSettings": "tandem.train.data",
    "SampleError": "tandem.train.data", "SplitDataset": "tandem.train.data", "StepClock": "tandem.train.data",
    "PrecisionError": "tandem.train.amp", "RunLog": "tandem.train.logs", "StepRecord": "tandem.train.logs",
    "Trainer": "tandem.train.trainer", "cache_dataset_folder": "tandem.train.cache",
    "Diagnosis": "tandem.train.diagnose", "diagnose": "tandem.train.diagnose",
    "CommOptions": "tandem.train.distributed", "DistEnv": "tandem.train.distributed",
    "RecompileError": "tandem.train.compile", "compile_module": "tandem.train.compile",
    "compile_stats": "tandem.train.compile", "compiler_seconds": "tandem.train.compile",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tandem.train' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
