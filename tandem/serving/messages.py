"""Typed control messages between processes (msgpack via msgspec). Tensor bytes never travel here.

    front ──Task──────────▶ accelerator worker      (PUSH/PULL, one socket per replica)
    front ◀──Result──────── accelerator worker      (PUSH/PULL, one socket per front)
    supervisor ──Event────▶ fronts                   (PUB/SUB: replica down / up)
    worker, front ──Ready─▶ supervisor               (PUSH/PULL, start-up handshake)
"""

from __future__ import annotations

import msgspec

__all__ = ["Event", "Ready", "Result", "Task", "TensorMeta", "decoder", "encoder"]


class TensorMeta(msgspec.Struct, array_like=True, frozen=True):
    """Where one tensor lies in a slot: numpy dtype string (e.g. '<f4'), shape, byte offset."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int


class Task(msgspec.Struct, tag="task", array_like=True):
    """Run `rows` items of one request whose inputs are in (arena of `front`, `slot`)."""

    req_id: int
    front: int
    slot: int
    rows: int
    length: int  # longest variable dimension, for length-aware batching
    inputs: list[TensorMeta]
    enqueued: float  # time.monotonic() (system-wide on Linux) when the front sent it
    expect: int = 1  # the front's requests bound for this replica, this one included (see batcher)


class Result(msgspec.Struct, tag="result", array_like=True):
    """Outputs of one request written back into its slot, or an error."""

    req_id: int
    outputs: list[TensorMeta]
    error: str = ""


class Event(msgspec.Struct, tag="event", array_like=True):
    """Supervisor news for fronts: kind is 'down' or 'up' for replica `replica` of model `model`."""

    kind: str
    model: str
    replica: int


class Ready(msgspec.Struct, tag="ready", array_like=True):
    """Start-up handshake: a worker finished `setup` (or failed with `error`)."""

    role: str
    model: str
    index: int
    pid: int
    error: str = ""
    detail: str = ""


Message = Task | Result | Event | Ready
encoder = msgspec.msgpack.Encoder()
decoder = msgspec.msgpack.Decoder(Message)
