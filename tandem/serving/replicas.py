"""Reaching an entry's replicas from a front: one `ReplicaSet` for every kind's client.

A replica set holds one PUSH socket per replica, whether it is up, and how many of this front's
requests each one holds; a replica that died gets a fresh socket so that messages queued for the
dead process never reach its successor. Request ids come from one counter per process.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import zmq

from tandem.errors import Overloaded

__all__ = ["ReplicaSet", "least_busy", "next_request_id", "push_socket"]

_ids = itertools.count((os.getpid() & 0xFFFFFF) << 32 | 1)


def next_request_id() -> int:
    """A request id unique across this server's fronts (the pid is in the high bits)."""
    return next(_ids)


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
        raise Overloaded(f"model {key} has no live replica (restarting); retry shortly", retry_after=2.0)
    return min(live, key=lambda i: outstanding[i])


class ReplicaSet:
    """Sockets, health and outstanding counts of one entry's replicas, as one front sees them."""

    def __init__(self, ctx: Any, endpoints: list[str], key: str, unbounded: bool = False) -> None:
        self.ctx, self.endpoints, self.key, self.unbounded = ctx, endpoints, key, unbounded
        self.sockets = [push_socket(ctx, e, unbounded) for e in endpoints]
        self.up = [True] * len(endpoints)
        self.outstanding = [0] * len(endpoints)

    def __len__(self) -> int:
        return len(self.endpoints)

    @property
    def ready(self) -> bool:
        return any(self.up)

    def pick(self) -> int:
        """The least busy live replica (503 when none is live)."""
        return least_busy(self.up, self.outstanding, self.key)

    def live(self) -> list[int]:
        return [i for i, ok in enumerate(self.up) if ok]

    async def send(self, replica: int, payload: bytes) -> None:
        await self.sockets[replica].send(payload, copy=False)

    def mark_up(self, replica: int) -> None:
        self.up[replica] = True

    def mark_down(self, replica: int) -> None:
        """The replica died: stop choosing it and drop what is queued for it (fresh socket)."""
        self.up[replica] = False
        self.sockets[replica].close(linger=0)
        self.sockets[replica] = push_socket(self.ctx, self.endpoints[replica], self.unbounded)
