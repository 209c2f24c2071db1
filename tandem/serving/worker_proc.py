"""One skeleton for every replica process: signals, parent death, logging, the ready handshake.

    run_worker(entry, replica, layout, parent_pid, log_level, tag, build)
      SIGINT ignored (the supervisor decides when workers stop), die with the supervisor,
      logging at the server's --log-level, build() the kind's loop (a failure is reported to the
      supervisor, which stops the start), SIGTERM -> loop.stop(), Ready(device), loop.run()

Fronts use `report_ready` for their own handshake.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import zmq

from tandem.serving._proc import die_with_parent
from tandem.serving.layout import RunLayout
from tandem.serving.messages import Ready, encoder

if TYPE_CHECKING:
    from tandem.serving.repository import ModelEntry

__all__ = ["WorkerLoop", "report_ready", "run_worker", "setup_or_report"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


class WorkerLoop(Protocol):
    """What a kind's worker builds: a loop that runs until `stop()` and says where it runs."""

    device: str

    def run(self) -> None: ...

    def stop(self) -> None: ...


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
        report_ready(layout, Ready(role="accel", model=model, index=replica, pid=os.getpid(),
                                   error=f"{type(e).__name__}: {e}"))
        raise SystemExit(1) from None


def run_worker(entry: ModelEntry, replica: int, layout: RunLayout, parent_pid: int, log_level: str,
               tag: str, build: Callable[[], WorkerLoop]) -> None:
    """The body of every replica process's entry point (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent_pid)
    logging.basicConfig(level=log_level.upper(), format=f"%(asctime)s {tag}[{entry.key}#{replica}] %(message)s")
    loop = setup_or_report(layout, entry.key, replica, build)

    def _stop(signum: int, frame: object) -> None:
        loop.stop()

    signal.signal(signal.SIGTERM, _stop)
    report_ready(layout, Ready(role="accel", model=entry.key, index=replica, pid=os.getpid(), device=loop.device))
    loop.run()
