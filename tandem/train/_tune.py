"""Online tuning of the Loader's worker settings during the first steps of real training.

Each candidate setting serves a few batches of the real loop. Its score is the interval between `__next__`
calls once its workers have started (one warm-up batch, then a window that is a multiple of its worker count):
the median for 0 or 1 workers, the mean for more, because N workers deliver batches in bursts of N. That
interval holds the user's compute, so transforms that fight the model for CPUs lose.

Worker counts are tried upwards (0, 1, 2, 4, ..., max-1, max; max = the CPUs of this process's affinity divided
by the local world size). The ladder stops at the first candidate that is clearly slower than the best so far
(more workers fight the model for CPUs), or once data_time is a negligible share of the step and the candidate
bought no step time over the best before it. data_time alone is not enough: on 2 CPUs the seed's 4 workers beat
1 worker's step time while both waited on data under 3% of it (BENCHMARKS.md, training engine). A candidate must
be `MARGIN` faster than the best to replace it, so ties go to fewer workers.
When the loads are I/O-bound (wall time >> CPU time) the ladder continues past the CPU count. A winner that
still waits on data is tried with prefetch_factor 4 against 2. Batch content never depends on these settings,
so switching mid-epoch changes nothing the model sees. The trial takes about 10% of an epoch, within
[MIN_TRIAL, MAX_TRIAL] batches; on short epochs it continues into the next ones.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["LoaderSettings", "TrialRow", "Tuner", "trial_budget", "worker_ladder"]

logger = logging.getLogger(__name__)

MARGIN = 0.05           # a candidate with more workers must be this much faster to win
NEGLIGIBLE_DATA = 0.03  # data_time share below which more workers cannot help
PREFETCH_TRY = 0.05     # a winner whose data share is above this also tries prefetch_factor 4
MAX_TRIAL = 64          # batches the whole trial may take at most
MIN_TRIAL = 20          # ... and at least (short epochs: the trial spans epochs, each re-warming up)
WARMUP = 1              # batches a new candidate serves before it is measured (worker start-up)


@dataclass(frozen=True)
class LoaderSettings:
    """DataLoader worker settings (chosen by the trial, or given explicitly)."""

    num_workers: int
    prefetch_factor: int | None
    persistent_workers: bool
    pin_memory: bool


@dataclass(frozen=True)
class TrialRow:
    """One measured candidate: mean seconds per step and the share of it spent waiting on data."""

    settings: LoaderSettings
    steps: int
    step_time: float
    data_share: float


def worker_ladder(max_workers: int) -> list[int]:
    """0, 1, 2, 4, 8, ... below max, then max-1 and max."""
    counts = {0, max_workers, max(1, max_workers - 1)}
    n = 1
    while n < max_workers:
        counts.add(n)
        n *= 2
    return sorted(counts)


def trial_budget(batches_per_epoch: int) -> int:
    """About 10% of an epoch, within [MIN_TRIAL, MAX_TRIAL] batches."""
    return max(MIN_TRIAL, min(MAX_TRIAL, batches_per_epoch // 10))


def _window(num_workers: int) -> int:
    # a multiple of the worker count (bursts of N batches), at least 3 steps, at most 16
    n = max(1, num_workers)
    return min(16, n * -(-3 // n))


class Tuner:
    """State machine fed by the Loader's iterator: `on_next` at the top of each `__next__`, `on_ready` after.

    `current` is what should serve batches now; `on_next` returns True when it changed (the Loader then starts
    a DataLoader with the new settings at the next batch). `chosen` is set once the trial is over.
    """

    def __init__(self, *, num_workers: int | None, prefetch_factor: int | None, persistent_workers: bool | None,
                 pin_memory: bool | None, cuda: bool, max_workers: int, budget: int,
                 io_bound: Callable[[], bool] = lambda: False, cpus: int = 1) -> None:
        self._pf, self._persistent, self._pin, self._cuda = prefetch_factor, persistent_workers, pin_memory, cuda
        self._max, self._budget, self._io_bound, self._cpus = max_workers, budget, io_bound, cpus
        self._queue = [num_workers] if num_workers is not None else worker_ladder(max_workers)
        self._extended = num_workers is not None
        self.rows: list[TrialRow] = []
        self._best: TrialRow | None = None
        self._prefetch_phase = False
        self._used = 0
        # the current candidate's measurement; it may span iterators (short epochs): each new iterator (a
        # "segment") warms up again, and only intervals between two calls of one segment are counted
        self._seg = 0               # calls in the current segment
        self._last_t = 0.0          # top of the previous call of this segment
        self._open_data = 0.0       # data_time of the interval that the next call closes
        self._steps = 0
        self._elapsed = 0.0
        self._data = 0.0
        self._intervals: list[float] = []
        self.current = self._make(self._queue.pop(0), prefetch_factor or 2)
        self.chosen: LoaderSettings | None = None
        if not self._queue and (self.current.num_workers == 0 or prefetch_factor is not None):
            self.chosen = self.current      # nothing left to measure

    def _make(self, num_workers: int, prefetch: int) -> LoaderSettings:
        workers = num_workers > 0
        persistent = workers if self._persistent is None else self._persistent and workers
        return LoaderSettings(num_workers=num_workers, prefetch_factor=prefetch if workers else None,
                              persistent_workers=persistent, pin_memory=self._cuda if self._pin is None else self._pin)

    @property
    def done(self) -> bool:
        """The trial is over (or there was nothing to try)."""
        return self.chosen is not None

    def adopt(self, settings: LoaderSettings) -> None:
        """End the trial with settings chosen earlier (a resumed run on the same machine)."""
        self.current = self.chosen = settings

    def restart(self) -> None:
        """A new iterator (epoch or resume): the current candidate warms up again before it is measured."""
        self._seg = 0
        self._open_data = 0.0

    def _reset_measurement(self) -> None:
        self._seg, self._steps, self._elapsed, self._data, self._open_data = 1, 0, 0.0, 0.0, 0.0
        self._intervals = []

    def on_next(self, t: float) -> bool:
        """Top of `__next__` at perf_counter `t`; True when `current` changed."""
        if self.done:
            return False
        self._used += 1
        self._seg += 1
        if self._seg > WARMUP + 1:          # closes a measured interval [previous call, this call]
            self._steps += 1
            self._elapsed += t - self._last_t
            self._intervals.append(t - self._last_t)
            self._data += self._open_data
        self._last_t, self._open_data = t, 0.0
        out_of_budget = self._used >= self._budget
        if self._steps >= _window(self.current.num_workers) or (out_of_budget and self._steps >= 2):
            return self._finish(self._row())
        if self._used >= self._budget + 2 * (WARMUP + 2):   # out of budget without a measurement: settle
            return self._settle()
        return False

    def _row(self) -> TrialRow:
        elapsed = max(self._elapsed, 1e-9)
        # 0 or 1 worker deliver evenly: the median shrugs off one stall (another process, a GC pause). N >= 2
        # workers deliver in bursts of N, so only the mean over the window is the true rate
        step = statistics.median(self._intervals) if self.current.num_workers <= 1 else elapsed / self._steps
        return TrialRow(self.current, self._steps, step, min(1.0, self._data / elapsed))

    def on_ready(self, data_time: float) -> None:
        """`__next__` spent `data_time` seconds getting the batch it is about to return."""
        if not self.done and self._seg > WARMUP:
            self._open_data = data_time

    def _finish(self, row: TrialRow) -> bool:
        self.rows.append(row)
        improved = self._best is None or row.step_time < self._best.step_time * (1 - MARGIN)
        gained = improved and self._best is not None  # beat a measured rung: the step time has not flattened yet
        if improved:
            self._best = row
        best = self._best
        assert best is not None
        nxt: LoaderSettings | None = None
        # go on up while this candidate still waits on data and is not clearly worse than the best: with a
        # cheap step, 1 worker is no faster than 0 (the worker is the bottleneck) but 2 may halve the step
        worse = row.step_time > best.step_time * (1 + MARGIN)
        if not self._prefetch_phase and not worse and (row.data_share >= NEGLIGIBLE_DATA or gained):
            if not self._queue and not self._extended and self._io_bound():
                # loads wait on I/O: workers beyond the CPU count overlap the waits
                self._queue, self._extended = [2 * self._max, 4 * self._max], True
            if self._queue:
                nxt = self._make(self._queue.pop(0), self._pf or 2)
        if nxt is None and not self._prefetch_phase and self._pf is None and best.settings.num_workers > 0 \
                and best.data_share > PREFETCH_TRY:
            self._prefetch_phase = True
            nxt = self._make(best.settings.num_workers, 4)
        if nxt is None or self._used >= self._budget:
            return self._settle()
        self.current = nxt
        self._reset_measurement()           # this call is the new candidate's first
        return True

    def _settle(self) -> bool:
        chosen = self._best.settings if self._best is not None else self.current
        changed = chosen != self.current
        self.current = self.chosen = chosen
        logger.info("%s", self.report())
        return changed

    def report(self) -> str:
        """The trial table: setting -> mean step ms and data_time share."""
        lines = [f"loader tuning: {self._cpus} CPUs for this rank, up to {self._max} workers, "
                 f"{self._used} trial batches"]
        lines.append(f"  {'workers':>7} {'prefetch':>8} {'persistent':>10} {'pin':>5} {'steps':>5} "
                     f"{'step ms':>9} {'data share':>10}")
        for r in self.rows:
            s = r.settings
            mark = "  <- chosen" if s == self.chosen else ""
            lines.append(f"  {s.num_workers:>7} {s.prefetch_factor or '-':>8} {s.persistent_workers!s:>10} "
                         f"{s.pin_memory!s:>5} {r.steps:>5} {r.step_time * 1e3:>9.2f} {r.data_share:>10.1%}{mark}")
        if not self.rows and self.chosen is not None:
            lines.append(f"  (nothing measured; using {self.chosen})")
        return "\n".join(lines)
