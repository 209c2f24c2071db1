"""Tandem's exception tree; each error maps to one HTTP status at the process boundary.

    TandemError
    ├── ClientError (4xx)
    │   ├── InvalidInput          400  malformed body, wrong shape or dtype, undecodable image
    │   ├── ModelNotFound         404  unknown model or version
    │   ├── PayloadTooLarge       413  body over the configured limit
    │   ├── Conflict              409  the operation clashes with the current state
    │   ├── TooManyTokens         422  prompt + max_new_tokens over the model's limit
    │   └── Overloaded            503  bounded queue full (backpressure)
    ├── ServerError (5xx)
    │   ├── WorkerDied            500  the accelerator worker holding the request died
    │   ├── InferenceFailed       500  predict raised
    │   └── RequestTimeout        504  no answer within the model's timeout
    ├── ConfigError                    invalid tandem.yaml / server settings (at start, not per request)
    └── OptimizeError                  `tandem optimize` cannot go on (offline, not per request)
        ├── ExportError                torch.onnx could not export; names the operator and the exporter
        └── InvalidOnnx                corrupt ONNX file, or inputs that do not match its graph
"""

from __future__ import annotations

__all__ = [
    "ClientError", "ConfigError", "Conflict", "ExportError", "InferenceFailed", "InvalidInput", "InvalidOnnx",
    "ModelNotFound", "OptimizeError", "Overloaded", "PayloadTooLarge", "RequestTimeout", "ServerError",
    "TandemError", "TooManyTokens", "WorkerDied",
]


class TandemError(Exception):
    """Base of every Tandem error."""

    status: int = 500


class ClientError(TandemError):
    status = 400


class InvalidInput(ClientError):
    status = 400


class ModelNotFound(ClientError):
    status = 404


class PayloadTooLarge(ClientError):
    status = 413


class Conflict(ClientError):
    status = 409


class TooManyTokens(ClientError):
    status = 422


class Overloaded(ClientError):
    status = 503


class ServerError(TandemError):
    status = 500


class WorkerDied(ServerError):
    status = 500


class InferenceFailed(ServerError):
    status = 500


class RequestTimeout(ServerError):
    status = 504


class ConfigError(TandemError):
    """Invalid configuration; the message names the file, the field and the fix."""


class OptimizeError(TandemError):
    """The optimizer cannot go on; the message says why and what to change."""


class ExportError(OptimizeError):
    """A torch model failed to export to ONNX; the message names the operator and each exporter tried."""


class InvalidOnnx(OptimizeError):
    """An ONNX file is corrupt or invalid, or the inputs given do not match its graph."""
