"""Recompile detection of tandem.train.compile on a shape change (eager backends: no C++ compile)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from tandem.train.compile import RecompileError, compile_module, compile_stats


class _Head(nn.Linear):
    pass


class _Backbone(nn.Linear):
    pass


class _Strict(nn.Linear):
    pass


def test_shape_change_is_counted_and_its_reason_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    region = compile_module(_Head(4, 3), name="head-t1", backend="eager", dynamic=False)
    with caplog.at_level(logging.WARNING, logger="tandem.train.compile"):
        for n in (2, 2, 3, 4):
            assert region(torch.randn(n, 4)).shape == (n, 3)
    stats = compile_stats()["head-t1"]
    assert stats["compiles"] == 3 and stats["recompiles"] == 2
    assert "size mismatch" in stats["reasons"][0] and stats["compile_s"] > 0
    warnings = [r for r in caplog.records if "recompiles" in r.getMessage()]
    assert len(warnings) == 1 and "head-t1" in warnings[0].getMessage()
    assert region.state_dict().keys() == _Head(4, 3).state_dict().keys()


def test_two_regions_are_counted_separately() -> None:
    a = compile_module(_Backbone(4, 4), name="backbone-t2", backend="eager", dynamic=False)
    b = compile_module(nn.Sequential(nn.Linear(4, 2)), name="seq-t2", backend="eager", dynamic=False)
    for n in (2, 3):
        b(a(torch.randn(n, 4)))
    a(torch.randn(5, 4))
    stats = compile_stats()
    assert stats["backbone-t2"]["recompiles"] == 2 and stats["seq-t2"]["recompiles"] == 1


def test_fail_on_recompile_raises_naming_the_region() -> None:
    region = compile_module(_Strict(4, 3), name="strict-t3", backend="aot_eager", dynamic=False,
                            fail_on_recompile=True)
    region(torch.randn(2, 4))
    region(torch.randn(2, 4))
    with pytest.raises(RecompileError, match="strict-t3") as info:
        region(torch.randn(3, 4))
    assert info.value.region == "strict-t3" and "size mismatch" in info.value.reason
    assert region(torch.randn(2, 4)).shape == (2, 3)   # the compiled shape still runs


def test_checkpoints_of_a_model_with_a_compiled_part_keep_eager_keys() -> None:
    eager = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    model[0] = compile_module(model[0], name="part-t4", backend="eager")
    assert model.state_dict().keys() == eager.state_dict().keys()
    model.load_state_dict(eager.state_dict())
    torch.testing.assert_close(model.state_dict()["0.weight"], eager[0].weight)


class _Timed(nn.Linear):
    pass


def test_compiler_seconds_counts_compiles_and_not_calls() -> None:
    from tandem.train.compile import compiler_seconds

    before = compiler_seconds()
    region = compile_module(_Timed(64, 64), name="timed-t5", backend="aot_eager", dynamic=False)
    region(torch.randn(8, 64)).sum().backward()
    first = compiler_seconds()
    assert 0 < first - before <= compile_stats()["timed-t5"]["compile_s"]   # the compile, within the first call
    for _ in range(3):
        region(torch.randn(8, 64)).sum().backward()
    assert compiler_seconds() == first                                     # cached graph: nothing compiled
    region(torch.randn(9, 64))
    assert compiler_seconds() > first                                      # a recompile is counted
