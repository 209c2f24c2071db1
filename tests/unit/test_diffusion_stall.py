"""StallMeter: iterations the denoising loop loses to VAE decodes, from the loop's interval stream."""

from __future__ import annotations

import pytest

from tandem.diffusion.metrics import StallMeter


def test_one_decode_that_slows_two_iterations_by_half_costs_one_iteration() -> None:
    m = StallMeter()
    assert m.observe(0.1, 4, busy=False, done=0) is None        # baseline at 4 rows: 100 ms
    assert m.observe(0.15, 4, busy=True, done=0) is None
    assert m.observe(0.15, 4, busy=True, done=0) is None
    assert m.observe(0.1, 4, busy=False, done=1) == pytest.approx(1.0)
    assert m.unmeasured == 0


def test_lost_iterations_are_per_decode_and_never_negative() -> None:
    m = StallMeter()
    m.observe(0.1, 2, busy=False, done=5)
    m.observe(0.3, 2, busy=True, done=5)                      # two decodes overlapped this stretch
    assert m.observe(0.1, 2, busy=False, done=7) == pytest.approx(1.0)
    m.observe(0.09, 2, busy=True, done=7)                     # faster than the baseline: noise, not a gain
    assert m.observe(0.1, 2, busy=False, done=8) == 0.0


def test_baselines_are_per_row_count_and_follow_an_ewma() -> None:
    m = StallMeter(alpha=0.5)
    m.observe(0.1, 2, busy=False, done=0)
    m.observe(0.2, 2, busy=False, done=0)
    m.observe(0.4, 8, busy=False, done=0)
    assert m.base == {2: pytest.approx(0.15), 8: pytest.approx(0.4)}
    m.observe(0.8, 8, busy=True, done=0)                      # 8 rows: against 0.4, not 2 rows' 0.15
    assert m.observe(0.4, 8, busy=False, done=1) == pytest.approx(1.0)


def test_stretches_without_a_baseline_or_cut_by_idleness_are_counted_unmeasured() -> None:
    m = StallMeter()
    m.observe(0.1, 2, busy=False, done=0)
    m.observe(0.3, 6, busy=True, done=0)                      # no decode-free interval at 6 rows yet
    assert m.observe(0.1, 2, busy=False, done=1) is None and m.unmeasured == 1
    m.observe(0.3, 2, busy=True, done=1)
    m.reset()                                                 # the loop went idle mid-stretch
    assert m.unmeasured == 2
    m.reset()                                                 # nothing open: nothing counted
    assert m.unmeasured == 2 and m.observe(0.1, 2, busy=False, done=2) is None
