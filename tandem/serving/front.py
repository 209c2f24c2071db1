"""Front process: HTTP server plus the CPU worker role (pre/post-processing).

The proxy and the CPU workers are merged into N identical front processes that share one listening
socket: a request is parsed, preprocessed, dispatched and postprocessed in the same process, which
saves a hop (and a copy) per request compared with a separate proxy. The accelerator is never
touched here.
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
from tandem.serving.dispatch import Dispatcher
from tandem.serving.layout import RunLayout, report_ready
from tandem.serving.messages import Ready
from tandem.serving.proxy import Front, build_app
from tandem.serving.repository import ModelEntry, instantiate

__all__ = ["run_front"]

logger = logging.getLogger(__name__)


def run_front(index: int, entries: list[ModelEntry], layout: RunLayout, sock: socket.socket,
              server: ServerConfig, parent_pid: int) -> None:
    """Process entry point (started with spawn by the supervisor)."""
    die_with_parent(parent_pid)
    logging.basicConfig(level=server.log_level.upper(), format=f"%(asctime)s front[{index}] %(message)s")
    if server.front_nice:
        os.nice(server.front_nice)
    try:
        objects = {}
        for entry in entries:
            if entry.is_llm:  # its tokenizer loads with the dispatcher's LLMClient
                continue
            model = instantiate(entry)
            model.setup_cpu()
            objects[entry.key] = model
    except Exception as e:
        logger.exception("setup_cpu failed")
        report_ready(layout, Ready("front", "", index, os.getpid(), error=f"{type(e).__name__}: {e}"))
        raise SystemExit(1) from None

    front = Front(objects, server.default_model)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        dispatcher = Dispatcher(entries, layout, index)
        front.attach(dispatcher)
        dispatcher.start()
        report_ready(layout, Ready("front", "", index, os.getpid()))
        yield
        await dispatcher.close()

    app = build_app(front, lifespan=lifespan)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=max(1, round(server.drain_timeout_s)), loop="auto", http="auto")
    uvicorn.Server(config).run(sockets=[sock])
