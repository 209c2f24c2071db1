"""The run folder and the step clock: what a training run writes while it runs.

    run_dir/
      steps.jsonl   one JSON object per step: epoch, batch, step, loss, lr, time, data_time, samples,
                    samples_per_s, skipped
      train.log     every `log_every` steps, mmengine's line:
                    `Epoch(train) [1][ 20/100]  lr: 1.0000e-03  eta: 0:01:02  time: 0.1234  data_time: 0.0021
                    loss: 0.4321  samples/s: 518.7` (time, data_time and loss: means over those steps)
      steps.png     loss, time and data_time per step (at finish, or RunLog.plot() on demand)
      checkpoints/  see tandem.train.checkpoint

Timing follows mmengine's IterTimerHook: `time` is the interval between two consecutive calls of the
loader's `__next__` (one whole iteration: waiting for data plus the step), `data_time` the part of it spent
inside `__next__` waiting for the batch. Losses stay detached tensors until a log line is due, so logging
costs one host sync per `log_every` steps. Only rank 0 writes files and shows the progress bar; every rank
keeps its records for summary().
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from tandem.train.data import BatchTiming

logger = logging.getLogger(__name__)

__all__ = ["RunLog", "StepRecord"]


@dataclass
class StepRecord:
    """One training iteration as steps.jsonl stores it."""

    epoch: int
    batch: int
    step: int
    loss: float | None
    lr: float | None
    time: float
    data_time: float
    samples: int
    samples_per_s: float | None
    skipped: bool


@dataclass
class _Pending:
    epoch: int
    batch: int
    step: int
    loss: torch.Tensor | None
    lr: float | None
    time: float
    data_time: float
    samples: int
    skipped: torch.Tensor | bool


class RunLog:
    """StepClock for the Loader plus the run folder's writers (steps.jsonl, train.log, PNG, progress bar)."""

    def __init__(self, run_dir: Path | None, *, enabled: bool = True, world_size: int = 1, log_every: int = 1,
                 progress: bool = True) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.enabled = enabled
        self.world_size = world_size
        self.log_every = log_every
        self.records: list[StepRecord] = []
        self._own_from = 0                   # records before this index came from a resumed run's file
        self._pending: list[_Pending] = []
        self._losses: list[torch.Tensor] = []
        self._lr: float | None = None
        self._skipped: torch.Tensor | bool = False
        self._step = 0
        self._start: float | None = None      # next_called of the iteration in progress
        self._timing: BatchTiming | None = None
        self._clocked = False
        self._last_step_t: float | None = None
        self._begin: float | None = None      # setup() time: the first unclocked iteration starts here
        self._unclocked_batch = 0
        self.epoch = 0                        # the trainer's epoch, for unclocked records
        self.epoch_length: int | None = None
        self.total_batches: int | None = None
        self._files: dict[str, IO[str]] = {}
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._want_progress = progress and enabled and sys.stdout.isatty()

    # -- StepClock (called by the Loader) --------------------------------------------------------
    def next_called(self, t: float) -> None:
        """Top of the loader's __next__: the previous iteration is complete."""
        self._clocked = True
        if self._timing is not None and self._start is not None:
            self._finish_iteration(t - self._start, self._timing)
        self._start, self._timing = t, None

    def batch_ready(self, t: float, timing: BatchTiming) -> None:
        """The loader is about to yield the batch `timing` describes."""
        self._clocked = True
        self._timing = timing

    def epoch_done(self, t: float) -> None:
        """The epoch's iterator is exhausted; the last iteration ends here."""
        if self._timing is not None and self._start is not None:
            self._finish_iteration(t - self._start, self._timing)
        self._start, self._timing = None, None
        self.flush()

    # -- from the trainer ---------------------------------------------------------------------------
    def record_loss(self, loss: torch.Tensor) -> None:
        """A backward() of this iteration (kept detached: no sync)."""
        self._losses.append(loss.detach())

    def record_step(self, t: float, *, step: int, lr: float | None, skipped: torch.Tensor | bool) -> None:
        """An optimizer step; without a clocked loader it also closes the iteration."""
        self._step, self._lr, self._skipped = step, lr, skipped
        if not self._clocked:
            last = self._last_step_t if self._last_step_t is not None else (self._begin or t)
            self._last_step_t = t
            self._push(self.epoch, self._unclocked_batch, t - last, 0.0, 0)
            self._unclocked_batch += 1

    def start(self, t: float) -> None:
        """Training starts (Trainer.setup): the first unclocked iteration is timed from here."""
        self._begin = t

    def new_epoch(self, epoch: int) -> None:
        """The trainer moved to `epoch`."""
        self.epoch, self._unclocked_batch = epoch, 0

    def _finish_iteration(self, elapsed: float, timing: BatchTiming) -> None:
        self._push(timing.epoch, timing.index, elapsed, timing.data_time, timing.samples)

    def _push(self, epoch: int, batch: int, elapsed: float, data_time: float, samples: int) -> None:
        loss = torch.stack(self._losses).float().mean() if self._losses else None
        self._pending.append(_Pending(epoch, batch, self._step, loss, self._lr, elapsed, data_time, samples,
                                      self._skipped))
        self._losses, self._skipped = [], False
        self._advance(1)
        if len(self._pending) >= self.log_every:
            self.flush()

    # -- writers ------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Turn pending iterations into records (one host sync), append them to steps.jsonl, log a line."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        losses = [p.loss for p in pending if p.loss is not None]
        values = iter(torch.stack(losses).tolist()) if losses else iter(())
        for p in pending:
            loss = next(values) if p.loss is not None else None
            sps = p.samples * self.world_size / p.time if p.samples and p.time > 0 else None
            self.records.append(StepRecord(p.epoch, p.batch, p.step, loss, p.lr, p.time, p.data_time, p.samples,
                                           sps, bool(p.skipped)))
        window = self.records[-len(pending):]
        if self.enabled and self.run_dir is not None:
            out = self._file("steps.jsonl")
            out.write("".join(json.dumps(asdict(r)) + "\n" for r in window))
            out.flush()
        line = self.format_line(window)
        logger.info("%s", line)
        if self.enabled and self.run_dir is not None:
            stamp = datetime.datetime.now().strftime("%m/%d %H:%M:%S")
            log = self._file("train.log")
            log.write(f"{stamp} - tandem - INFO - {line}\n")
            log.flush()
        self._advance(0, window[-1])

    def format_line(self, window: list[StepRecord]) -> str:
        """mmengine's `Epoch(train) [e][ i/n]  lr: ...  eta: ...  time: ...  data_time: ...  loss: ...` line."""
        last = window[-1]
        n = self.epoch_length
        index = f"[{last.batch + 1:>{len(str(n))}}/{n}]" if n else f"[{last.batch + 1}]"
        mean_time = sum(r.time for r in window) / len(window)
        parts = [f"Epoch(train) [{last.epoch + 1}]{index}"]
        if last.lr is not None:
            parts.append(f"lr: {last.lr:.4e}")
        eta = self._eta(last, mean_time)
        if eta is not None:
            parts.append(f"eta: {datetime.timedelta(seconds=round(eta))}")
        parts.append(f"time: {mean_time:.4f}")
        parts.append(f"data_time: {sum(r.data_time for r in window) / len(window):.4f}")
        losses = [r.loss for r in window if r.loss is not None]
        if losses:
            parts.append(f"loss: {sum(losses) / len(losses):.4f}")
        rates = [r.samples_per_s for r in window if r.samples_per_s is not None]
        if rates:
            rate = sum(r.samples * self.world_size for r in window) / sum(r.time for r in window)
            parts.append(f"samples/s: {rate:.1f}")
        if any(r.skipped for r in window):
            parts.append(f"skipped: {sum(r.skipped for r in window)}")
        return "  ".join(parts)

    def _eta(self, last: StepRecord, mean_time: float) -> float | None:
        if not self.total_batches or not self.epoch_length:
            return None
        done = last.epoch * self.epoch_length + last.batch + 1
        return max(self.total_batches - done, 0) * mean_time

    def _file(self, name: str) -> IO[str]:
        if name not in self._files:
            assert self.run_dir is not None
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._files[name] = open(self.run_dir / name, "a", encoding="utf-8")  # noqa: SIM115
        return self._files[name]

    def _advance(self, n: int, last: StepRecord | None = None) -> None:
        if not self._want_progress:
            return
        if self._progress is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[rate]} samples/s  loss {task.fields[loss]}"),
                                      TimeRemainingColumn())
            self._progress.start()
            self._task = self._progress.add_task("train", total=self.total_batches or self.epoch_length,
                                                 rate="-", loss="-")
        assert self._task is not None
        fields: dict[str, Any] = {}
        if last is not None:
            if last.samples_per_s is not None:
                fields["rate"] = f"{last.samples_per_s:.1f}"
            if last.loss is not None:
                fields["loss"] = f"{last.loss:.4f}"
        self._progress.update(self._task, advance=n, **fields)

    # -- resume, summary, plot, close ---------------------------------------------------------------
    def resume(self, step: int) -> None:
        """After loading a checkpoint at `step`: keep only steps.jsonl lines up to it (a killed run may have
        logged steps it never saved), so the file and the PNG read as one uninterrupted run."""
        self._step = step
        self._pending, self._losses = [], []
        if self.run_dir is None or not (self.run_dir / "steps.jsonl").is_file():
            return
        kept = []
        for line in (self.run_dir / "steps.jsonl").read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:      # a line cut short by the kill
                continue
            if row.get("step", 0) <= step:
                kept.append(StepRecord(**row))
        self.records = kept
        self._own_from = len(kept)
        if self.enabled:
            self._files.pop("steps.jsonl", None)
            tmp = self.run_dir / ".steps.jsonl.tmp"
            tmp.write_text("".join(json.dumps(asdict(r)) + "\n" for r in kept))
            tmp.replace(self.run_dir / "steps.jsonl")

    def summary(self, warmup: int = 0) -> dict[str, Any]:
        """This process's iterations (after `warmup`): mean time and data_time, data_time share, samples/s."""
        self.flush()
        own = self.records[self._own_from + warmup:]
        total = sum(r.time for r in own)
        data = sum(r.data_time for r in own)
        samples = sum(r.samples for r in own) * self.world_size
        losses = [r.loss for r in own if r.loss is not None]
        return {
            "steps": len(own),
            "mean_time": total / len(own) if own else None,
            "mean_data_time": data / len(own) if own else None,
            "data_time_share": data / total if total > 0 else None,
            "samples_per_s": samples / total if total > 0 and samples else None,
            "skipped": sum(r.skipped for r in own),
            "last_loss": losses[-1] if losses else None,
        }

    def plot(self, path: Path | None = None) -> Path | None:
        """Write the loss / time / data_time PNG (default run_dir/steps.png); None when there is nothing to
        draw or this rank does not write."""
        self.flush()
        if path is None:
            if self.run_dir is None or not self.enabled:
                return None
            path = self.run_dir / "steps.png"
        if not self.records:
            return None
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8, 7))
        FigureCanvasAgg(fig)   # Agg without pyplot: no global backend switch, no display needed
        x = list(range(1, len(self.records) + 1))
        series = [("loss", [r.loss if r.loss is not None else float("nan") for r in self.records]),
                  ("time (s)", [r.time for r in self.records]), ("data_time (s)", [r.data_time for r in self.records])]
        axes = fig.subplots(3, 1, sharex=True)
        for ax, (label, ys) in zip(axes, series):
            ax.plot(x, ys, linewidth=1)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[-1].set_xlabel("step")
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(str(path), dpi=100)
        return Path(path)

    def finish_iteration(self) -> None:
        """Close an iteration still open (the loop left the loader early or the run ends)."""
        if self._timing is not None and self._start is not None:
            self._finish_iteration(time.perf_counter() - self._start, self._timing)
            self._start, self._timing = None, None

    def close(self) -> None:
        """Flush, write the PNG, stop the progress bar and close the files (idempotent)."""
        self.finish_iteration()
        self.flush()
        self.plot()
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        for f in self._files.values():
            f.close()
        self._files = {}
