"""Where this process trains (DistEnv), the process group, DDP wrapping with communication options.

    torchrun / `tandem train`  sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT
      -> init_distributed()    init_process_group (gloo on CPU, nccl on CUDA) once; destroyed at exit
      -> wrap_ddp()            DistributedDataParallel(bucket_cap_mb) + a comm hook (fp16/bf16/PowerSGD)
      all_reduce_bandwidth()   allreduce seconds / algbw / busbw against message size (benchmarks)

A rank blocked in a collective whose peer died returns after the process group's timeout (seconds, env
TANDEM_TRAIN_TIMEOUT_S, default 600), so a dead peer never hangs the job forever; torchrun itself stops the
other ranks as soon as one exits non-zero.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from tandem.envs import TANDEM_TRAIN_TIMEOUT_S
from tandem.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["CommOptions", "DistEnv", "TANDEM_TRAIN_TIMEOUT_S", "all_reduce_bandwidth", "init_distributed",
           "shutdown", "wait_for_idle_gloo_workers", "wrap_ddp"]

_COMPRESSIONS = ("none", "fp16", "bf16", "powersgd")


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job; backend is None when not distributed."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str | None


@dataclass(frozen=True)
class CommOptions:
    """Gradient communication of DDP. bucket_cap_mb: None keeps DDP's 25 MB; compression: none, fp16, bf16
    (compress buckets before allreduce) or powersgd (low-rank, powersgd_rank, after powersgd_start_iter
    plain allreduce steps)."""

    bucket_cap_mb: float | None = None
    compression: Literal["none", "fp16", "bf16", "powersgd"] = "none"
    powersgd_rank: int = 1
    powersgd_start_iter: int = 2

    def __post_init__(self) -> None:
        if self.bucket_cap_mb is not None and not self.bucket_cap_mb > 0:
            raise ConfigError(f"bucket_cap_mb={self.bucket_cap_mb!r} must be > 0 megabytes (or None for 25)")
        if self.compression not in _COMPRESSIONS:
            raise ConfigError(f"compression={self.compression!r} is not one of {', '.join(_COMPRESSIONS)}")
        if self.powersgd_rank < 1:
            raise ConfigError(f"powersgd_rank={self.powersgd_rank!r} must be >= 1 (1-4 is usual)")
        if self.powersgd_start_iter < 2:
            raise ConfigError(f"powersgd_start_iter={self.powersgd_start_iter!r} must be >= 2: PowerSGD's "
                              "error feedback needs plain allreduce steps first")


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer (torchrun sets it)") from None


def _device(devices: Any, local_rank: int) -> torch.device:
    cuda = torch.cuda.is_available() and devices not in ("cpu", 0)
    if cuda:
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def _timeout() -> timedelta:
    raw = os.environ.get(TANDEM_TRAIN_TIMEOUT_S, "600")
    try:
        seconds = float(raw)
    except ValueError:
        raise ConfigError(f"{TANDEM_TRAIN_TIMEOUT_S}={raw!r} must be seconds (a number)") from None
    return timedelta(seconds=seconds)


def init_distributed(strategy: str = "auto", devices: Any = "auto") -> DistEnv:
    """Read torchrun's environment; with WORLD_SIZE > 1 (or strategy="ddp") join the process group (gloo on
    CPU, nccl on CUDA, device = cuda:LOCAL_RANK). Idempotent: a second call reuses the group."""
    rank, world = _int_env("RANK", 0), _int_env("WORLD_SIZE", 1)
    local_rank = _int_env("LOCAL_RANK", 0)
    local_world = _int_env("LOCAL_WORLD_SIZE", world)
    device = _device(devices, local_rank)
    if world == 1 and not (strategy == "ddp" and "MASTER_ADDR" in os.environ):
        return DistEnv(0, 0, 1, 1, device, None)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=_timeout())
        atexit.register(shutdown)
        logger.info("rank %d of %d joined the %s process group", rank, world, backend)
    return DistEnv(dist.get_rank(), local_rank, dist.get_world_size(), local_world, device, dist.get_backend())


def shutdown() -> None:
    """Leave the process group (registered at exit by init_distributed), once gloo's workers are idle."""
    if dist.is_available() and dist.is_initialized():
        wait_for_idle_gloo_workers()
        dist.destroy_process_group()


