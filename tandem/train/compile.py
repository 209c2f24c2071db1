"""Compile a chosen sub-module with torch.compile and watch it for recompiles.

    compile_module(backbone, name="backbone")         -> nn.Module whose forward runs the compiled region
      ├── _CountingBackend      wraps the backend: one call per graph compiled; times it
      ├── RecompileDetector     one per region: dynamo's guard_fail_fn records why a cached graph no longer
      │                         fits (the recompile reason), logged once (logger.warning), counted every time
      └── fail_on_recompile     after the first call, calls run under torch.compiler.set_stance(
                                "fail_on_recompile"): a recompile raises RecompileError(region, reason)

Why per sub-module: dynamic shapes (a variable-length head, a last smaller batch) make dynamo re-capture the
graph; compiling only the static part (a backbone) keeps recompiles out, and the detector says when they
happen anyway. compile_stats() reports, per region, graphs compiled, recompiles, the first call's seconds
(compile time) and the seconds of calls that recompiled, separately from steady-state step time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from tandem.errors import TandemError

logger = logging.getLogger(__name__)

__all__ = ["CompiledRegion", "RecompileDetector", "RecompileError", "RegionStats", "compile_module",
           "compile_stats", "compiler_seconds", "reset_compile_stats"]

_STANCE_MESSAGE = "Detected recompile when torch.compile stance is 'fail_on_recompile'"


class RecompileError(TandemError):
    """A compiled region was about to recompile and was told to fail instead (fail_on_recompile=True)."""

    def __init__(self, region: str, reason: str) -> None:
        super().__init__(f"compiled region {region!r} would recompile: {reason}. Make its input shapes static "
                         f"(pad, drop_last=True), mark the dimension dynamic, or compile a smaller sub-module")
        self.region = region
        self.reason = reason


@dataclass
class RegionStats:
    """What one compiled region did so far."""

    name: str
    compiles: int = 0            # graphs the backend compiled (first compile, graph breaks and recompiles)
    recompiles: int = 0          # compiles caused by a guard failure on an already compiled graph
    compile_s: float | None = None   # wall seconds of the first call (trace + compile + run)
    recompile_s: float = 0.0     # wall seconds of the calls that recompiled
    reasons: list[str] = field(default_factory=list)   # guard-failure reason of each recompile

    def as_dict(self) -> dict[str, Any]:
        """Plain values (for logs and benchmark tables)."""
        return {"name": self.name, "compiles": self.compiles, "recompiles": self.recompiles,
                "compile_s": self.compile_s, "recompile_s": self.recompile_s, "reasons": list(self.reasons)}


_REGIONS: dict[str, RegionStats] = {}
_LOCK = threading.Lock()


def compile_stats() -> dict[str, dict[str, Any]]:
    """Per-region statistics of every region compile_module() made in this process."""
    with _LOCK:
        return {name: stats.as_dict() for name, stats in _REGIONS.items()}


# dynamo's own timers (torch._dynamo.utils.compile_times): a frame's whole compile (tracing, AOTAutograd and
# the backend's forward graph), and the backward graphs AOTAutograd compiles lazily, at the first backward
_COMPILER_TIMERS = ("_compile.compile_inner", "compile_fx.<locals>.bw_compiler")


def compiler_seconds() -> float:
    """Seconds this process has spent in torch.compile's compiler: every frame dynamo compiled (first compiles,
    graph breaks, recompiles) plus lazily compiled backward graphs, as dynamo times them.

    Unlike a region's ``compile_s`` (the first call's wall time), it holds no run time, and unlike a first-step
    difference it holds no data loading. A warm inductor cache (``TORCHINDUCTOR_CACHE_DIR``, kept across
    processes) makes it several times smaller than a cold one.
    """
    from torch._dynamo.utils import compile_times

    timed = compile_times(repr="csv", aggregate=True)
    if not isinstance(timed, tuple):
        return 0.0
    headers, values = timed
    seconds = {str(k): str(v) for k, v in zip(headers, values, strict=True)}
    return sum(float(seconds[k]) for k in _COMPILER_TIMERS if k in seconds)


def reset_compile_stats() -> None:
    """Forget the statistics (tests, benchmarks); compiled regions keep working and start counting anew."""
    with _LOCK:
        for stats in _REGIONS.values():
            fresh = RegionStats(stats.name)
            stats.__dict__.update(fresh.__dict__)


class RecompileDetector:
    """Counts compiles and recompiles of one region. Dynamo calls guard_fail() with each cached graph's failure
    reason when a call finds no matching graph (a recompile is coming); the backend call that follows is
    counted as that recompile. The first reason is logged as a warning; later ones at debug level."""

    def __init__(self, region: str) -> None:
        self.region = region
        with _LOCK:
            self.stats = _REGIONS.setdefault(region, RegionStats(region))
        self._pending: str | None = None

    def guard_fail(self, failure: Any) -> None:
        """dynamo's guard_fail_fn: `failure` is a GuardFail(reason, orig_code)."""
        if self._pending is None:   # one call per cached graph; the first names the most recent graph
            self._pending = str(getattr(failure, "reason", failure))

    def graph_compiled(self) -> None:
        """The backend compiled a graph: a recompile when a guard failure is pending."""
        self.stats.compiles += 1
        if self._pending is not None:
            self._recompiled(self._pending)
            self._pending = None

    def call_started(self) -> None:
        """A region call begins: a guard failure recorded by another region's lookup is not ours."""
        self._pending = None

    def call_ended(self) -> None:
        """A guard failure without a compile (recompile limit hit: dynamo runs the region eagerly)."""
        if self._pending is not None:
            self._recompiled(self._pending + " (recompile limit reached: running eagerly)")
            self._pending = None

    def _recompiled(self, reason: str) -> None:
        self.stats.recompiles += 1
        self.stats.reasons.append(reason)
        if self.stats.recompiles == 1:
            logger.warning("compiled region %r recompiles (guard failure: %s); recompiles cost compile time "
                           "each time, see compile_stats()", self.region, reason)
        else:
            logger.debug("compiled region %r recompile %d: %s", self.region, self.stats.recompiles, reason)


