"""CommOptions validation, the single-process DistEnv and the torchrun command line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tandem.errors import ConfigError
from tandem.train import distributed
from tandem.train.command import build_command
from tandem.train.distributed import (
    CommOptions,
    DistEnv,
    all_reduce_bandwidth,
    init_distributed,
    wait_for_idle_gloo_workers,
    wrap_ddp,
)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"bucket_cap_mb": 0}, "bucket_cap_mb"), ({"compression": "int8"}, "powersgd"),
    ({"powersgd_rank": 0}, "powersgd_rank"), ({"powersgd_start_iter": 1}, "powersgd_start_iter")])
def test_comm_options_refuse_bad_values(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        CommOptions(**kwargs)  # type: ignore[arg-type]


def test_comm_options_defaults() -> None:
    assert CommOptions() == CommOptions(None, "none", 1, 2)


def test_single_process_env_has_no_group(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    env = init_distributed("auto", "cpu")
    assert (env.rank, env.world_size, env.backend, env.device) == (0, 1, None, torch.device("cpu"))
    assert not torch.distributed.is_initialized()


def test_torchrun_command_lines() -> None:
    local = build_command("s.py", ["--x"], nproc=2)
    assert local[1:] == ["-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1", "--standalone", "s.py",
                         "--x"]
    rdzv = build_command("s.py", [], nproc=4, nnodes="2", rdzv_backend="c10d", rdzv_endpoint="h:29400",
                         rdzv_id="job")
    assert "--rdzv-backend=c10d" in rdzv and "--rdzv-endpoint=h:29400" in rdzv and "--rdzv-id=job" in rdzv
    static = build_command("s.py", [], nproc=1, nnodes="2", node_rank=1, master_addr="10.0.0.1", master_port=1234)
    assert "--node-rank=1" in static and "--master-addr=10.0.0.1" in static and "--master-port=1234" in static


def test_one_rank_gloo_group_wraps_ddp_with_each_hook_and_times_allreduce(tmp_path: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        env = DistEnv(0, 0, 1, 1, torch.device("cpu"), "gloo")
        for compression in ("none", "fp16", "bf16", "powersgd"):
            comm = CommOptions(bucket_cap_mb=1, compression=compression)  # type: ignore[arg-type]
            model = wrap_ddp(nn.Linear(4, 2), env, comm)
            model(torch.randn(3, 4)).sum().backward()
            assert all(p.grad is not None for p in model.parameters())
        rows = all_reduce_bandwidth([1024, 65536], iters=2)
        assert [r["bytes"] for r in rows] == [1024.0, 65536.0] and all(r["seconds"] > 0 for r in rows)
        assert all(r["busbw_gbs"] == 0.0 for r in rows)   # 2(W-1)/W is 0 for one rank
    finally:
        dist.destroy_process_group()


def test_gloo_workers_are_found_and_seen_idle_after_a_collective(tmp_path: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        dist.all_reduce(torch.ones(1 << 16))
        states = distributed._gloo_worker_states()
        assert states, "no pt_gloo worker thread found under /proc/self/task"
        assert wait_for_idle_gloo_workers(timeout_s=5.0)
    finally:
        dist.destroy_process_group()


def test_waiting_for_gloo_workers_gives_up_on_busy_threads_or_without_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = iter(range(10**6))
    monkeypatch.setattr(distributed, "_gloo_worker_states", lambda: {"1": ("S", str(next(counter)))})
    assert not wait_for_idle_gloo_workers(timeout_s=0.05, interval_s=0.001)      # switches keep changing
    monkeypatch.setattr(distributed, "_gloo_worker_states", lambda: {"1": ("R", "5/5")})
    assert not wait_for_idle_gloo_workers(timeout_s=0.05, interval_s=0.001)      # running, never asleep
    monkeypatch.setattr(distributed, "_gloo_worker_states", lambda: None)
    assert not wait_for_idle_gloo_workers(timeout_s=0.05, interval_s=0.001)
    monkeypatch.setattr(distributed, "_gloo_worker_states", lambda: {})
    assert wait_for_idle_gloo_workers(timeout_s=0.05, interval_s=0.001)          # no gloo threads: idle
