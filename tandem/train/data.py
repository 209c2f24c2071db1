"""The training data pipeline: a deterministic, resumable, self-tuning loader that prefetches to the device.

    Loader(dataset, batch_size=..., device=...)          one per dataset, usually through Trainer.loader(...)
      ├── EpochBatchSampler (_sampler.py)   permutation per (seed, epoch); rank r takes positions r::W
      ├── _SeededDataset                    seeds torch/random/numpy per sample from (seed, epoch, index),
      │                                     times load/transform, names the sample and worker on errors
      ├── torch DataLoader                  workers, pinning; re-created when the trial switches settings
      ├── Tuner (_tune.py)                  the short online trial that picks the worker settings
      └── _EpochIterator                    one epoch: device copy one batch ahead on a side CUDA stream,
                                            data_time per batch, StepClock calls

The determinism rule: the content of batch (epoch, index) on rank r depends only on (seed, epoch, index, rank,
world_size), never on num_workers, prefetching or resuming. That is what makes exact mid-epoch resume and
switching settings in the middle of the first epoch safe.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info

from tandem.train._sampler import EpochBatchSampler, mix_seed, num_batches
from tandem.train._tune import LoaderSettings, Tuner, trial_budget
from tandem.train.diagnose import Diagnosis, LoadStats, diagnose, load_report

__all__ = ["BatchTiming", "Loader", "LoaderSettings", "SampleError", "SplitDataset", "StepClock", "usable_cpus"]

logger = logging.getLogger(__name__)

Auto = Literal["auto"]


@runtime_checkable
class SplitDataset(Protocol):
    """A map-style dataset whose `__getitem__` is split into an I/O part and a CPU part, timed apart."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> Any:
        """I/O: read bytes, decode."""
        ...

    def transform(self, sample: Any) -> Any:
        """CPU: augment, convert to tensors (random augmentation is seeded per sample by the Loader)."""
        ...


@dataclass(frozen=True)
class BatchTiming:
    """What the Loader measured for one batch it yielded."""

    epoch: int
    index: int          # batch index within the epoch on this rank
    data_time: float    # seconds inside __next__ waiting for this batch (device copy included)
    samples: int        # rows in this batch (this rank)


class StepClock(Protocol):
    """Receives the Loader's timestamps (time.perf_counter()); implemented by the trainer's logs."""

    def next_called(self, t: float) -> None:
        """Top of __next__: the previous step is complete at this moment."""
        ...

    def batch_ready(self, t: float, timing: BatchTiming) -> None:
        """Just before the batch is returned."""
        ...

    def epoch_done(self, t: float) -> None:
        """The epoch's iterator is exhausted."""
        ...


class SampleError(RuntimeError):
    """A sample's load/transform raised; the message names the sample index, the worker and the original error.

    `index`, `epoch` and `worker` (None: the main process) are parsed back from the message in the main process,
    since only the message survives the trip from a worker process.
    """

    _PATTERN = re.compile(r"sample (\d+) \(epoch (\d+)\) failed in (?:DataLoader worker (\d+)|the main process)")

    def __init__(self, message: str) -> None:
        super().__init__(message)
        found = self._PATTERN.search(message)
        self.index = int(found.group(1)) if found else None
        self.epoch = int(found.group(2)) if found else None
        self.worker = int(found.group(3)) if found and found.group(3) is not None else None

    @classmethod
    def from_worker(cls, exc: SampleError) -> SampleError:
        """The clean message out of DataLoader's re-raise ('Caught SampleError in DataLoader worker ...')."""
        text = str(exc)
        start = text.rfind("SampleError: sample ")
        return cls(text[start + len("SampleError: "):].strip() if start >= 0 else text)


