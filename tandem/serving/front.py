"""Front process: HTTP server plus the CPU worker role (pre/post-processing).

The proxy and the CPU workers are merged into N identical front processes that share one listening
socket: a request is parsed, preprocessed, dispatched and postprocessed in the same process, which
saves a hop (and a copy) per request compared with a separate proxy. The accelerator is never
touched here. Each entry's kind builds the front's client for it (tensor models run their
`setup_cpu` there; LLMs load their tokenizer).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn

from tandem.config import ServerConfig
from tandem.serving._proc import die_with_parent
from tandem.serving.app import build_app
from tandem.serving.auth import Auth
from tandem.serving.kinds import FrontState, Kinds
from tandem.serving.layout import RunLayout
from tandem.serving.messages import Ready
from tandem.serving.repository import ModelEntry
from tandem.serving.router import Router
from tandem.serving.worker_proc import report_ready

__all__ = ["run_front"]

logger = logging.getLogger(__name__)


def run_front(index: int, entries: list[ModelEntry], kinds: Kinds, layout: RunLayout, sock: socket.socket,
              server: ServerConfig, parent_pid: int) -> None:
    """Process entry point (started with spawn by the supervisor)."""
    die_with_parent(parent_pid)
    logging.basicConfig(level=server.log_level.upper(), format=f"%(asctime)s front[{index}] %(message)s")
    if server.front_nice:
        os.nice(server.front_nice)
    state = FrontState(default_model=server.default_model)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        try:
            router = Router(entries, kinds, layout, index, server.drain_timeout_s)
        except Exception as e:
            logger.exception("front set-up failed")
            report_ready(layout, Ready(role="front", model="", index=index, pid=os.getpid(),
                                       error=f"{type(e).__name__}: {e}"))
            raise SystemExit(1) from None
        state.clients = router.clients
        state.repository = router
        router.start()
        report_ready(layout, Ready(role="front", model="", index=index, pid=os.getpid()))
        yield
        await router.close()

    app = build_app(state, kinds, lifespan=lifespan, auth=Auth.from_server(server))
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=max(1, round(server.drain_timeout_s)), loop="auto", http="auto")
    uvicorn.Server(config).run(sockets=[sock])
