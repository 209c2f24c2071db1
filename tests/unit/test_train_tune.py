"""Loader tuning: the online trial picks more workers for a transform-heavy dataset than for a trivial one."""

from __future__ import annotations

import time

import torch

from tandem.train._tune import LoaderSettings, Tuner, trial_budget, worker_ladder
from tandem.train.data import Loader


class Trivial:
    def __len__(self) -> int:
        return 2000

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((8,), float(i))


class Heavy(Trivial):
    """A transform that burns ~3 ms of CPU per sample in pure Python (decode + augment stand-in)."""

    def __getitem__(self, i: int) -> torch.Tensor:
        end = time.thread_time() + 0.003
        x = 0
        while time.thread_time() < end:
            x += 1
        return torch.full((8,), float(i + x % 1))


def _train(loader: Loader, model: torch.nn.Module) -> int:
    """A tiny model step plus 6 ms in which the main process waits, as it does for a GPU step."""
    steps = 0
    for batch in loader:
        loss = model(batch).square().mean()
        loss.backward()
        with torch.no_grad():   # plain SGD: torch.optim's first step imports dynamo (seconds)
            for p in model.parameters():
                assert p.grad is not None
                p.add_(p.grad, alpha=-0.01)
                p.grad = None
        time.sleep(0.006)
        steps += 1
        if loader.settings is not None and steps > 2:
            break
    loader.close()
    return steps


def test_tuning_picks_more_workers_for_heavy_transforms() -> None:
    trivial = Loader(Trivial(), batch_size=4)
    heavy = Loader(Heavy(), batch_size=4)
    _train(trivial, torch.nn.Linear(8, 1))
    steps = _train(heavy, torch.nn.Linear(8, 1))
    assert trivial.settings is not None and heavy.settings is not None
    assert steps <= trial_budget(len(heavy)) + 8
    assert trivial.settings.num_workers == 0, trivial.tune_report
    assert heavy.settings.num_workers > trivial.settings.num_workers, heavy.tune_report
    assert heavy.settings.persistent_workers and not heavy.settings.pin_memory
    assert heavy.tune_report is not None and "<- chosen" in heavy.tune_report


def _feed(tuner: Tuner, step_ms: dict[int, float], data_share: dict[int, float], limit: int = 200) -> int:
    """Drive the tuner with synthetic timestamps: each setting has a fixed step time and data share."""
    t, calls = 0.0, 0
    while not tuner.done and calls < limit:
        tuner.on_next(t)
        nw = tuner.current.num_workers
        tuner.on_ready(step_ms[nw] * data_share[nw] / 1e3)
        t += step_ms[nw] / 1e3
        calls += 1
    return calls


def test_ladder_ties_go_to_fewer_workers_and_budget_holds() -> None:
    assert worker_ladder(1) == [0, 1] and worker_ladder(8) == [0, 1, 2, 4, 7, 8]
    tuner = Tuner(num_workers=None, prefetch_factor=None, persistent_workers=None, pin_memory=None, cuda=True,
                  max_workers=8, budget=64)
    # 1 worker no faster than 0 (worker-bound), 2 halves the step, 4 is a tie with 2, 7 clearly worse
    step = {0: 20.0, 1: 20.0, 2: 10.0, 4: 9.9, 7: 14.0, 8: 15.0}
    share = {0: 0.5, 1: 0.5, 2: 0.2, 4: 0.2, 7: 0.1, 8: 0.1}
    calls = _feed(tuner, step, share)
    assert tuner.chosen is not None and tuner.chosen.num_workers == 2 and tuner.chosen.pin_memory
    assert [r.settings.num_workers for r in tuner.rows][:4] == [0, 1, 2, 4]
    assert calls <= 64 + 4


def test_negligible_data_time_stops_the_ladder_and_explicit_settings_skip_it() -> None:
    tuner = Tuner(num_workers=None, prefetch_factor=None, persistent_workers=None, pin_memory=None, cuda=False,
                  max_workers=16, budget=64)
    _feed(tuner, {0: 5.0}, {0: 0.01})
    assert tuner.chosen == LoaderSettings(0, None, False, False) and len(tuner.rows) == 1
    fixed = Tuner(num_workers=3, prefetch_factor=4, persistent_workers=False, pin_memory=False, cuda=True,
                  max_workers=16, budget=64)
    assert fixed.chosen == LoaderSettings(3, 4, False, False)


def test_a_rung_that_bought_step_time_goes_on_up_even_with_negligible_data_time() -> None:
    """Workers can shorten the step after data_time is negligible (the seed's 4-worker case): measure, don't stop."""
    share = {0: 0.4, 1: 0.01, 2: 0.01}
    faster = Tuner(num_workers=None, prefetch_factor=2, persistent_workers=None, pin_memory=None, cuda=False,
                   max_workers=2, budget=64)
    _feed(faster, {0: 30.0, 1: 20.0, 2: 15.0}, share)
    assert faster.chosen is not None and faster.chosen.num_workers == 2, faster.report()
    flat = Tuner(num_workers=None, prefetch_factor=2, persistent_workers=None, pin_memory=None, cuda=False,
                 max_workers=4, budget=64)
    _feed(flat, {0: 30.0, 1: 20.0, 2: 19.5, 3: 15.0, 4: 15.0}, {**share, 3: 0.01, 4: 0.01})
    assert [r.settings.num_workers for r in flat.rows] == [0, 1, 2]  # 2 bought nothing: stop there
    assert flat.chosen is not None and flat.chosen.num_workers == 1  # and the tie goes to fewer workers


def test_io_bound_loads_try_more_workers_than_cpus() -> None:
    tuner = Tuner(num_workers=None, prefetch_factor=2, persistent_workers=None, pin_memory=None, cuda=False,
                  max_workers=2, budget=64, io_bound=lambda: True)
    step = {0: 40.0, 1: 20.0, 2: 10.0, 4: 5.0, 8: 5.0}
    share = {0: 0.9, 1: 0.8, 2: 0.6, 4: 0.2, 8: 0.2}
    _feed(tuner, step, share)
    assert tuner.chosen is not None and tuner.chosen.num_workers == 4


def test_trial_spans_short_epochs() -> None:
    """Epochs of 3 batches: each new iterator warms up again and the measurement continues across epochs."""
    tuner = Tuner(num_workers=None, prefetch_factor=2, persistent_workers=None, pin_memory=None, cuda=False,
                  max_workers=2, budget=trial_budget(3))
    step = {0: 20.0, 1: 12.0, 2: 6.0}
    t, calls = 0.0, 0
    while not tuner.done and calls < 100:
        tuner.restart()
        for _ in range(4):    # 3 batches, then the call that raises StopIteration
            tuner.on_next(t)
            tuner.on_ready(0.5 * step[tuner.current.num_workers] / 1e3)
            t += step[tuner.current.num_workers] / 1e3
            calls += 1
        t += 1.0              # evaluation between epochs: never counted
    assert tuner.done and calls <= trial_budget(3) + 8
    assert all(r.steps >= 2 and r.step_time < 0.1 for r in tuner.rows)
    assert tuner.chosen is not None and tuner.chosen.num_workers == 2