def usable_cpus() -> int:
    """CPUs this process may run on (affinity/cgroup cpusets respected)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------------------------
# sample fetching (runs in the workers, or in the main process with num_workers=0)

class _Samples(list[Any]):
    """The samples of one batch plus their summed costs, handed from __getitems__ to the collate wrapper."""

    stats: tuple[int, float, float, float, float] = (0, 0.0, 0.0, 0.0, 0.0)


class _RngGuard:
    """Saves and restores the global RNGs, so per-sample seeding never disturbs the training process's streams."""

    def __enter__(self) -> None:
        self._torch = torch.get_rng_state()
        self._py = random.getstate()
        self._np = np.random.get_state()

    def __exit__(self, *exc: object) -> None:
        torch.set_rng_state(self._torch)
        random.setstate(self._py)
        np.random.set_state(self._np)


class _SeededDataset(Dataset[Any]):
    """Wraps the user's dataset: keys are (epoch, index); each sample's augmentation RNG is seeded from
    (seed, epoch, index) before it runs; load and transform are timed; errors name the sample and worker."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.split = isinstance(dataset, SplitDataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def _seed(self, epoch: int, index: int) -> None:
        s = mix_seed(self.seed, epoch, index)
        torch.default_generator.manual_seed(s)   # CPU only: never touches the CUDA generators
        random.seed(s)
        np.random.seed(s & 0xFFFFFFFF)

    def _fetch(self, epoch: int, index: int, acc: list[float]) -> Any:
        w0, c0 = time.perf_counter(), time.thread_time()
        if not self.split:
            self._seed(epoch, index)
            sample = self.dataset[index]
            acc[0] += time.perf_counter() - w0
            acc[1] += time.thread_time() - c0
            return sample
        raw = self.dataset.load(index)
        w1, c1 = time.perf_counter(), time.thread_time()
        self._seed(epoch, index)
        sample = self.dataset.transform(raw)
        acc[0] += w1 - w0
        acc[1] += c1 - c0
        acc[2] += time.perf_counter() - w1
        acc[3] += time.thread_time() - c1
        return sample

    def __getitems__(self, keys: list[tuple[int, int]]) -> _Samples:
        out = _Samples()
        acc = [0.0, 0.0, 0.0, 0.0]
        info = get_worker_info()
        # a worker's global RNGs are its own; in the main process they are the training's and must come back
        with _RngGuard() if info is None else contextlib.nullcontext():
            for epoch, index in keys:
                try:
                    out.append(self._fetch(epoch, index, acc))
                except Exception as exc:
                    where = f"DataLoader worker {info.id} (pid {os.getpid()})" if info else \
                        "the main process (num_workers=0)"
                    raise SampleError(f"sample {index} (epoch {epoch}) failed in {where}: "
                                      f"{type(exc).__name__}: {exc}") from exc
        out.stats = (len(keys), acc[0], acc[1], acc[2], acc[3])
        return out

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]


class _Collate:
    """Applies the user's collate_fn and passes the batch's costs along: (batch, stats)."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, samples: list[Any]) -> tuple[Any, tuple[int, float, float, float, float]]:
        stats = getattr(samples, "stats", (len(samples), 0.0, 0.0, 0.0, 0.0))
        return self.collate_fn(list(samples)), stats


# ---------------------------------------------------------------------------------------------------------------
# device copies

def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return type(obj)({k: _map_tensors(v, fn) for k, v in obj.items()})  # type: ignore[call-arg]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_map_tensors(v, fn) for v in obj))
    if isinstance(obj, list | tuple):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def _record(obj: Any, stream: torch.cuda.Stream) -> None:
    def rec(t: torch.Tensor) -> torch.Tensor:
        if t.is_cuda:
            t.record_stream(stream)  # the allocator must not reuse this memory before the compute stream is done
        return t
    _map_tensors(obj, rec)


def _copy_to(obj: Any, device: torch.device, non_blocking: bool) -> Any:
    return _map_tensors(obj, lambda t: t.to(device, non_blocking=non_blocking))


def _shutdown(it: Any) -> None:
    # DataLoader iterators stop their workers in __del__; do it now so a switch never holds two worker sets
    stop = getattr(it, "_shutdown_workers", None)
    if stop is not None:
        stop()


