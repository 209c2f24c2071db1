"""OpenAI's error object, shared by every kind's OpenAI-compatible routes (LLMs, embeddings).

    {"error": {"message": str, "type": "invalid_request_error" | ..., "param": field | null, "code": kind}}

The openai client turns `message` into its exception's text. An error may carry the request field
it is about as a `param` attribute (e.g. `input`), which is reported as `param`.
"""

from __future__ import annotations

from typing import Any

from tandem.errors import TandemError
from tandem.serving.kinds import Schema
from tandem.serving.openapi import obj

__all__ = ["OPENAI_ERROR", "openai_error"]

_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "not_found_error",
                 413: "invalid_request_error", 422: "invalid_request_error", 503: "overloaded_error"}

OPENAI_ERROR: Schema = obj({"error": obj({"message": {"type": "string"}, "type": {"type": "string"},
                                          "param": {"type": ["string", "null"]},
                                          "code": {"type": ["string", "null"]}})})


def openai_error(e: TandemError) -> tuple[int, dict[str, Any]]:
    """OpenAI's error object, which the openai client turns into the exception's message."""
    kind = _OPENAI_TYPES.get(e.status, "server_error" if e.status >= 500 else "invalid_request_error")
    param = getattr(e, "param", None)
    return e.status, {"error": {"message": str(e), "type": kind, "param": param if isinstance(param, str) else None,
                                "code": str(e.kind)}}
