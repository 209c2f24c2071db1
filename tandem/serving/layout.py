"""Names of a running server's sockets and arenas, derived from one run directory.

Every process computes the same names from the same `RunLayout`, so no addresses are negotiated.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import zmq

from tandem.serving.messages import Ready, encoder

T = TypeVar("T")
logger = logging.getLogger(__name__)

__all__ = ["RunLayout", "report_ready", "setup_or_report"]


@dataclass(frozen=True)
class RunLayout:
    """The run directory (sockets, metrics) and the shared-memory name prefix of one server."""

    run_dir: Path
    shm_dir: Path
    shm_prefix: str  # e.g. "tandem-<supervisor pid>-<random>"
    n_fronts: int

    def task_endpoint(self, model_index: int, replica: int) -> str:
        return f"ipc://{self.run_dir}/task-{model_index}-{replica}"

    def result_endpoint(self, front: int) -> str:
        return f"ipc://{self.run_dir}/result-{front}"

    @property
    def events_endpoint(self) -> str:
        return f"ipc://{self.run_dir}/events"

    @property
    def control_endpoint(self) -> str:
        return f"ipc://{self.run_dir}/control"

    @property
    def metrics_dir(self) -> Path:
        return self.run_dir / "metrics"

    def arena_name(self, front: int, model_index: int) -> str:
        return f"{self.shm_prefix}-f{front}-m{model_index}"

    def arena_path(self, front: int, model_index: int) -> Path:
        return self.shm_dir / self.arena_name(front, model_index)


def report_ready(layout: RunLayout, ready: Ready) -> None:
    """Tell the supervisor that this process finished (or failed) its start-up."""
    ctx: zmq.Context[Any] = zmq.Context.instance()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(layout.control_endpoint)
    sock.send(encoder.encode(ready))
    sock.close(linger=2000)


def setup_or_report(layout: RunLayout, model: str, replica: int, build: Callable[[], T]) -> T:
    """Run a worker's set-up; on failure tell the supervisor why (it stops the start) and exit."""
    try:
        return build()
    except Exception as e:
        logger.exception("worker set-up failed")
        report_ready(layout, Ready("accel", model, replica, os.getpid(), error=f"{type(e).__name__}: {e}"))
        raise SystemExit(1) from None
