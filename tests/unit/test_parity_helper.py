"""The shared parity rule itself: passes within the dtype's tolerance, fails outside it, names the worst element."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.parity import TOLERANCES, assert_close_to_reference, cosine_rows


def test_within_and_outside_the_fp32_tolerance() -> None:
    want = torch.zeros(3, 4)
    assert_close_to_reference(want + 0.5 * TOLERANCES["float32"][0], want, "float32")
    bad = want.clone()
    bad[2, 1] = 10 * TOLERANCES["float32"][0]
    with pytest.raises(AssertionError, match=r"at \(2, 1\)"):
        assert_close_to_reference(bad, want, "float32", what="logits")


def test_bf16_is_looser_and_relative() -> None:
    want = np.full(5, 100.0)
    assert_close_to_reference(want * 1.01, want, "bfloat16")
    with pytest.raises(AssertionError):
        assert_close_to_reference(want * 1.01, want, "float32")


def test_shape_mismatch_and_unknown_dtype_fail() -> None:
    with pytest.raises(AssertionError, match="shape"):
        assert_close_to_reference(np.zeros(3), np.zeros(4))
    with pytest.raises(KeyError, match="int3"):
        assert_close_to_reference(np.zeros(3), np.zeros(3), "int3")


def test_cosine_rows() -> None:
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(cosine_rows(a, a), [1.0, 1.0])
    np.testing.assert_allclose(cosine_rows(a, [[0.0, 1.0], [-1.0, -1.0]]), [0.0, -1.0], atol=1e-12)
