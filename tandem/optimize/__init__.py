"""Model optimizer: export to ONNX, convert to int8/fp16/bf16 on ONNX Runtime, and a precision doctor
that keeps just the nodes that must stay FP32 to meet a tolerance.

    from tandem.optimize import OptimizeOptions, Tolerance, module_source, optimize_onnx

    source = module_source(my_module, sample, calibration_batches, out_dir)   # or entry_source / onnx_source
    outcome = optimize_onnx(source.model, source.calibration, out_dir,
                            OptimizeOptions(targets=("int8-dynamic",), tolerance=Tolerance(atol=1e-3)))
    outcome.artefact          # the file to serve; outcome.results: every target's PrecisionResult

Heavy libraries (onnx, onnxruntime, torch) load on first use of these names, not on import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tandem.optimize.api import OptimizeOptions, Outcome, optimize_onnx
    from tandem.optimize.sources import Source, entry_source, module_source, onnx_source
    from tandem.optimize.types import PrecisionResult, Tolerance

__all__ = ["OptimizeOptions", "Outcome", "PrecisionResult", "Source", "Tolerance", "entry_source", "module_source",
           "onnx_source", "optimize_onnx"]

_HOME = {"OptimizeOptions": "api", "Outcome": "api", "optimize_onnx": "api", "Source": "sources",
         "entry_source": "sources", "module_source": "sources", "onnx_source": "sources",
         "PrecisionResult": "types", "Tolerance": "types"}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'tandem.optimize' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"tandem.optimize.{_HOME[name]}"), name)
