"""One rule for "equals the reference implementation": a tolerance per dtype, used by every parity test.

    assert_close_to_reference(got, want, "float32", what="logits vs transformers")

`got` and `want` may be torch tensors, numpy arrays or nested lists. The tolerance is the dtype's
row of TOLERANCES (absolute, relative); a test that needs a looser bound says why in `what` and passes
its own `atol`/`rtol`, so every exception to the rule is visible where it is made.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["MIN_PSNR_DB", "TOLERANCES", "assert_close_to_reference", "assert_same_image", "cosine_rows", "psnr"]

# (atol, rtol) per dtype the fast path computes in. fp32: reordered reductions and fused kernels
# stay within 1e-4 on logits of the small test models; bf16/fp16 carry 8/11 mantissa bits.
TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-9, 1e-7),
    "float32": (1e-4, 0.0),
    "float16": (1e-2, 1e-2),
    "bfloat16": (3e-2, 2e-2),
}


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def assert_close_to_reference(got: Any, want: Any, dtype: str = "float32", *, what: str = "",
                              atol: float | None = None, rtol: float | None = None) -> None:
    """Fail with the worst element when |got - want| > atol + rtol * |want| anywhere (shapes must match)."""
    if dtype not in TOLERANCES:
        raise KeyError(f"no tolerance for dtype {dtype!r}; known: {sorted(TOLERANCES)}")
    default_atol, default_rtol = TOLERANCES[dtype]
    a = _numpy(got)
    b = _numpy(want)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != reference {b.shape}"
    tol_a = default_atol if atol is None else atol
    tol_r = default_rtol if rtol is None else rtol
    err = np.abs(a - b)
    bound = tol_a + tol_r * np.abs(b)
    if not np.all(err <= bound):
        worst = tuple(int(i) for i in np.unravel_index(int(np.argmax(err - bound)), err.shape))
        raise AssertionError(f"{what or 'parity'} ({dtype}): max |diff| {err.max():.3g} at {worst} "
                             f"(got {a[worst]:.6g}, reference {b[worst]:.6g}); allowed {tol_a:g} + {tol_r:g}*|ref|")


def cosine_rows(a: Any, b: Any) -> np.ndarray:
    """Cosine similarity of matching rows, for embeddings compared with their reference."""
    x, y = _numpy(a), _numpy(b)
    return np.sum(x * y, axis=-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))


# Images: the rule for "equals stock diffusers" (fp32 on CPU) is PSNR >= 40 dB on uint8 pixels.
MIN_PSNR_DB = 40.0


def psnr(a: Any, b: Any) -> float:
    """Peak signal-to-noise ratio of two uint8 images (inf when identical)."""
    x, y = _numpy(a), _numpy(b)
    assert x.shape == y.shape, f"image shape {x.shape} != {y.shape}"
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def assert_same_image(got: Any, want: Any, *, what: str = "", min_db: float = MIN_PSNR_DB) -> None:
    """Fail unless PSNR(got, want) >= min_db; a test asking for less says why in `what`."""
    value = psnr(got, want)
    assert value >= min_db, f"{what or 'image parity'}: PSNR {value:.1f} dB < {min_db:g} dB"

