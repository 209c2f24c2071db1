"""Reaching a model's replicas, shared by tensor models (dispatch.py) and LLMs (llm/client.py)."""

from __future__ import annotations

from typing import Any

import zmq

from tandem.errors import Overloaded

__all__ = ["least_busy", "push_socket"]


def push_socket(ctx: Any, endpoint: str, unbounded: bool = False) -> Any:
    """A PUSH socket connected to `endpoint` that drops unsent messages on close (no linger).

    `unbounded` lifts zmq's send high-water mark, for callers whose own queue bounds what is in
    flight. `ctx` may be a zmq or a zmq.asyncio context; the socket is of the same kind.
    """
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    if unbounded:
        sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(endpoint)
    return sock


def least_busy(up: list[bool], outstanding: list[int], key: str) -> int:
    """The live replica with the fewest requests outstanding; 503 when none is live."""
    live = [i for i, ok in enumerate(up) if ok]
    if not live:
        raise Overloaded(f"model {key} has no live replica (restarting); retry shortly")
    return min(live, key=lambda i: outstanding[i])
