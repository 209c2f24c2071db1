"""Names of a running server's sockets and arenas, derived from one run directory.

Every process computes the same names from the same `RunLayout`, so no addresses are negotiated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunLayout"]


@dataclass(frozen=True)
class RunLayout:
    """The run directory (sockets, metrics) and the shared-memory name prefix of one server."""

    run_dir: Path
    shm_dir: Path
    shm_prefix: str  # e.g. "tandem-<supervisor pid>-<random>"

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