def wait_for_idle_gloo_workers(timeout_s: float = 5.0, interval_s: float = 0.01) -> bool:
    """Wait, GIL released, until every gloo worker thread has stayed asleep across one interval.

    A gloo worker thread drops its finished collective a moment after the caller's wait() returns; when it
    holds the last reference to a tensor Python has let go, that drop takes the GIL, and a thread asking
    for the GIL once the interpreter is finalizing takes the whole process down with SIGABRT ("terminate
    called without an active exception", pytorch/pytorch#190489; seen here on loaded CPUs). A thread that
    waits for the GIL is woken as soon as this one sleeps, so an unchanged asleep snapshot means idle.
    True when idle, False on timeout or where /proc is missing (then one interval was slept)."""
    deadline, previous = time.monotonic() + timeout_s, None
    while True:
        snapshot = _gloo_worker_states()
        if snapshot is None:
            time.sleep(interval_s)
            return False
        if snapshot == previous and all(state == "S" for state, _ in snapshot.values()):
            return True
        if time.monotonic() > deadline:
            return False
        previous = snapshot
        time.sleep(interval_s)


def _gloo_worker_states() -> dict[str, tuple[str, str]] | None:
    """{thread id: (scheduler state, context-switch counts)} of this process's gloo worker threads."""
    tasks = "/proc/self/task"
    try:
        tids = os.listdir(tasks)
    except OSError:
        return None
    states: dict[str, tuple[str, str]] = {}
    for tid in tids:
        try:
            with open(f"{tasks}/{tid}/comm") as f:
                if not f.read().startswith("pt_gloo"):
                    continue
            with open(f"{tasks}/{tid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:        # the thread ended meanwhile
            continue
        switches = fields.get("voluntary_ctxt_switches", "").strip() + "/" + \
            fields.get("nonvoluntary_ctxt_switches", "").strip()
        states[tid] = (fields.get("State", "?").strip()[:1], switches)
    return states


def wrap_ddp(module: nn.Module, env: DistEnv, comm: CommOptions | None = None) -> nn.Module:
    """DistributedDataParallel over `module` with comm's bucket size and compression hook."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    comm = comm or CommOptions()
    kwargs: dict[str, Any] = {}
    if comm.bucket_cap_mb is not None:
        kwargs["bucket_cap_mb"] = comm.bucket_cap_mb
    if env.device.type == "cuda":
        kwargs["device_ids"] = [env.device.index]
    ddp = DDP(module, **kwargs)
    _register_hook(ddp, comm)
    return ddp


def _register_hook(ddp: nn.Module, comm: CommOptions) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if comm.compression == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)  # type: ignore[operator]
    elif comm.compression == "bf16":
        # torch's bf16_compress_hook insists on NCCL; its generic body runs on gloo too
        hook = default_hooks.bf16_compress_hook if dist.get_backend() == "nccl" else _bf16_compress_hook
        ddp.register_comm_hook(None, hook)  # type: ignore[operator]
    elif comm.compression == "powersgd":
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=comm.powersgd_rank,
                                            start_powerSGD_iter=comm.powersgd_start_iter)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)  # type: ignore[operator]


def _bf16_compress_hook(process_group, bucket):  # type: ignore[no-untyped-def]  # DDP inspects annotations
    """bf16 gradient compression on any backend (torch's own hook refuses anything but NCCL)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    return default_hooks._compress_hook(torch.bfloat16, process_group, bucket)


def all_reduce_bandwidth(sizes_bytes: list[int], iters: int = 10, device: torch.device | None = None,
                         warmup: int = 2) -> list[dict[str, float]]:
    """Time allreduce of fp32 messages of each size (the group must exist): rows of bytes, seconds (mean),
    algbw_gbs (bytes / s) and busbw_gbs (algbw * 2(W-1)/W, nccl-tests' convention)."""
    world = dist.get_world_size()
    device = device or torch.device("cpu")
    rows = []
    for size in sizes_bytes:
        buf = torch.ones(max(1, size // 4), dtype=torch.float32, device=device)
        for _ in range(warmup):
            dist.all_reduce(buf)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()  # every rank starts its clock together: no rank times another's lateness
        start = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(buf)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - start) / iters
        algbw = buf.numel() * 4 / seconds / 1e9
        rows.append({"bytes": float(buf.numel() * 4), "seconds": seconds, "algbw_gbs": algbw,
                     "busbw_gbs": algbw * 2 * (world - 1) / world})
    return rows
