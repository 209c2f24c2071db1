"""tandem.train.data: batch content independent of workers and resume, rank split, errors, clock, diagnosis."""

from __future__ import annotations

import random
import time
from typing import Any

import numpy as np
import pytest
import torch

from tandem.train._sampler import num_batches, rank_batches
from tandem.train.data import BatchTiming, Loader, SampleError
from tandem.train.diagnose import LoadStats, diagnose, load_report


class Augmented:
    """Each sample draws from torch, random and numpy: content must depend only on (seed, epoch, index)."""

    def __init__(self, n: int = 37) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.tensor([torch.rand(()).item(), random.random(), float(np.random.rand())])
        return torch.tensor(i), noise


class Failing(Augmented):
    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i == 7:
            raise ValueError("corrupt record 7")
        return super().__getitem__(i)


class Split:
    """A SplitDataset: load waits (sleep: I/O), transform burns CPU."""

    def __len__(self) -> int:
        return 8

    def load(self, index: int) -> int:
        time.sleep(0.002)
        return index

    def transform(self, sample: int) -> torch.Tensor:
        x = 0
        for k in range(3000):
            x += k * k
        return torch.tensor(sample)


def _all(loader: Loader) -> list[Any]:
    return list(loader)


def _same(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_content_does_not_depend_on_workers_and_epochs_differ() -> None:
    kw: dict[str, Any] = {"batch_size": 5, "seed": 11, "prefetch_factor": 2, "persistent_workers": True}
    zero = Loader(Augmented(), num_workers=0, **kw)
    two = Loader(Augmented(), num_workers=2, **kw)
    e0, e0w = _all(zero), _all(two)
    assert _same(e0, e0w)
    assert zero.epoch == 1 and zero.batch == 0 and len(e0) == len(zero) == 8
    e1, e1w = _all(zero), _all(two)     # second epoch: persistent workers, new order
    assert _same(e1, e1w)
    assert not torch.equal(torch.cat([b[0] for b in e0]), torch.cat([b[0] for b in e1]))
    assert sorted(torch.cat([b[0] for b in e1]).tolist()) == list(range(37))
    two.close()


def test_resume_mid_epoch_serves_the_exact_next_batch() -> None:
    ref = _all(Loader(Augmented(), batch_size=4, seed=3, num_workers=0))
    first = Loader(Augmented(), batch_size=4, seed=3, num_workers=1, prefetch_factor=2)
    it = iter(first)
    for _ in range(4):
        next(it)
    state = first.state_dict()
    first.close()
    assert state["epoch"] == 0 and state["batch"] == 4
    again = Loader(Augmented(), batch_size=4, seed=3, num_workers=0)
    again.load_state_dict(state)
    assert _same(_all(again), ref[4:])
    assert again.epoch == 1


def test_main_process_rng_is_untouched_by_loading() -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    _all(Loader(Augmented(), batch_size=4, num_workers=0))
    assert torch.equal(torch.rand(3), expected)


def test_rank_split_forms_the_global_batch() -> None:
    n, b, w = 23, 3, 2
    glob = rank_batches(n, b * w, seed=1, epoch=2, shuffle=True, drop_last=True, rank=0, world_size=1)
    ranks = [rank_batches(n, b, seed=1, epoch=2, shuffle=True, drop_last=True, rank=r, world_size=w)
             for r in range(w)]
    assert len(ranks[0]) == len(ranks[1]) == len(glob) == num_batches(n, b, True, w) == 3
    for k, g in enumerate(glob):
        assert sorted(ranks[0][k] + ranks[1][k]) == sorted(g)
    padded = [rank_batches(n, b, seed=1, epoch=0, shuffle=False, drop_last=False, rank=r, world_size=w)
              for r in range(w)]
    assert len(padded[0]) == len(padded[1]) == num_batches(n, b, False, w) == 4
    assert set(sum(padded[0] + padded[1], [])) == set(range(n))


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_sample_names_index_worker_and_error(workers: int) -> None:
    loader = Loader(Failing(), batch_size=4, shuffle=False, num_workers=workers, prefetch_factor=2)
    with pytest.raises(SampleError) as info:
        _all(loader)
    err = info.value
    text = str(err)
    assert err.index == 7 and "sample 7" in text
    assert "ValueError: corrupt record 7" in text
    if workers:
        assert err.worker in (0, 1) and f"DataLoader worker {err.worker}" in text
    else:
        assert err.worker is None and "main process" in text
    loader.close()


class Clock:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def next_called(self, t: float) -> None:
        self.events.append(("next", t))

    def batch_ready(self, t: float, timing: BatchTiming) -> None:
        self.events.append(("ready", timing))

    def epoch_done(self, t: float) -> None:
        self.events.append(("done", t))


def test_clock_sees_every_batch_and_the_epoch_end() -> None:
    clock = Clock()
    loader = Loader(Augmented(10), batch_size=4, num_workers=0, clock=clock)
    _all(loader)
    kinds = [k for k, _ in clock.events]
    assert kinds == ["next", "ready"] * 3 + ["next", "done"]
    timings = [v for k, v in clock.events if k == "ready"]
    assert [t.index for t in timings] == [0, 1, 2] and [t.samples for t in timings] == [4, 4, 2]
    assert all(t.epoch == 0 and t.data_time >= 0 for t in timings)


def test_split_dataset_report_and_diagnosis() -> None:
    loader = Loader(Split(), batch_size=4, num_workers=0)
    _all(loader)
    stats = loader.load_stats
    assert stats.split and stats.samples == 8 and stats.load_wall > 8 * 0.0015
    assert stats.io_bound   # sleep: wall >> CPU
    report = loader.load_report()
    assert "load" in report and "transform" in report and "waits on I/O" in report
    diag = loader.diagnose(0.010, 0.004)
    assert diag is not None and diag.cause == "io" and "local disk" in diag.message
    assert loader.diagnose(0.010, 0.0004) is None


def test_diagnose_cpu_bound() -> None:
    stats = LoadStats(split=True)
    stats.add((10, 0.010, 0.009, 0.050, 0.049))
    diag = diagnose(0.1, 0.03, stats, num_workers=2, cpus=8)
    assert diag is not None and diag.cause == "cpu"
    assert "num_workers" in diag.message and "tandem data resize" in diag.message and "GPU" in diag.message
    assert "getitem" in load_report(LoadStats(samples=1, load_wall=0.001, load_cpu=0.001))


@pytest.mark.gpu
def test_cuda_prefetch_matches_cpu_content() -> None:
    """Side-stream copies one batch ahead: same content as on CPU, on the device, pinned, through a trial."""
    ref = _all(Loader(Augmented(200), batch_size=5, seed=2, num_workers=0))
    loader = Loader(Augmented(200), batch_size=5, seed=2, device="cuda")
    out = []
    for index, noise in loader:
        assert index.is_cuda and noise.is_cuda
        out.append(((index * 1).cpu(), (noise + 0).cpu()))   # kernels on the compute stream read the copy
    assert _same(out, ref)
    assert loader.settings is not None and loader.settings.pin_memory
    loader.close()
