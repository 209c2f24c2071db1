"""Server-sent event responses for every kind's streaming routes.

Streams start only after the request was accepted (the kinds wait for the first event), so request
errors are ordinary JSON 4xx answers; an error after streaming began is sent as a final event in
the route's error shape. `close` (idempotent) runs when the body ends, and again as a background
task, which Starlette also runs when the client disconnected before the body was ever iterated.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

from tandem.errors import InternalError, TandemError
from tandem.serving.kinds import ErrorShape

__all__ = ["sse_stream"]

logger = logging.getLogger(__name__)
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _frame(data: dict[str, Any], named: bool) -> bytes:
    head = b"event: " + str(data.get("type", "message")).encode() + b"\n" if named else b""
    return head + b"data:" + orjson.dumps(data) + b"\n\n"


def sse_stream(events: AsyncIterator[dict[str, Any]], close: Callable[[], Awaitable[None]], shape: ErrorShape, *,
               done_marker: bool = False, named: bool = False) -> StreamingResponse:
    """Events from dicts (`named`: each with an `event:` line from its "type"), then `[DONE]` if asked."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield _frame(event, named)
            if done_marker:
                yield b"data: [DONE]\n\n"
        except TandemError as e:
            yield _frame(shape(e)[1], False)
        except Exception as e:  # keep serving others; the client sees why its stream ended
            logger.exception("stream failed")
            yield _frame(shape(InternalError(f"{type(e).__name__}: {e}"))[1], False)
        finally:
            await close()

    return StreamingResponse(body(), media_type="text/event-stream", headers=_SSE_HEADERS,
                             background=BackgroundTask(close))
