"""Typed control messages between processes (msgpack via msgspec). Tensor bytes never travel here.

    front ──Task──────────▶ accelerator worker      (PUSH/PULL, one socket per replica)
    front ◀──Result──────── accelerator worker      (PUSH/PULL, one socket per front)
    supervisor ──Event────▶ fronts                   (PUB/SUB: replica down / up)
    worker, front ──Ready─▶ supervisor               (PUSH/PULL, start-up handshake)

LLM entries stream tokens instead (token ids are small, so they travel in the messages):
    front ──Generate / Cancel / AdapterOp──▶ LLM worker
    front ◀──Tokens (one per front per step) / AdapterReply── LLM worker
"""

from __future__ import annotations

from typing import Any

import msgspec

from tandem.llm.params import SamplingParams

__all__ = ["AdapterOp", "AdapterReply", "Cancel", "Event", "Generate", "Ready", "Result", "Task", "TensorMeta",
           "TokenItem", "Tokens", "decoder", "encoder"]


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


class Generate(msgspec.Struct, tag="gen", array_like=True):
    """Start generating for one request: prompt token ids, sampling parameters, adapter ('' = base)."""

    req_id: int
    front: int
    prompt: list[int]
    params: SamplingParams
    adapter: str = ""


class Cancel(msgspec.Struct, tag="cancel", array_like=True):
    """The client went away (or a stop sequence matched): free the request's slot now."""

    req_id: int


class TokenItem(msgspec.Struct, array_like=True):
    """One generated token of one request, or its error. finish: '' | 'length' | 'eos_token'."""

    req_id: int
    token: int
    logprob: float = 0.0
    finish: str = ""
    error: str = ""
    error_kind: str = ""  # '' | 'not_found' | 'invalid' | 'overloaded'


class Tokens(msgspec.Struct, tag="tokens", array_like=True):
    """Everything one engine step produced for one front's requests."""

    model: str
    items: list[TokenItem]


class AdapterOp(msgspec.Struct, tag="adapter_op", array_like=True):
    """Load ('load', name, path), unload ('unload', name) or list ('list') adapters of an LLM worker."""

    op_id: int
    front: int
    kind: str
    name: str = ""
    path: str = ""


class AdapterReply(msgspec.Struct, tag="adapter_reply", array_like=True):
    """The outcome of an AdapterOp, with the adapters known afterwards (dicts of AdapterInfo fields)."""

    model: str
    op_id: int
    error: str = ""
    error_kind: str = ""
    adapters: list[dict[str, Any]] = msgspec.field(default_factory=list)


Message = Task | Result | Event | Ready | Generate | Cancel | Tokens | AdapterOp | AdapterReply
encoder = msgspec.msgpack.Encoder()
decoder = msgspec.msgpack.Decoder(Message)
