"""The interface a model kind implements to be served; the core names no kind.

A kind (tensor models, LLMs, later diffusion) says how its repository entries are built, how much
shared memory a front needs per entry, which process runs its replicas, how a front talks to them,
which HTTP routes it adds and in which error shape they answer, and which typed messages its
workers send back to the fronts. `tandem/kinds.py` registers the built-in ones; the supervisor,
the fronts and the repository receive the registry and look kinds up by `tandem.yaml`'s `kind`.

    repository ──Kind.entry──▶ ModelEntry ──Kind.worker──▶ replica processes
    front: Kind.client(entry) ──▶ FrontClient (on_message / replica_up / replica_down / ready)
           Kind.routes(front state) ──▶ RouteSpec (path, method, handler, error shape, metric label)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import msgspec
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from tandem.config import ModelConfig
from tandem.errors import TandemError

if TYPE_CHECKING:
    import zmq.asyncio

    from tandem.serving.layout import RunLayout
    from tandem.serving.repository import ModelEntry

__all__ = ["Access", "ErrorShape", "FrontClient", "FrontState", "Handler", "Kind", "Kinds", "RouteDoc", "RouteSpec",
           "Schema", "WorkerTarget", "plain_error"]

Handler = Callable[[HTTPRequest], Awaitable[Response]]
# Who may call a route: no key, the API key (or the admin key), or only the admin key.
Access = Literal["public", "user", "admin"]
# A TandemError -> (HTTP status, JSON body) in one API's convention (TGI, OpenAI, plain {"error": ...}).
ErrorShape = Callable[[TandemError], tuple[int, dict[str, Any]]]
# A replica process's entry point: (entry, replica index, layout, supervisor pid, log level).
WorkerTarget = Callable[["ModelEntry", int, "RunLayout", int, str], None]


def plain_error(e: TandemError) -> tuple[int, dict[str, Any]]:
    """Tandem's own error body: `{"error": message}` with the error's status."""
    return e.status, {"error": str(e)}


class FrontClient(Protocol):
    """A front's link to the replicas of one entry; the router hands it every message for that entry."""

    key: str
    name: str
    kind: str

    @property
    def ready(self) -> bool: ...

    @property
    def in_flight(self) -> int: ...  # requests of this front using the client now (drained before close)

    def on_message(self, msg: Any) -> None: ...

    def replica_up(self, replica: int) -> None: ...

    def replica_down(self, replica: int) -> None: ...

    async def close(self) -> None: ...


class RepoControl(Protocol):
    """The live repository as a front reaches it (the router forwards to the supervisor)."""

    async def repo_op(self, kind: str, name: str = "", timeout_s: float = 900.0) -> list[Any]: ...


@dataclass
class FrontState:
    """What a front's routes see: every entry's client by uid, the repository (filled when the front connects)."""

    default_model: str | None = None
    clients: dict[str, FrontClient] = field(default_factory=dict)
    repository: RepoControl | None = None

    def of_kind(self, kind: str) -> list[Any]:
        return [c for c in self.clients.values() if c.kind == kind]

    @property
    def names(self) -> set[str]:
        return {c.name for c in self.clients.values()}


Schema = dict[str, Any]  # a JSON Schema (2020-12, as OpenAPI 3.1 uses it)


@dataclass(frozen=True)
class RouteDoc:
    """A route's OpenAPI description, kept next to the route (`tandem/serving/openapi.py` assembles them).

    `request` and each response map a media type to the JSON Schema of its body (binary bodies:
    `{"type": "string", "format": "binary"}`); `errors` are the 4xx/5xx statuses the route answers
    in `error`'s shape (the error boundary's 500 is added for every route); `headers` are optional
    request headers (name -> schema).
    """

    summary: str
    tag: str
    request: dict[str, Schema] | None = None
    responses: dict[int, dict[str, Schema]] = field(default_factory=dict)
    errors: tuple[int, ...] = ()
    error: Schema | None = None  # None: Tandem's plain {"error": str}
    headers: dict[str, Schema] = field(default_factory=dict)
    description: str = ""
    body_required: bool = True  # False: `request` may also be an empty body


@dataclass(frozen=True)
class RouteSpec:
    """One HTTP route a kind adds. `model_of` names the metric label (checked against served names)."""

    path: str
    method: str
    endpoint: str  # the metric's `endpoint` label
    handler: Handler
    shape: ErrorShape = plain_error
    model_of: Callable[[HTTPRequest], str] | None = None
    doc: RouteDoc | None = None  # its OpenAPI description (GET /openapi.json); a test requires one
    # Who may call it (README "Auth"): "public" (health probes), "user" (the API key; the default, so a
    # new route is protected unless it says otherwise) or "admin" (mutating: the admin key).
    access: Access = "user"
    # A path several kinds answer (`/predictions/{model}`, `/invocations`): the first route whose
    # `claims(request)` is true handles it, else the one route of that path without `claims`.
    claims: Callable[[HTTPRequest], bool] | None = None


class Kind(Protocol):
    """A model kind: what the core needs to serve its entries (see the module docstring)."""

    name: str
    needs_code: bool  # True: a folder needs model.py; False: a tandem.yaml naming this kind is enough
    messages: tuple[type[msgspec.Struct], ...]  # front-bound messages; each has a `model` field (entry key)

    def entry(self, index: int, config: ModelConfig, code: Path) -> ModelEntry: ...

    def arena_bytes(self, entry: ModelEntry) -> int: ...  # per-slot payload of a front's arena; 0 = none

    def worker(self, entry: ModelEntry) -> WorkerTarget: ...

    def client(self, entry: ModelEntry, ctx: zmq.asyncio.Context, layout: RunLayout,
               front: int) -> FrontClient: ...

    def routes(self, state: FrontState) -> list[RouteSpec]: ...

    def describe(self, entry: ModelEntry) -> str: ...  # one line for the start-up banner

    # JSON-able facts a client needs to call the entry well (sizes, adapters, task, limits): the
    # console's playgrounds read them from GET /tandem/v1/models. Runs in the supervisor.
    def card(self, entry: ModelEntry) -> dict[str, Any]: ...


Kinds = dict[str, Kind]
