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
    └── ConfigError                    invalid tandem.yaml / server settings (at start, not per request)
"""

from __future__ import annotations

__all__ = [
    "ClientError", "ConfigError", "InferenceFailed", "InvalidInput", "ModelNotFound", "Overloaded",
    "PayloadTooLarge", "RequestTimeout", "Conflict", "TooManyTokens", "ServerError", "TandemError", "WorkerDied",
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
