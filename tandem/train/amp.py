"""Precision handling: autocast per precision, and a GradScaler wrapper that counts skipped steps.

    "32"          no autocast, no scaler
    "bf16-mixed"  autocast(bfloat16) on CPU and CUDA; bf16 keeps fp32's exponent range, so no scaler
    "16-mixed"    autocast(float16) + torch.amp.GradScaler, CUDA only (refused on CPU, naming bf16-mixed)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from typing import Any, Literal

import torch
from torch import nn

from tandem.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["PRECISIONS", "Precision", "PrecisionError", "Scaler", "autocast", "check_precision", "make_scaler"]

Precision = Literal["32", "bf16-mixed", "16-mixed"]
PRECISIONS: tuple[str, ...] = ("32", "bf16-mixed", "16-mixed")
_DTYPES: dict[str, torch.dtype] = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


class PrecisionError(ConfigError):
    """A precision this machine cannot train in; the message names the fix."""


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse unknown precisions and float16 mixed precision off CUDA, each with the fix."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"precision={precision!r} is not one of {', '.join(map(repr, PRECISIONS))}")
    if precision == "16-mixed" and device.type != "cuda":
        raise PrecisionError(
            f"precision='16-mixed' (float16 autocast + GradScaler) needs a CUDA GPU; this run trains on "
            f"{device.type}. Use precision='bf16-mixed' (bfloat16 autocast works on CPU) or precision='32'.")


def autocast(precision: str, device: torch.device) -> ContextManager[Any]:
    """The autocast context for `precision` on `device` (a no-op context for "32")."""
    dtype = _DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_float32(obj: Any) -> Any:
    """Half-precision tensors in a model's output back to float32 (as Fabric does), so losses run in fp32."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.dtype in (torch.float16, torch.bfloat16) else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(to_float32(x) for x in obj))
    if isinstance(obj, list | tuple):
        return type(obj)(to_float32(x) for x in obj)
    if isinstance(obj, dict):
        out = obj.copy()
        for key, value in obj.items():
            out[key] = to_float32(value)
        return out
    return obj


def _params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class Scaler:
    """torch.amp.GradScaler behind one step(): unscale, clip, step (skipped on inf/nan), update, count skips.

    Disabled (precision "32"/"bf16-mixed") it only clips and steps. A skipped step is one whose update
    lowered the scale; the count stays a device tensor so a step costs no extra host sync.
    """

    def __init__(self, device_type: str, *, enabled: bool, init_scale: float = 2.0**16) -> None:
        self.enabled = enabled
        self._scaler = torch.amp.GradScaler(device_type, init_scale=init_scale, enabled=enabled)
        self._skipped: torch.Tensor | int = 0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss multiplied by the current scale (unchanged when disabled)."""
        return self._scaler.scale(loss) if self.enabled else loss

    def _scale_tensor(self) -> torch.Tensor:
        scale = getattr(self._scaler, "_scale", None)   # private, but reading it avoids a sync per step
        if isinstance(scale, torch.Tensor):
            return scale.detach().clone()
        return torch.tensor(self._scaler.get_scale())

    def step(self, optimizer: torch.optim.Optimizer, *, grad_clip: float | None = None,
             closure: Callable[[], Any] | None = None) -> torch.Tensor | bool:
        """One optimizer step; returns whether it was skipped (a 0-dim bool tensor when the scaler is on)."""
        if closure is not None and (self.enabled or grad_clip is not None):
            raise ConfigError("optimizer.step(closure) cannot be combined with grad_clip or the fp16 GradScaler; "
                              "compute the loss in the loop and call optimizer.step() without a closure")
        if not self.enabled:
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(_params(optimizer), grad_clip)
            optimizer.step(closure) if closure is not None else optimizer.step()
            return False
        self._scaler.unscale_(optimizer)
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(_params(optimizer), grad_clip)
        before = self._scale_tensor()
        self._scaler.step(optimizer)
        self._scaler.update()
        skipped = self._scale_tensor().to(before.device) < before
        self._skipped = self._skipped + skipped.long()
        return skipped

    @property
    def skipped(self) -> int:
        """Steps skipped so far (a host sync)."""
        return int(self._skipped)

    @property
    def scale_value(self) -> float:
        """The current loss scale (1.0 when disabled)."""
        return float(self._scaler.get_scale()) if self.enabled else 1.0

    def state_dict(self) -> dict[str, Any]:
        """Scale, growth tracker and skipped count: plain numbers, loadable with weights_only=True."""
        state: dict[str, Any] = dict(self._scaler.state_dict()) if self.enabled else {}
        state["skipped"] = self.skipped
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict() returned."""
        state = dict(state)
        self._skipped = int(state.pop("skipped", 0))
        if self.enabled and state:
            self._scaler.load_state_dict(state)


def make_scaler(precision: str, device: torch.device) -> Scaler:
    """The scaler for `precision`: a real GradScaler only for "16-mixed"."""
    return Scaler(device.type, enabled=precision == "16-mixed")

