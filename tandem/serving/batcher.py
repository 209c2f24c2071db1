"""Dynamic batching: when to close a batch, which requests go in it, and how to stack them.

Length-aware batching, in two steps:
- selection: when more rows wait than fit, the oldest request always goes first (no starvation)
  and the rest are the requests whose length is closest to it;
- execution: the chosen batch is sorted by length and cut into micro-batches where that saves more
  padded work than the extra `predict` calls cost (`plan_micro_batches`, an exact O(n^2) DP).
  Measured on all-MiniLM-L6-v2 with 20-60-token sentences, 2 CPU threads: one padded batch of 32
  ran at 73 items/s, four length-sorted micro-batches of 8 at 102 items/s. Its step time fits
  t ~ 0.2 ms * (max(rows * length, 128) + 48): below ~128 token-rows a call is no cheaper, and each
  call costs a fixed ~48 token-rows; those two constants are the cost model of the DP.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tandem.model import TensorSpec
from tandem.serving.messages import Task

__all__ = ["CALL_COST_TOKENS", "ArrivalTracker", "Pending", "assemble", "batch_deadline", "pick_batch",
           "plan_micro_batches", "split_rows"]

# Cost model of one predict() call, in padded token-rows: max(rows * length, MIN_CALL_TOKENS) + CALL_COST_TOKENS.
CALL_COST_TOKENS = 48
MIN_CALL_TOKENS = 128


@dataclass
class Pending:
    """A task waiting in an accelerator worker, with zero-copy views of its inputs."""

    task: Task
    arrived: float  # time.monotonic() at receipt
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # each [rows, ...]

    @property
    def rows(self) -> int:
        return self.task.rows


class ArrivalTracker:
    """How many more tasks the fronts have in flight for this replica: never wait for none.

    Each task carries `expect`, its front's count of requests for this replica still unanswered
    (preprocessing or dispatched, itself included). When every expected task is already pending the
    batch runs at once instead of sleeping `max_batch_delay_ms`: at concurrency 1 the delay costs
    nothing, under load batches still fill. A stale count only ever makes the worker wait the
    normal delay, never longer.
    """

    def __init__(self) -> None:
        self.hint: dict[int, int] = {}
        self.done: dict[int, int] = {}

    def arrived(self, task: Task) -> None:
        self.hint[task.front] = task.expect
        self.done[task.front] = 0

    def finished(self, task: Task) -> None:
        self.done[task.front] = self.done.get(task.front, 0) + 1

    def expected(self) -> int:
        return sum(max(0, h - self.done.get(f, 0)) for f, h in self.hint.items())


def batch_deadline(pending: list[Pending], max_rows: int, delay_s: float,
                   tracker: ArrivalTracker | None = None) -> float:
    """Monotonic time at which the next batch must run (0 when it is full or nothing else is coming)."""
    if sum(p.rows for p in pending) >= max_rows:
        return 0.0
    if tracker is not None and len(pending) >= tracker.expected():
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


def plan_micro_batches(batch: list[Pending], call_cost: float = CALL_COST_TOKENS,
                       min_tokens: float = MIN_CALL_TOKENS) -> list[list[Pending]]:
    """Split a batch into length-sorted groups minimising sum(max(rows * max_length, min_tokens) + call_cost).

    Requests without a variable dimension (length 0) stay in one group.
    """
    items = sorted(batch, key=lambda p: p.task.length)
    n = len(items)
    if n <= 1 or items[-1].task.length == 0:
        return [items] if items else []
    prefix_rows = [0]
    for p in items:
        prefix_rows.append(prefix_rows[-1] + p.rows)
    best = [0.0] + [float("inf")] * n  # best[i]: cheapest plan for items[:i]
    cut = [0] * (n + 1)
    for i in range(1, n + 1):
        longest = items[i - 1].task.length  # sorted: the last item of a group is its longest
        for j in range(i):
            cost = best[j] + max((prefix_rows[i] - prefix_rows[j]) * longest, min_tokens) + call_cost
            if cost < best[i]:
                best[i], cut[i] = cost, j
    groups: list[list[Pending]] = []
    i = n
    while i > 0:
        groups.append(items[cut[i]:i])
        i = cut[i]
    return groups[::-1]


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
