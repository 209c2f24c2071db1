"""HTTP body helpers shared by every route of a front: bounded reads and JSON responses."""

from __future__ import annotations

import math
from typing import Any

import orjson
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from tandem.errors import InvalidInput, PayloadTooLarge

__all__ = ["field_error", "json_object", "json_response", "opt_float", "opt_int", "read_limited"]


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json", headers=headers)


async def read_limited(request: HTTPRequest, limit: int, owner: str) -> bytes:
    """The whole body, or 413 as soon as it (or its declared length) exceeds `limit` bytes of `owner`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes is over the {limit}-byte limit of {owner}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body is over the {limit}-byte limit of {owner}")
        chunks.append(chunk)
    return b"".join(chunks)


def json_object(body: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object; 400 naming the problem otherwise."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(f"malformed JSON body: {e}") from None
    if not isinstance(data, dict):
        raise InvalidInput("the JSON body must be an object")
    return data


def field_error(param: str, message: str) -> InvalidInput:
    """A 400 about one request field; `param` is reported by OpenAI-shaped errors and shown by the console."""
    e = InvalidInput(message)
    e.param = param  # type: ignore[attr-defined]
    return e


def opt_int(body: dict[str, Any], key: str, lo: int, hi: int | None = None, *, name: str = "") -> int | None:
    """An optional integer field in [lo, hi]; null or absent gives None. `name` is how errors call it."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bounds = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise field_error(name or key, f"{name or key} must be an integer {bounds}; got {value!r}")
    return value


def opt_float(body: dict[str, Any], key: str, lo: float, hi: float | None, *, lo_open: bool = False,
              name: str = "") -> float | None:
    """An optional finite number with lo < / <= value <= hi; null or absent gives None."""
    value = body.get(key)
    if value is None:
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and (hi is None or value <= hi)
    if not ok:
        bounds = f"{'>' if lo_open else '>='} {lo:g}" + (f" and <= {hi:g}" if hi is not None else "")
        raise field_error(name or key, f"{name or key} must be a number {bounds}; got {value!r}")
    return float(value)
