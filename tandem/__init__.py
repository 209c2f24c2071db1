"""Tandem: serve and accelerate AI models on whatever compute a machine has.

The public names load on first use (PEP 562), so `import tandem.<subpackage>` does not pay for numpy:
`import tandem.pipeline.call` (a pipeline's function step) takes about 15 ms instead of 85.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tandem.errors import InvalidInput
    from tandem.model import Model, Request, RequestSpec, TensorSpec

__version__ = "0.1.0"
__all__ = ["InvalidInput", "Model", "Request", "RequestSpec", "TensorSpec", "__version__"]

_HOME = {"InvalidInput": "tandem.errors", "Model": "tandem.model", "Request": "tandem.model",
         "RequestSpec": "tandem.model", "TensorSpec": "tandem.model"}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'tandem' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value
