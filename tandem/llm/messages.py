"""Typed messages of the LLM kind (msgpack via msgspec); token ids are small, so they travel here.

    front ──Generate / Cancel / AdapterOp──▶ LLM worker       (PUSH/PULL, one socket per replica)
    front ◀──Tokens (one per front per step) / AdapterReply── LLM worker   (the front's result socket)

Front-bound messages carry `model` (the entry key), which is how the serving core's router finds
the entry's client without knowing this kind.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from tandem.errors import ErrorKind
from tandem.llm.params import SamplingParams

__all__ = ["AdapterInfo", "AdapterOp", "AdapterReply", "Cancel", "Generate", "TokenItem", "Tokens",
           "worker_decoder"]


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
    """One generated token of one request, or its error."""

    req_id: int
    token: int
    logprob: float = 0.0
    finish: Literal["", "length", "eos_token"] = ""
    error: str = ""
    error_kind: ErrorKind | None = None


class Tokens(msgspec.Struct, tag="tokens", array_like=True):
    """Everything one engine step produced for one front's requests."""

    model: str
    items: list[TokenItem]


class AdapterOp(msgspec.Struct, tag="adapter_op", array_like=True):
    """Load (name, path), unload (name) or list the adapters of an LLM worker."""

    op_id: int
    front: int
    kind: Literal["load", "unload", "list"]
    name: str = ""
    path: str = ""


class AdapterInfo(msgspec.Struct, array_like=True, frozen=True):
    """One adapter a worker knows: where it came from, its rank and size, whether it sits on the device."""

    name: str
    path: str
    rank: int
    nbytes: int
    on_device: bool
    load_ms: float


class AdapterReply(msgspec.Struct, tag="adapter_reply", array_like=True):
    """The outcome of an AdapterOp, with the adapters known afterwards."""

    model: str
    op_id: int
    error: str = ""
    error_kind: ErrorKind | None = None
    adapters: list[AdapterInfo] = msgspec.field(default_factory=list)


worker_decoder = msgspec.msgpack.Decoder(Generate | Cancel | AdapterOp)
