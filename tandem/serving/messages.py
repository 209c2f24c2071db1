"""Typed control messages between processes (msgpack via msgspec). Tensor bytes never travel here.

    front ──Task──────────▶ accelerator worker      (PUSH/PULL, one socket per replica)
    front ◀──Result──────── accelerator worker      (PUSH/PULL, one socket per front)
    supervisor ──Event────▶ fronts                   (PUB/SUB: replica down / up)
    worker, front ──Ready─▶ supervisor               (PUSH/PULL, start-up handshake)

Live model repository (Triton's extension; the supervisor owns every process, so fronts ask it):
    front ──RepoOp (index / load / unload)──▶ supervisor        (the control socket)
    front ◀──RepoReply── supervisor                               (events, for that front)
    fronts ◀──EntriesChanged── supervisor; ──EntriesAck──▶       (add clients / drain and drop them)

Other kinds define their own messages next to their code (e.g. `tandem/llm/messages.py`); every
message a worker sends to a front carries `model` (the entry key) so the front's router hands it to
that entry's client without knowing the kind.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = ["EntriesAck", "EntriesChanged", "EntrySource", "Event", "ModelStatus", "Ready", "ReplicaStatus", "RepoModel",
           "RepoOp", "RepoReply",
           "Result", "Task", "TensorMeta", "control_decoder", "encoder", "events_decoder", "task_decoder"]


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

    model: str  # entry uid: the front's router hands the result to that entry's client
    req_id: int
    outputs: list[TensorMeta]
    error: str = ""


class Event(msgspec.Struct, tag="event", array_like=True):
    """Supervisor news for fronts: replica `replica` of model `model` went down or came up."""

    kind: Literal["down", "up"]
    model: str
    replica: int


class Ready(msgspec.Struct, tag="ready", array_like=True):
    """Start-up handshake: a worker finished `setup` (or failed with `error`)."""

    role: Literal["front", "accel"]
    model: str
    index: int
    pid: int
    error: str = ""
    device: str = ""  # where an accelerator replica runs


class RepoOp(msgspec.Struct, tag="repo_op", array_like=True):
    """A front asks the supervisor to list the repository, or to load (start or replace) or unload a model."""

    op_id: int
    front: int
    kind: Literal["index", "load", "unload", "status"]
    name: str = ""


class RepoModel(msgspec.Struct, array_like=True, frozen=True):
    """One model version of the repository: served (READY) or not (UNAVAILABLE, with the reason)."""

    name: str
    version: str
    state: Literal["READY", "UNAVAILABLE"]
    reason: str = ""


class ReplicaStatus(msgspec.Struct, array_like=True, frozen=True):
    """One replica process of a served model version, as the supervisor sees it."""

    replica: int
    device: str  # as the replica reported at start ("" until it has)
    pid: int
    ready: bool
    restarts: int
    rss_bytes: int  # resident memory of the process; 0 where it cannot be read


class ModelStatus(msgspec.Struct, array_like=True, frozen=True):
    """A model version with what a console shows: kind, replicas, memory, and the kind's own facts."""

    name: str
    version: str
    kind: str
    state: Literal["READY", "UNAVAILABLE"]
    reason: str = ""
    instances: int = 0
    memory_limit: int = 0  # bytes; 0: none set
    card: dict[str, Any] = msgspec.field(default_factory=dict)  # Kind.card: what a playground needs
    replicas: list[ReplicaStatus] = msgspec.field(default_factory=list)


class RepoReply(msgspec.Struct, tag="repo_reply", array_like=True):
    """The outcome of a RepoOp, for front `front`."""

    op_id: int
    front: int
    error: str = ""
    error_kind: str = ""  # an ErrorKind value when error is set
    models: list[RepoModel] = msgspec.field(default_factory=list)
    status: list[ModelStatus] = msgspec.field(default_factory=list)  # for a "status" op


class EntrySource(msgspec.Struct, array_like=True, frozen=True):
    """Where an entry is defined, so each front builds the same ModelEntry the supervisor validated."""

    index: int
    folder: str  # the settings folder (tandem.yaml)
    code: str  # the folder whose model.py defines the class
    name: str
    version: str | None


class EntriesChanged(msgspec.Struct, tag="entries", array_like=True):
    """Fronts: add clients for `added` (ready replicas), then drain and drop the clients of `removed` uids."""

    op_id: int
    added: list[EntrySource] = msgspec.field(default_factory=list)
    removed: list[str] = msgspec.field(default_factory=list)


class EntriesAck(msgspec.Struct, tag="entries_ack", array_like=True):
    """A front applied an EntriesChanged (added clients exist; removed ones have no request left)."""

    op_id: int
    front: int
    error: str = ""


encoder = msgspec.msgpack.Encoder()
task_decoder = msgspec.msgpack.Decoder(Task)  # what a tensor worker receives
control_decoder = msgspec.msgpack.Decoder(Ready | RepoOp | EntriesAck)  # what the supervisor receives
events_decoder = msgspec.msgpack.Decoder(Event | RepoReply | EntriesChanged)  # what fronts subscribe to
