"""Trainer: wrap a plain PyTorch loop with precision, devices/DDP, a measured loader, logs and checkpoints."""

from __future__ import annotations

import atexit
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import nn

from tandem.errors import ConfigError
from tandem.train import checkpoint as ckpt
from tandem.train.amp import Scaler, autocast, check_precision, make_scaler, to_float32
from tandem.train.distributed import DistEnv, init_distributed
from tandem.train.logs import RunLog

logger = logging.getLogger(__name__)

__all__ = ["Trainer"]


class _TrainModule(nn.Module):
    """The module setup() returns: forward runs under the trainer's autocast (through DDP when distributed);
    state_dict/load_state_dict and unknown attributes go to the original module."""

    def __init__(self, forward_module: nn.Module, module: nn.Module, context: Callable[[], ContextManager[Any]],
                 cast_output: bool) -> None:
        super().__init__()
        self._forward_module = forward_module
        self._original_module = module
        self._context = context
        self._cast_output = cast_output

    @property
    def module(self) -> nn.Module:
        """The user's module, unwrapped."""
        return self._original_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._context():
            out = self._forward_module(*args, **kwargs)
        return to_float32(out) if self._cast_output else out

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self._original_module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self._original_module.load_state_dict(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("_forward_module", "_original_module"):
                raise
            return getattr(self._original_module, name)


class _TrainOptimizer:
    """Mixed into a subclass of the user's optimizer class (so isinstance and LR schedulers work): shares its
    param_groups and state; step() clips, scales and counts through the trainer."""

    def __init__(self, optimizer: torch.optim.Optimizer, trainer: Trainer) -> None:
        self.__dict__.update({k: v for k, v in optimizer.__dict__.items()
                              if k not in ("step", "zero_grad", "state_dict", "load_state_dict")})
        self._optimizer = optimizer
        self._trainer = trainer

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The user's optimizer, unwrapped."""
        return self._optimizer

    def step(self, closure: Callable[[], Any] | None = None) -> None:
        self._trainer._optimizer_step(self._optimizer, closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self._optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._optimizer.load_state_dict(state_dict)


def _wrap_optimizer(optimizer: torch.optim.Optimizer, trainer: Trainer) -> torch.optim.Optimizer:
    cls = type(optimizer)
    wrapped_cls = type(cls.__name__, (_TrainOptimizer, cls), {})
    return cast(torch.optim.Optimizer, wrapped_cls(optimizer, trainer))


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), python's random and numpy."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class Trainer:
    """Adopt it in five changed lines of a plain PyTorch loop (`#` marks them):

        from tandem.train import Trainer                                 #
        trainer = Trainer(precision="bf16-mixed", run_dir="runs/x")      #
        model = Net()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model, optimizer = trainer.setup(model, optimizer)               #
        loader = trainer.loader(dataset, batch_size=64)                  # was: DataLoader(dataset, 64, shuffle=True)
        for epoch in range(10):
            for x, y in loader:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                trainer.backward(loss)                                   # was: loss.backward()
                optimizer.step()

    Resumable after a kill (exact next batch): `Trainer(..., save_every=500, resume=True)` and
    `for epoch in trainer.epochs(10):` instead of `range(10)`; setup() then loads run_dir's latest checkpoint.

    precision: "32", "bf16-mixed" (CPU and CUDA) or "16-mixed" (CUDA, GradScaler; skipped steps counted).
    devices/strategy: "auto" picks CUDA when present and DDP when launched with WORLD_SIZE > 1 (torchrun,
    `tandem train`). Every rank calls every method; only rank 0 writes logs and checkpoints. The model and
    optimizer setup() returns wrap the originals (`.module`, `.optimizer`); seeds are `seed + rank`.
    """

    def __init__(self, *, precision: Literal["32", "bf16-mixed", "16-mixed"] = "32",
                 devices: Literal["auto"] | int | str = "auto", strategy: Literal["auto", "ddp"] = "auto",
                 seed: int = 0, run_dir: str | Path | None = None, grad_clip: float | None = None,
                 comm: Any = None, log_every: int = 1, progress: bool = True,
                 save_every: int | None = None, resume: bool = False) -> None:
        if strategy not in ("auto", "ddp"):
            raise ConfigError(f"strategy={strategy!r} is not one of 'auto', 'ddp'")
        if grad_clip is not None and not grad_clip > 0:
            raise ConfigError(f"grad_clip={grad_clip!r} must be a positive max gradient norm (or None)")
        if log_every < 1:
            raise ConfigError(f"log_every={log_every!r} must be >= 1")
        if save_every is not None and save_every < 1:
            raise ConfigError(f"save_every={save_every!r} must be >= 1 (or None)")
        if (save_every or resume) and run_dir is None:
            raise ConfigError("save_every/resume need a run_dir to keep checkpoints in: pass run_dir='runs/NAME'")
        self._env: DistEnv = init_distributed(strategy, devices)
        check_precision(precision, self.device)
        self.precision = precision
        self.seed = seed
        self.grad_clip = grad_clip
        self.comm = comm
        self.save_every = save_every
        self.resume = resume
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._scaler: Scaler = make_scaler(precision, self.device)
        self._log = RunLog(self.run_dir, enabled=self.is_main, world_size=self.world_size, log_every=log_every,
                           progress=progress)
        self._module: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._loaders: list[Any] = []
        self._pending_loader_states: list[dict[str, Any]] = []
        self._step = 0
        self._epoch = 0
        self._closed = False
        seed_everything(seed + self.rank)
        atexit.register(self.finish)

    # -- where this process runs ----------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """This process's global rank (0 when not distributed)."""
        return int(self._env.rank)

    @property
    def world_size(self) -> int:
        """Number of processes training together."""
        return int(self._env.world_size)

    @property
    def device(self) -> torch.device:
        """The device this rank trains on."""
        return cast(torch.device, self._env.device)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes logs and checkpoints."""
        return self.rank == 0

    @property
    def step(self) -> int:
        """Optimizer steps taken (skipped ones included)."""
        return self._step

    @property
    def epoch(self) -> int:
        """The epoch in progress (epochs() advances it)."""
        return self._epoch

    @property
    def skipped_steps(self) -> int:
        """Steps the fp16 GradScaler skipped on inf/nan gradients (a host sync)."""
        return self._scaler.skipped

    @property
    def log(self) -> RunLog:
        """The run log (records, summary, plot)."""
        return self._log

    # -- the loop ---------------------------------------------------------------------------------------
    def autocast(self) -> ContextManager[Any]:
        """The autocast context of this precision (setup()'s model already runs its forward in it)."""
        return autocast(self.precision, self.device)

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Move `model` to the device (in place, so `optimizer` keeps its parameters), DDP-wrap it when
        distributed, run its forward under autocast; wrap `optimizer`. With resume=True, load the latest
        checkpoint of run_dir if there is one."""
        model.to(self.device)
        self._module = model
        forward: nn.Module = model
        if self._env.backend is not None:
            from tandem.train.distributed import wrap_ddp

            forward = wrap_ddp(model, self._env, self.comm)
        wrapped = _TrainModule(forward, model, self.autocast, cast_output=self.precision != "32")
        self._optimizer = _wrap_optimizer(optimizer, self)
        self._log.start(time.perf_counter())
        if self.resume and self.run_dir is not None and ckpt.latest_checkpoint(self._checkpoints) is not None:
            self.load()
        return wrapped, self._optimizer

    def loader(self, dataset: Any, *, batch_size: int, shuffle: bool = True, timed: bool = True,
               **loader_kwargs: Any) -> Any:
        """A tandem.train.Loader for this rank (rank, world size, device, seed filled in). `timed` loaders
        (the training one) feed the step clock: `time`, `data_time`, samples/s in the logs."""
        from tandem.train.data import Loader

        loader = Loader(dataset, batch_size=batch_size, shuffle=shuffle, seed=self.seed, rank=self.rank,
                        world_size=self.world_size, local_world_size=int(self._env.local_world_size),
                        device=self.device, clock=self._log if timed else None, **loader_kwargs)
        index = len(self._loaders)
        self._loaders.append(loader)
        if index < len(self._pending_loader_states):   # created after load(): resume it too
            loader.load_state_dict(self._pending_loader_states[index])
        if timed and self._log.epoch_length is None:
            self._log.epoch_length = len(loader)
        return loader

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """loss.backward() through the GradScaler (fp16); the loss is recorded for the logs (no sync)."""
        self._log.record_loss(loss)
        self._scaler.scale(loss).backward(**kwargs)

    def _optimizer_step(self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any] | None) -> None:
        lr = optimizer.param_groups[0].get("lr")
        skipped = self._scaler.step(optimizer, grad_clip=self.grad_clip, closure=closure)
        self._step += 1
        self._log.record_step(time.perf_counter(), step=self._step, lr=None if lr is None else float(lr),
                              skipped=skipped)
        if self.save_every is not None and self._step % self.save_every == 0:
            self.save()

    def epochs(self, total: int) -> Iterator[int]:
        """The epochs still to run (all of them, or the rest after a load); finish() after the last."""
        if self._log.epoch_length:
            self._log.total_batches = total * self._log.epoch_length
        while self._epoch < total:
            self._log.new_epoch(self._epoch)
            yield self._epoch
            self._epoch += 1
        self.finish()

    def compile(self, module: nn.Module, **kwargs: Any) -> nn.Module:
        """torch.compile a sub-module with recompile detection (tandem.train.compile.compile_module)."""
        from tandem.train.compile import compile_module

        return cast(nn.Module, compile_module(module, **kwargs))

    # -- checkpoints ------------------------------------------------------------------------------------
    @property
    def _checkpoints(self) -> Path:
        if self.run_dir is None:
            raise ConfigError("no run_dir: pass Trainer(run_dir=...) or an explicit checkpoint path")
        return self.run_dir / "checkpoints"

    def _gather_rng(self) -> list[dict[str, Any]]:
        state = ckpt.rng_state()
        if self.world_size == 1 or not torch.distributed.is_initialized():
            return [state]
        states: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(states, state)
        return states

    def _barrier(self) -> None:
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def save(self, path: str | Path | None = None, **extra: Any) -> Path:
        """Checkpoint everything (default run_dir/checkpoints/step-XXXXXXX), atomically. Call it on every
        rank: RNG states are gathered, rank 0 writes, all wait for it. `extra` must be tensors or plain
        values (it is read back with weights_only=True)."""
        if self._module is None or self._optimizer is None:
            raise ConfigError("save() before setup(model, optimizer): nothing to save yet")
        target = Path(path) if path is not None else self._checkpoints / f"step-{self._step:07d}"
        rng = self._gather_rng()
        if self.is_main:
            state = {"format": 1, "step": self._step, "epoch": self._epoch, "precision": self.precision,
                     "world_size": self.world_size, "optimizer": self._optimizer.state_dict(),
                     "scaler": self._scaler.state_dict(), "rng": rng,
                     "loaders": [loader.state_dict() for loader in self._loaders], "extra": extra}
            ckpt.save_checkpoint(target, model=self._module, state=state)
        self._barrier()
        return target

    def load(self, path: str | Path | None = None) -> dict[str, Any]:
        """Restore a checkpoint (default: run_dir's latest) into the set-up model, optimizer, scaler, RNG,
        counters and loaders (also ones created later, in creation order); returns save()'s `extra`."""
        if self._module is None or self._optimizer is None:
            raise ConfigError("load() before setup(model, optimizer): call trainer.setup first")
        source = Path(path) if path is not None else self._checkpoints
        state = ckpt.load_checkpoint(source, model=self._module, device=self.device)
        self._optimizer.load_state_dict(state["optimizer"])
        self._scaler.load_state_dict(state["scaler"])
        self._step, self._epoch = int(state["step"]), int(state["epoch"])
        rng = state["rng"]
        if len(rng) == self.world_size:
            ckpt.set_rng_state(rng[self.rank])
        else:
            logger.warning("checkpoint saved with %d ranks, now %d: RNG states not restored", len(rng),
                           self.world_size)
        self._pending_loader_states = list(state["loaders"])
        for loader, loader_state in zip(self._loaders, self._pending_loader_states):
            loader.load_state_dict(loader_state)
        self._log.resume(self._step)
        self._log.new_epoch(self._epoch)
        logger.info("resumed from step %d (epoch %d)", self._step, self._epoch)
        return dict(state.get("extra", {}))

    # -- outputs ----------------------------------------------------------------------------------------
    def summary(self, warmup: int = 0) -> dict[str, Any]:
        """Mean `time`, `data_time`, data_time share, samples/s and skipped steps of this process's run."""
        result = self._log.summary(warmup)
        result["optimizer_steps"] = self._step
        return result

    def plot(self, path: str | Path | None = None) -> Path | None:
        """Write the loss / time / data_time PNG now (default run_dir/steps.png)."""
        return self._log.plot(Path(path) if path is not None else None)

    def finish(self) -> None:
        """End of training: flush the logs, write the PNG, stop the progress bar (also runs at exit)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.finish)
        self._log.close()

    close = finish

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()
