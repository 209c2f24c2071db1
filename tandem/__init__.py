"""Tandem: serve and accelerate AI models on whatever compute a machine has."""

from tandem.errors import InvalidInput
from tandem.model import Model, Request, RequestSpec, TensorSpec

__version__ = "0.1.0"
__all__ = ["InvalidInput", "Model", "Request", "RequestSpec", "TensorSpec", "__version__"]
