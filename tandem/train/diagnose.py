"""Why is the loop waiting on data? Per-sample load-vs-transform costs and a data_time diagnosis.

The seed's advice: split `__getitem__` into load time (I/O: read bytes, decode) and transform time (CPU:
augment, to tensor). Every sample the Loader fetches is timed in the process that fetches it (a worker or the
main process), wall clock and thread CPU time, and the totals travel back with the batch. From them:

- `load_report(stats)`: the per-sample load-vs-transform table for a SplitDataset (a plain dataset's whole
  `__getitem__` is reported as one "getitem" part).
- `diagnose(time, data_time, stats, ...)`: None while data_time is at most 5% of the step time; otherwise a
  Diagnosis saying why (I/O-bound loads: load wall time far above its CPU time; or CPU-bound transforms) and
  what to do about it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["DATA_TIME_LIMIT", "Diagnosis", "LoadStats", "diagnose", "load_report"]

logger = logging.getLogger(__name__)

# data_time above this share of the step time is worth a diagnosis (the 5% goal)
DATA_TIME_LIMIT = 0.05
# a load whose wall time is this many times its CPU time waits on storage, not on the CPU
_IO_RATIO = 2.0


@dataclass
class LoadStats:
    """Running totals of per-sample fetch costs, in seconds (wall and CPU) over `samples` samples."""

    split: bool = False                 # the dataset is a SplitDataset (load and transform timed apart)
    samples: int = 0
    load_wall: float = 0.0              # load(i), or the whole __getitem__ for a plain dataset
    load_cpu: float = 0.0
    transform_wall: float = 0.0
    transform_cpu: float = 0.0
    batches: int = field(default=0)

    def add(self, batch: tuple[int, float, float, float, float]) -> None:
        """Fold in one batch's totals: (samples, load wall, load CPU, transform wall, transform CPU)."""
        n, lw, lc, tw, tc = batch
        self.samples += n
        self.load_wall += lw
        self.load_cpu += lc
        self.transform_wall += tw
        self.transform_cpu += tc
        self.batches += 1

    def per_sample(self) -> tuple[float, float, float, float]:
        """Mean seconds per sample: (load wall, load CPU, transform wall, transform CPU)."""
        n = max(1, self.samples)
        return self.load_wall / n, self.load_cpu / n, self.transform_wall / n, self.transform_cpu / n

    @property
    def io_bound(self) -> bool:
        """Loads spend most of their time waiting (wall >> CPU) and are a real part of the sample's cost."""
        lw, lc, tw, _ = self.per_sample()
        return self.samples > 0 and lw > _IO_RATIO * lc and lw >= 0.5 * (lw + tw) and lw > 1e-4


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def load_report(stats: LoadStats) -> str:
    """One line per part: per-sample wall time, its CPU share, and its share of the sample's cost."""
    if stats.samples == 0:
        return "data: no samples timed yet"
    lw, lc, tw, tc = stats.per_sample()
    total = max(lw + tw, 1e-12)
    first = "load" if stats.split else "getitem"
    lines = [f"data: {stats.samples} samples timed; per sample:"]
    lines.append(f"  {first:<9} {_ms(lw):>10}  CPU {_ms(lc):>10} ({lc / max(lw, 1e-12):4.0%} of its wall)  "
                 f"{lw / total:4.0%} of the sample")
    if stats.split:
        lines.append(f"  {'transform':<9} {_ms(tw):>10}  CPU {_ms(tc):>10} ({tc / max(tw, 1e-12):4.0%} of its wall)  "
                     f"{tw / total:4.0%} of the sample")
    if stats.io_bound:
        lines.append(f"  the {first} waits on I/O (wall {lw / max(lc, 1e-12):.1f}x its CPU time)")
    return "\n".join(lines)


@dataclass(frozen=True)
class Diagnosis:
    """Why data_time is over the limit and what to do, as one readable `message`."""

    share: float                                   # data_time / time
    cause: Literal["io", "cpu", "unknown"]
    advice: tuple[str, ...]
    message: str


def _advice(cause: str, num_workers: int, cpus: int) -> list[str]:
    tips: list[str] = []
    if cause == "io":
        tips.append(f"loads wait on storage: more workers help even beyond the {cpus} CPUs "
                    f"(now {num_workers}; try {2 * cpus}-{4 * cpus})")
        tips.append("copy the dataset folder to local disk once: tandem.train.cache_dataset_folder(src)")
        tips.append("store fewer bytes: pre-resize with `tandem data resize SRC DST --max-side N`")
        return tips
    if num_workers < cpus:
        tips.append(f"raise num_workers toward the {cpus} CPUs available to this rank (now {num_workers})")
    tips.append("pre-resize images so decoding and resizing cost less: `tandem data resize SRC DST --max-side N`")
    tips.append("move augmentation to the GPU (batched, on device tensors after the loader)")
    tips.append("give each rank more CPUs (fewer processes per machine or a bigger CPU allocation)")
    return tips


def diagnose(time: float, data_time: float, stats: LoadStats | None = None, *, num_workers: int = 0,
             cpus: int = 1, limit: float = DATA_TIME_LIMIT) -> Diagnosis | None:
    """Diagnose mean step `time` and mean `data_time` (seconds); None while data_time <= limit * time."""
    if time <= 0 or data_time <= limit * time:
        return None
    share = data_time / time
    cause: Literal["io", "cpu", "unknown"] = "unknown"
    detail = "no per-sample timings"
    if stats is not None and stats.samples:
        lw, lc, tw, _ = stats.per_sample()
        cause = "io" if stats.io_bound else "cpu"
        part = "load" if stats.split else "getitem"
        detail = (f"per sample {part} {_ms(lw)} (CPU {_ms(lc)})" + (f", transform {_ms(tw)}" if stats.split else ""))
    why = {"io": "I/O-bound loads (the load's wall time is far above its CPU time)",
           "cpu": "CPU-bound loading/transforms (the workers cannot produce samples fast enough)",
           "unknown": "the data pipeline"}[cause]
    tips = _advice("cpu" if cause == "unknown" else cause, num_workers, cpus)
    message = (f"data_time is {share:.0%} of the step time ({_ms(data_time)} of {_ms(time)}), over the "
               f"{limit:.0%} goal: {why}; {detail}. To do: " + "; ".join(tips) + ".")
    return Diagnosis(share=share, cause=cause, advice=tuple(tips), message=message)