class _CountingBackend:
    """A dynamo backend that reports each graph it compiles to the detector, then runs the real backend."""

    def __init__(self, inner: Callable[..., Any], detector: RecompileDetector) -> None:
        self._inner = inner
        self._detector = detector

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any], **kwargs: Any) -> Any:
        self._detector.graph_compiled()
        return self._inner(gm, example_inputs, **kwargs)

    @property
    def compiler_name(self) -> str:
        """The real backend's name (dynamo labels compiles with it)."""
        return str(getattr(self._inner, "compiler_name", getattr(self._inner, "__name__", "backend")))

    def get_compiler_config(self) -> Any:
        """The real backend's config (dynamo's repro tooling reads it)."""
        get = getattr(self._inner, "get_compiler_config", None)
        return get() if get is not None else None

    def reset(self) -> None:
        """torch._dynamo.reset() resets backends that keep state."""
        reset = getattr(self._inner, "reset", None)
        if reset is not None:
            reset()


def _make_backend(backend: str | Callable[..., Any], mode: str | None, options: dict[str, Any] | None,
                  dynamic: bool | None, name: str) -> Callable[..., Any]:
    """The backend torch.compile would build from these arguments (so mode/options keep working)."""
    if mode is not None and options is not None:
        raise ValueError("compile_module: pass mode or options, not both")
    if backend == "inductor":
        return cast(Callable[..., Any], torch._TorchCompileInductorWrapper(  # type: ignore[attr-defined]
            mode or ("default" if options is None else None), options, dynamic, name))
    if mode is None and options is None:
        mode = "default"
    return cast(Callable[..., Any], torch._TorchCompileWrapper(backend, mode, options, dynamic))  # type: ignore