# ---------------------------------------------------------------------------------------------------------------
# the loader

def _auto_int(name: str, value: int | str, minimum: int) -> int | None:
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum} or 'auto', got {value!r}")
    return value


def _auto_bool(name: str, value: bool | str) -> bool | None:
    if value == "auto":
        return None
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True, False or 'auto', got {value!r}")
    return value


class Loader:
    """Batches of a map-style dataset, already on `device`, in an order that depends only on the seed.

    Adopting it: `for batch in Loader(dataset, batch_size=32, device="cuda"):` (or `trainer.loader(dataset, ...)`,
    which fills in rank, world size and the step clock). Each `iter()` serves the rest of the current epoch;
    exhausting it moves to the next epoch. `state_dict()` / `load_state_dict()` resume on the exact next batch.

    Settings left "auto" are chosen by a short measured trial in the first steps of real training (see
    tandem/train/_tune.py): num_workers from 0 up to the CPUs of this rank (affinity / local_world_size), more
    when loads wait on I/O; prefetch_factor 2 or 4; persistent_workers when there are workers; pin_memory on
    CUDA. The trial table is kept as `tune_report` and logged. Explicit values skip tuning of that setting.

    On CUDA, batches are copied from pinned memory on a side stream one batch ahead of the loop.
    """

    def __init__(self, dataset: Any, *, batch_size: int, shuffle: bool = True, drop_last: bool = False,
                 collate_fn: Callable[[list[Any]], Any] | None = None, seed: int = 0,
                 rank: int = 0, world_size: int = 1, local_world_size: int = 1,
                 device: torch.device | str = "cpu",
                 num_workers: int | Auto = "auto", prefetch_factor: int | Auto = "auto",
                 pin_memory: bool | Auto = "auto", persistent_workers: bool | Auto = "auto",
                 clock: StepClock | None = None) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if world_size < 1 or not 0 <= rank < world_size or local_world_size < 1:
            raise ValueError(f"need 0 <= rank < world_size and local_world_size >= 1, got rank={rank}, "
                             f"world_size={world_size}, local_world_size={local_world_size}")
        self.dataset = dataset
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.rank, self.world_size, self.local_world_size = rank, world_size, local_world_size
        self.device = torch.device(device)
        self.clock = clock
        self._seed = seed
        self._cpus = usable_cpus()
        self.max_workers = max(1, self._cpus // local_world_size)
        self._wrapped = _SeededDataset(dataset, seed)
        self._collate = _Collate(collate_fn or default_collate)
        self.load_stats = LoadStats(split=self._wrapped.split)
        self._tuner = Tuner(num_workers=_auto_int("num_workers", num_workers, 0),
                            prefetch_factor=_auto_int("prefetch_factor", prefetch_factor, 1),
                            persistent_workers=_auto_bool("persistent_workers", persistent_workers),
                            pin_memory=_auto_bool("pin_memory", pin_memory), cuda=self.device.type == "cuda",
                            max_workers=self.max_workers, budget=trial_budget(len(self)),
                            io_bound=lambda: self.load_stats.io_bound, cpus=self._cpus)
        self._epoch = 0
        self._batch = 0
        self._dl: tuple[LoaderSettings, DataLoader[Any], EpochBatchSampler] | None = None
        self._active: _EpochIterator | None = None

    # -- public state ------------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The current epoch (advanced when an epoch's iterator is exhausted)."""
        return self._epoch

    @property
    def batch(self) -> int:
        """Batches of the current epoch already yielded on this rank."""
        return self._batch

    @property
    def seed(self) -> int:
        """The seed of the order and of the per-sample augmentation RNG."""
        return self._seed

    @property
    def settings(self) -> LoaderSettings | None:
        """The settings the trial chose (or the explicit ones); None while the trial is running."""
        return self._tuner.chosen

    @property
    def tune_report(self) -> str | None:
        """The trial table (setting -> mean step ms, data_time share); None before the trial is over."""
        return self._tuner.report() if self._tuner.done else None

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return num_batches(len(self.dataset), self.batch_size, self.drop_last, self.world_size)

    def __iter__(self) -> Iterator[Any]:
        """The rest of the current epoch (from batch `self.batch`), batches on `self.device`."""
        if self._active is not None:
            self._active.close()
        self._active = _EpochIterator(self)
        return self._active

    def state_dict(self) -> dict[str, Any]:
        """Plain values (ints, str, bool, None, nested dict) for a checkpoint: position, seed, chosen settings."""
        chosen = self._tuner.chosen
        return {"epoch": self._epoch, "batch": self._batch, "seed": self._seed,
                "settings": asdict(chosen) if chosen is not None else None,
                "cpus": self._cpus, "local_world_size": self.local_world_size, "world_size": self.world_size,
                "device_type": self.device.type}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The next `iter()` resumes at the saved epoch and batch; the saved settings are reused on the same
        machine shape (same CPUs per rank and device type), so a resumed run skips the trial."""
        if self._active is not None:
            self._active.close()
            self._active = None
        if int(state["seed"]) != self._seed:
            logger.warning("loader state has seed %s, this loader %s: using the saved seed", state["seed"],
                           self._seed)
            self._seed = int(state["seed"])
            self._wrapped.seed = self._seed
            self._close_dataloader()  # persistent workers hold a copy of the old seed
        self._epoch, self._batch = int(state["epoch"]), int(state["batch"])
        saved = state.get("settings")
        same_machine = (state.get("cpus"), state.get("local_world_size"), state.get("device_type")) == \
            (self._cpus, self.local_world_size, self.device.type)
        if saved is not None and same_machine and not self._tuner.done:
            self._tuner.adopt(LoaderSettings(**saved))

    def diagnose(self, time: float, data_time: float) -> Diagnosis | None:
        """Why mean `data_time` is over 5% of mean step `time` (seconds) and what to do; None when it is not."""
        workers = self._tuner.current.num_workers
        return diagnose(time, data_time, self.load_stats, num_workers=workers, cpus=self.max_workers)

    def load_report(self) -> str:
        """Per-sample load vs transform costs measured so far (SplitDataset), or the whole __getitem__'s."""
        return load_report(self.load_stats)

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the Loader is garbage-collected)."""
        if self._active is not None:
            self._active.close()
            self._active = None
        self._close_dataloader()

    # -- internals used by _EpochIterator ----------------------------------------------------------------------
    def _close_dataloader(self) -> None:
        if self._dl is not None:
            _shutdown(getattr(self._dl[1], "_iterator", None))
            self._dl = None

    def _host_iter(self, settings: LoaderSettings, epoch: int, start: int) -> Iterator[Any]:
        if self._dl is None or self._dl[0] != settings:
            self._close_dataloader()
            sampler = EpochBatchSampler(len(self.dataset), self.batch_size, seed=self._seed, shuffle=self.shuffle,
                                        drop_last=self.drop_last, rank=self.rank, world_size=self.world_size)
            with warnings.catch_warnings():
                # the trial may pick more workers than CPUs on purpose (I/O-bound loads)
                warnings.filterwarnings("ignore", message=".*worker processes in total.*")
                dl = DataLoader(self._wrapped, batch_sampler=sampler, num_workers=settings.num_workers,
                                collate_fn=self._collate, pin_memory=settings.pin_memory,
                                prefetch_factor=settings.prefetch_factor,
                                persistent_workers=settings.persistent_workers,
                                # its own generator: DataLoader draws a base seed per iterator, which would
                                # otherwise advance the global torch RNG once per trial switch
                                generator=torch.Generator().manual_seed(0))
            self._dl = (settings, dl, sampler)
        _, dl, sampler = self._dl
        sampler.set_position(epoch, start, self._seed)
        return iter(dl)

    def _release(self, it: Iterator[Any]) -> None:
        if self._dl is None or not self._dl[0].persistent_workers:
            _shutdown(it)


_Item = tuple[Any, tuple[int, float, float, float, float]]


class _EpochIterator:
    """One epoch's batches from the Loader's position on: times each `__next__`, feeds the tuner and the clock,
    and on CUDA keeps the next batch's host-to-device copy in flight on a side stream."""

    def __init__(self, loader: Loader) -> None:
        self._loader = loader
        self._epoch = loader.epoch
        self._next_host = loader.batch          # index of the next batch to take from the DataLoader
        self._total = len(loader)
        self._host: Iterator[Any] | None = None
        cuda = loader.device.type == "cuda"
        self._stream = torch.cuda.Stream(loader.device) if cuda else None
        self._pending: _Item | None = None      # CUDA: next batch, its copy enqueued on self._stream
        self._pending_error: BaseException | None = None
        self._exhausted = False
        self._closed = False
        loader._tuner.restart()

    def __iter__(self) -> _EpochIterator:
        return self

    def __next__(self) -> Any:
        loader = self._loader
        if self._closed:
            raise StopIteration
        t0 = time.perf_counter()
        if loader.clock is not None:
            loader.clock.next_called(t0)
        if loader._tuner.on_next(t0):
            self._drop_host()               # the next fetch starts a DataLoader with the new settings
        try:
            batch, stats = self._take()
        except StopIteration:
            self._end()
            raise
        except SampleError as exc:
            if "Original Traceback" in str(exc):   # re-raised from a worker by DataLoader
                raise SampleError.from_worker(exc) from exc
            raise
        t1 = time.perf_counter()
        index = loader._batch
        loader._batch += 1
        loader.load_stats.add(stats)
        loader._tuner.on_ready(t1 - t0)
        if loader.clock is not None:
            loader.clock.batch_ready(t1, BatchTiming(epoch=self._epoch, index=index, data_time=t1 - t0,
                                                     samples=stats[0]))
        return batch

    def _fetch_host(self) -> _Item:
        if self._next_host >= self._total:
            raise StopIteration
        if self._host is None:
            self._host = self._loader._host_iter(self._loader._tuner.current, self._epoch, self._next_host)
        item: _Item = next(self._host)
        self._next_host += 1
        return item

    def _take(self) -> _Item:
        device = self._loader.device
        if self._stream is None:
            batch, stats = self._fetch_host()
            return (batch if device.type == "cpu" else _copy_to(batch, device, False)), stats
        if self._pending is None:
            if self._pending_error is not None:
                raise self._pending_error
            if self._exhausted:
                raise StopIteration
            self._pending = self._copy(self._fetch_host())
        batch, stats = self._pending
        self._pending = None
        compute = torch.cuda.current_stream(device)
        compute.wait_stream(self._stream)   # the copy must finish before the model reads the batch
        _record(batch, compute)
        try:
            self._pending = self._copy(self._fetch_host())   # one batch ahead, overlapping this step
        except StopIteration:
            self._exhausted = True
        except SampleError as exc:            # belongs to the next batch: raise it on the next call
            self._pending_error = exc
        return batch, stats

    def _copy(self, item: _Item) -> _Item:
        assert self._stream is not None
        with torch.cuda.stream(self._stream):
            return _copy_to(item[0], self._loader.device, True), item[1]

    def _drop_host(self) -> None:
        if self._host is not None:
            self._loader._release(self._host)
            self._host = None

    def _end(self) -> None:
        loader = self._loader
        self.close()
        if loader._active is self:
            loader._active = None
        if loader.epoch == self._epoch:
            loader._epoch, loader._batch = self._epoch + 1, 0
        loader._tuner.restart()
        if loader.clock is not None:
            loader.clock.epoch_done(time.perf_counter())

    def close(self) -> None:
        """Stop serving: drop the DataLoader iterator (its workers stop unless they are persistent)."""
        self._closed = True
        self._pending = None
        self._drop_host()
