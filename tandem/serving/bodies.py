"""HTTP body helpers shared by every route of a front: bounded reads and JSON responses."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from tandem.errors import InvalidInput, PayloadTooLarge

__all__ = ["json_object", "json_response", "read_limited"]


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
