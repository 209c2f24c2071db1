"""Dynamic batching: when to close a batch, which requests go in it, and how to stack them.

Length-aware selection: when more rows wait than fit, the oldest request always goes first (no
starvation) and the rest are the requests whose length is closest to it, so short sentences are not
padded to the length of a long one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tandem.model import TensorSpec
from tandem.serving.messages import Task

__all__ = ["Pending", "assemble", "batch_deadline", "pick_batch", "split_rows"]


@dataclass
class Pending:
    """A task waiting in an accelerator worker, with zero-copy views of its inputs."""

    task: Task
    arrived: float  # time.monotonic() at receipt
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # each [rows, ...]

    @property
    def rows(self) -> int:
        return self.task.rows


def batch_deadline(pending: list[Pending], max_rows: int, delay_s: float) -> float:
    """Monotonic time at which the next batch must run (now or earlier when it is already full)."""
    if sum(p.rows for p in pending) >= max_rows:
        return 0.0
    return min(p.arrived for p in pending) + delay_s


def pick_batch(pending: list[Pending], max_rows: int, length_aware: bool = True) -> list[Pending]:
    """Choose the requests of the next batch (they are removed from `pending`)."""
    total = sum(p.rows for p in pending)
    if total <= max_rows:
        chosen = list(pending)
        pending.clear()
        return chosen
    oldest = min(pending, key=lambda p: p.arrived)
    others = [p for p in pending if p is not oldest]
    if length_aware:
        others.sort(key=lambda p: (abs(p.task.length - oldest.task.length), p.arrived))
    else:
        others.sort(key=lambda p: p.arrived)
    chosen, rows = [oldest], oldest.rows
    for p in others:
        if rows + p.rows <= max_rows:
            chosen.append(p)
            rows += p.rows
        if rows == max_rows:
            break
    ids = {id(p) for p in chosen}
    pending[:] = [p for p in pending if id(p) not in ids]
    return chosen


def assemble(items: list[dict[str, np.ndarray]], specs: tuple[TensorSpec, ...]) -> dict[str, np.ndarray]:
    """Stack per-request arrays [rows_i, ...] into [sum(rows), ...], padding variable dims."""
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        parts = [item[spec.name] for item in items]
        if len(parts) == 1:
            out[spec.name] = parts[0]
            continue
        shapes = np.array([p.shape[1:] for p in parts])
        target = tuple(int(d) for d in shapes.max(axis=0))
        if all(p.shape[1:] == target for p in parts):
            out[spec.name] = np.concatenate(parts, axis=0)
            continue
        rows = sum(p.shape[0] for p in parts)
        # batch: [rows, *target] filled with the pad value, each request copied into its corner
        batch = np.full((rows, *target), spec.pad_value, dtype=parts[0].dtype)
        start = 0
        for p in parts:
            idx = (slice(start, start + p.shape[0]), *(slice(0, d) for d in p.shape[1:]))
            batch[idx] = p
            start += p.shape[0]
        out[spec.name] = batch
    return out


def split_rows(outputs: dict[str, np.ndarray], rows: list[int]) -> list[dict[str, np.ndarray]]:
    """Cut batch outputs [sum(rows), ...] back into one dict per request."""
    result: list[dict[str, np.ndarray]] = []
    start = 0
    for n in rows:
        result.append({name: arr[start:start + n] for name, arr in outputs.items()})
        start += n
    return result
