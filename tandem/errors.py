"""Tandem's exception tree; each error maps to one HTTP status at the process boundary.

    TandemError                              kind (ErrorKind, what crosses processes)
    ├── ClientError (4xx)
    │   ├── InvalidInput          400  invalid   malformed body, wrong shape or dtype, undecodable image
    │   ├── Unauthorized          401  unauthorized  missing or wrong API key
    │   ├── Forbidden             403  forbidden the key is valid but not enough (admin routes)
    │   ├── ModelNotFound         404  not_found unknown model or version
    │   ├── PayloadTooLarge       413  too_large body over the configured limit
    │   ├── Conflict              409  conflict  the operation clashes with the current state
    │   ├── TooManyTokens         422  validation prompt + max_new_tokens over the model's limit
    │   └── Overloaded            503  overloaded bounded queue full (backpressure; carries Retry-After)
    ├── ServerError (5xx)
    │   ├── WorkerDied            500  died      the accelerator worker holding the request died
    │   ├── InferenceFailed       500  failed    predict raised
    │   ├── InternalError         500  internal  a bug: an unexpected exception at a process boundary
    │   └── RequestTimeout        504  timeout   no answer within the model's timeout
    ├── ConfigError                    invalid tandem.yaml / server settings (at start, not per request)
    └── OptimizeError                  `tandem optimize` cannot go on (offline, not per request)
        ├── ExportError                torch.onnx could not export; names the operator and the exporter
        └── InvalidOnnx                corrupt ONNX file, or inputs that do not match its graph
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "ClientError", "ConfigError", "Conflict", "ErrorKind", "ExportError", "Forbidden", "InferenceFailed",
    "InternalError",
    "InvalidInput", "InvalidOnnx", "ModelNotFound", "OptimizeError", "Overloaded", "PayloadTooLarge",
    "RequestTimeout", "ServerError", "TandemError", "TooManyTokens", "Unauthorized", "WorkerDied", "error_for",
]


class ErrorKind(StrEnum):
    """What went wrong, as typed messages carry it between processes; each protocol maps it to a status once."""

    INVALID = "invalid"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    TOO_LARGE = "too_large"
    VALIDATION = "validation"
    OVERLOADED = "overloaded"
    DIED = "died"
    FAILED = "failed"
    INTERNAL = "internal"
    TIMEOUT = "timeout"


class TandemError(Exception):
    """Base of every Tandem error."""

    status: int = 500
    kind: ErrorKind = ErrorKind.INTERNAL


class ClientError(TandemError):
    status = 400
    kind = ErrorKind.INVALID


class InvalidInput(ClientError):
    status = 400
    kind = ErrorKind.INVALID


class ModelNotFound(ClientError):
    status = 404
    kind = ErrorKind.NOT_FOUND


class PayloadTooLarge(ClientError):
    status = 413
    kind = ErrorKind.TOO_LARGE


class Conflict(ClientError):
    status = 409
    kind = ErrorKind.CONFLICT


class TooManyTokens(ClientError):
    status = 422
    kind = ErrorKind.VALIDATION


class Unauthorized(ClientError):
    status = 401
    kind = ErrorKind.UNAUTHORIZED


class Forbidden(ClientError):
    status = 403
    kind = ErrorKind.FORBIDDEN


class Overloaded(ClientError):
    """Backpressure: the client should retry after `retry_after` seconds (sent as Retry-After)."""

    status = 503
    kind = ErrorKind.OVERLOADED

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ServerError(TandemError):
    status = 500


class WorkerDied(ServerError):
    status = 500
    kind = ErrorKind.DIED


class InferenceFailed(ServerError):
    status = 500
    kind = ErrorKind.FAILED


class InternalError(ServerError):
    """An unexpected exception caught at a process boundary (a bug), reported as 500 in the API's shape."""

    status = 500
    kind = ErrorKind.INTERNAL


class RequestTimeout(ServerError):
    status = 504
    kind = ErrorKind.TIMEOUT


_BY_KIND: dict[ErrorKind, type[TandemError]] = {
    ErrorKind.INVALID: InvalidInput, ErrorKind.UNAUTHORIZED: Unauthorized, ErrorKind.FORBIDDEN: Forbidden,
    ErrorKind.NOT_FOUND: ModelNotFound,
    ErrorKind.CONFLICT: Conflict, ErrorKind.TOO_LARGE: PayloadTooLarge, ErrorKind.VALIDATION: TooManyTokens,
    ErrorKind.OVERLOADED: Overloaded, ErrorKind.DIED: WorkerDied, ErrorKind.FAILED: InferenceFailed,
    ErrorKind.INTERNAL: InternalError, ErrorKind.TIMEOUT: RequestTimeout,
}


def error_for(kind: ErrorKind | str, message: str) -> TandemError:
    """The exception a typed message's error kind stands for (an unknown kind is internal)."""
    try:
        return _BY_KIND[ErrorKind(kind)](message)
    except ValueError:
        return InternalError(message)


class ConfigError(TandemError):
    """Invalid configuration; the message names the file, the field and the fix."""


class OptimizeError(TandemError):
    """The optimizer cannot go on; the message says why and what to change."""


class ExportError(OptimizeError):
    """A torch model failed to export to ONNX; the message names the operator and each exporter tried."""


class InvalidOnnx(OptimizeError):
    """An ONNX file is corrupt or invalid, or the inputs given do not match its graph."""