class CompiledRegion(nn.Module):
    """The module compile_module returns: forward runs the compiled `module`, counted; state_dict, parameters
    and attributes are the original module's (checkpoints stay interchangeable with the eager module)."""

    detector: RecompileDetector
    _compiled: Callable[..., Any]

    def __init__(self, module: nn.Module, compiled: Callable[..., Any], detector: RecompileDetector,
                 fail_on_recompile: bool) -> None:
        super().__init__()
        self.module = module
        object.__setattr__(self, "_compiled", compiled)   # not a submodule: parameters are module's
        object.__setattr__(self, "detector", detector)
        self.fail_on_recompile = fail_on_recompile
        self._warm = False
        self._register_load_state_dict_pre_hook(_into_module)

    @property
    def region(self) -> str:
        """The region's name (the key of compile_stats())."""
        return self.detector.region

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """The original module's state dict (same keys as the eager module)."""
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """Load into the original module."""
        return self.module.load_state_dict(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        detector = self.detector
        stats = detector.stats
        before = stats.compiles
        detector.call_started()
        start = time.perf_counter()
        try:
            if self.fail_on_recompile and self._warm:
                with torch.compiler.set_stance("fail_on_recompile"):
                    out = self._compiled(*args, **kwargs)
            else:
                out = self._compiled(*args, **kwargs)
        except RuntimeError as e:
            if _STANCE_MESSAGE not in str(e):
                raise
            reason = str(e).split("guard failure(s):", 1)[-1].strip().lstrip("- ") or str(e)
            detector._recompiled(reason)
            raise RecompileError(self.region, reason) from None
        detector.call_ended()
        elapsed = time.perf_counter() - start
        if not self._warm:
            self._warm = True
            stats.compile_s = elapsed if stats.compile_s is None else stats.compile_s
        elif stats.compiles > before:
            stats.recompile_s += elapsed
        return out


def _into_module(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """A parent's load_state_dict with the eager module's keys (prefix + "weight") loads into the region's
    module (prefix + "module.weight"): checkpoints of compiled and eager models are interchangeable."""
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "module.")]:
        state_dict[prefix + "module." + key[len(prefix):]] = state_dict.pop(key)


def _region_name(module: nn.Module, name: str | None) -> str:
    base = name or type(module).__name__
    with _LOCK:
        if name is not None or base not in _REGIONS:
            return base
        n = 2
        while f"{base}#{n}" in _REGIONS:
            n += 1
        return f"{base}#{n}"


def compile_module(module: nn.Module, *, name: str | None = None, fail_on_recompile: bool = False,
                   backend: str | Callable[..., Any] = "inductor", mode: str | None = None,
                   options: dict[str, Any] | None = None, dynamic: bool | None = None, fullgraph: bool = False,
                   recompile_limit: int | None = None) -> nn.Module:
    """torch.compile `module` (a chosen sub-module, e.g. the backbone) as a named region with a
    RecompileDetector. Returns a CompiledRegion: use it in place of `module` (assign it back, e.g.
    `model.backbone = compile_module(model.backbone)`). `name` defaults to the class name (numbered when
    taken). fail_on_recompile: after the first call, a recompile raises RecompileError instead of compiling.
    backend, mode, options, dynamic, fullgraph, recompile_limit: as torch.compile."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"compile_module needs an nn.Module, got {type(module).__name__}")
    region = _region_name(module, name)
    detector = RecompileDetector(region)
    inner = _make_backend(backend, mode, options, dynamic, region)
    compiled = torch._dynamo.optimize(  # guard_fail_fn is not exposed by torch.compile
        backend=_CountingBackend(inner, detector), nopython=fullgraph, dynamic=dynamic,
        guard_fail_fn=detector.guard_fail, recompile_limit=recompile_limit,
        isolate_recompiles=True)(module)
    return CompiledRegion(module, cast(Callable[..., Any], compiled), detector, fail_on_recompile)
