"""Unit tests of the serving core: signatures, config, shared-memory arenas, batching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tandem
from tandem.config import ModelConfig, load_model_config, parse_bytes
from tandem.errors import ConfigError
from tandem.model import TensorSpec
from tandem.serving.batcher import Pending, assemble, batch_deadline, pick_batch, split_rows
from tandem.serving.messages import Task, TensorMeta, encoder, task_decoder
from tandem.serving.shm import Arena, SlotPool, check_shm_space
from tandem.serving.supervisor import sweep_stale_arenas


def test_public_api_is_small_and_exported() -> None:
    assert sorted(tandem.__all__) == ["InvalidInput", "Model", "Request", "RequestSpec", "TensorSpec", "__version__"]
    for name in tandem.__all__:
        assert hasattr(tandem, name)


def test_tensor_spec_checks_dtype_and_shape() -> None:
    spec = TensorSpec("ids", "int64", (-1,), max_shape=(8,))
    assert spec.dtype == "INT64" and spec.max_bytes == 64
    assert spec.check(np.zeros(5, np.int64), batched=False) is None
    assert "dtype INT32" in (spec.check(np.zeros(5, np.int32), batched=False) or "")
    assert "shape" in (spec.check(np.zeros(9, np.int64), batched=False) or "")
    assert spec.check(np.zeros((3, 8), np.int64), batched=True) is None
    assert spec.metadata() == {"name": "ids", "datatype": "INT64", "shape": [-1, -1]}
    with pytest.raises(ValueError):
        TensorSpec("bad", "float32", (0,))
    with pytest.raises(ValueError, match="unknown dtype"):
        TensorSpec("bad", "complex", (1,))


def test_parse_bytes() -> None:
    assert parse_bytes("2GiB") == 2 * 1024**3
    assert parse_bytes("512MB") == 512 * 1000**2
    assert parse_bytes(10) == 10
    with pytest.raises(ValueError, match="2GiB"):
        parse_bytes("lots")


def test_model_config_defaults_and_errors(tmp_path: Path) -> None:
    (tmp_path / "tandem.yaml").write_text("memory_limit: 1GiB\ndevice: cuda:1\n")
    cfg = load_model_config(tmp_path)
    assert cfg.name == tmp_path.name and cfg.version == "1" and cfg.memory_limit == 1024**3
    (tmp_path / "tandem.yaml").write_text("device: tpu\n")
    with pytest.raises(ConfigError, match=r"field 'device'.*auto, cpu, cuda"):
        load_model_config(tmp_path)
    (tmp_path / "tandem.yaml").write_text("[1, 2]\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_model_config(tmp_path)
    (tmp_path / "tandem.yaml").write_text("a: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_model_config(tmp_path)
    assert ModelConfig(name="m").key == "m:1"


def test_arena_roundtrip_and_owner_fence(tmp_path: Path) -> None:
    arena = Arena.create("tandem-test-arena", n_slots=3, slot_payload=256, directory=str(tmp_path))
    try:
        pool = SlotPool(arena)
        slot = pool.acquire(owner=42)
        assert slot is not None and arena.owner(slot) == 42
        a = np.arange(10, dtype=np.float32)
        b = np.ones((2, 3), np.int64)
        metas = arena.write(slot, {"a": a, "b": b})
        assert all(m.offset % 64 == 0 for m in metas)
        other = Arena.attach(arena.path)  # as another process would
        np.testing.assert_array_equal(other.view(slot, metas[0]), a)
        np.testing.assert_array_equal(other.view(slot, metas[1]), b)
        assert other.owner(slot) == 42
        pool.release(slot)
        assert other.owner(slot) == 0  # the fence a late worker checks
        with pytest.raises(ValueError, match="more than"):
            arena.write(0, {"big": np.zeros(1000, np.float32)})
        with pytest.raises(ValueError, match="outside"):
            other.view(0, TensorMeta("x", "<f4", (1000,), 0))
        assert [pool.acquire(i + 1) for i in range(4)][-1] is None  # bounded
        other.close()
    finally:
        arena.close()
        arena.unlink()
    assert not (tmp_path / "tandem-test-arena").exists()


def test_shm_space_check_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="--shm-size"):
        check_shm_space(1 << 60, str(tmp_path))


def test_sweep_removes_only_dead_owners(tmp_path: Path) -> None:
    import os

    dead = tmp_path / "tandem-999999999-abc-f0-m0"
    alive = tmp_path / f"tandem-{os.getpid()}-abc-f0-m0"
    dead.touch()
    alive.touch()
    assert sweep_stale_arenas(tmp_path) == [dead]
    assert alive.exists()


def _pending(req: int, rows: int, length: int, arrived: float) -> Pending:
    task = Task(req, 0, 0, rows, length, [], 0.0)
    return Pending(task, arrived, {})


def test_pick_batch_length_aware_keeps_oldest() -> None:
    pending = [_pending(1, 1, 50, 0.0), _pending(2, 1, 5, 0.1), _pending(3, 1, 48, 0.2), _pending(4, 1, 6, 0.3)]
    batch = pick_batch(pending, max_rows=2, length_aware=True)
    assert [p.task.req_id for p in batch] == [1, 3]  # oldest + closest length
    assert [p.task.req_id for p in pending] == [2, 4]
    assert [p.task.req_id for p in pick_batch(pending, 8)] == [2, 4] and pending == []


def test_pick_batch_fifo_and_multi_row_requests() -> None:
    pending = [_pending(1, 3, 10, 0.0), _pending(2, 2, 90, 0.1), _pending(3, 2, 11, 0.2)]
    batch = pick_batch(pending, max_rows=5, length_aware=False)
    assert [p.task.req_id for p in batch] == [1, 2]
    assert sum(p.rows for p in batch) <= 5


def test_batch_deadline() -> None:
    pending = [_pending(1, 1, 1, 10.0), _pending(2, 1, 1, 10.5)]
    assert batch_deadline(pending, max_rows=4, delay_s=0.005) == pytest.approx(10.005)
    assert batch_deadline(pending, max_rows=2, delay_s=0.005) == 0.0


def test_assemble_pads_variable_dims_and_split_inverts() -> None:
    specs = (TensorSpec("ids", "INT64", (-1,), pad_value=7), TensorSpec("img", "FP32", (2,)))
    items = [{"ids": np.array([[1, 2, 3]]), "img": np.ones((1, 2), np.float32)},
             {"ids": np.array([[4], [5]]), "img": np.zeros((2, 2), np.float32)}]
    out = assemble(items, specs)
    np.testing.assert_array_equal(out["ids"], [[1, 2, 3], [4, 7, 7], [5, 7, 7]])
    assert out["img"].shape == (3, 2)
    parts = split_rows(out, [1, 2])
    np.testing.assert_array_equal(parts[1]["img"], np.zeros((2, 2)))


def test_messages_roundtrip() -> None:
    task = Task(7, 1, 2, 1, 30, [TensorMeta("x", "<f4", (1, 3), 0)], 1.5)
    back = task_decoder.decode(encoder.encode(task))
    assert back == task


def test_micro_batches_split_only_when_padding_costs_more_than_a_call() -> None:
    from tandem.serving.batcher import plan_micro_batches

    mixed = [_pending(i, 1, n, float(i)) for i, n in enumerate([60, 10, 12, 58, 11, 59, 9, 61] * 4)]
    groups = plan_micro_batches(mixed, call_cost=64, min_tokens=0)
    assert sum(len(g) for g in groups) == len(mixed)
    assert len(groups) == 2  # short ones and long ones
    assert max(p.task.length for p in groups[0]) <= 12 and min(p.task.length for p in groups[1]) >= 58
    same = [_pending(i, 1, 40, float(i)) for i in range(16)]
    assert len(plan_micro_batches(same, call_cost=64)) == 1
    tiny = [_pending(i, 1, n, float(i)) for i, n in enumerate([3, 9, 4, 8])]
    assert len(plan_micro_batches(tiny, call_cost=4, min_tokens=128)) == 1  # below the floor: no split
    fixed = [_pending(i, 1, 0, float(i)) for i in range(5)]
    assert len(plan_micro_batches(fixed)) == 1
    # exhaustive check against brute force on a small case: the DP is optimal
    small = [_pending(i, r, n, 0.0) for i, (r, n) in enumerate([(1, 5), (2, 9), (1, 30), (3, 31), (1, 70)])]
    cost = lambda gs: sum(max(sum(p.rows for p in g) * max(p.task.length for p in g), 40) + 20 for g in gs)  # noqa: E731
    import itertools
    items = sorted(small, key=lambda p: p.task.length)
    brute = min(cost([items[a:b] for a, b in zip((0, *cuts), (*cuts, len(items)))])
                for k in range(len(items)) for cuts in itertools.combinations(range(1, len(items)), k))
    assert cost(plan_micro_batches(small, call_cost=20, min_tokens=40)) == brute


def test_arrival_tracker_runs_at_once_when_nothing_else_is_coming() -> None:
    from tandem.serving.batcher import ArrivalTracker

    tracker = ArrivalTracker()
    first = _pending(1, 1, 5, 10.0)
    tracker.arrived(first.task)  # expect=1: the front has only this request in flight
    assert batch_deadline([first], max_rows=8, delay_s=0.005, tracker=tracker) == 0.0
    tracker.finished(first.task)
    a = Task(2, 0, 0, 1, 5, [], 0.0, expect=3)  # two more are on their way from front 0
    tracker.arrived(a)
    pending = [Pending(a, 11.0, {})]
    assert batch_deadline(pending, max_rows=8, delay_s=0.005, tracker=tracker) == pytest.approx(11.005)
    b = Task(3, 0, 1, 1, 5, [], 0.0, expect=3)
    c = Task(4, 0, 2, 1, 5, [], 0.0, expect=3)
    for t in (b, c):
        tracker.arrived(t)
        pending.append(Pending(t, 11.001, {}))
    assert batch_deadline(pending, max_rows=8, delay_s=0.005, tracker=tracker) == 0.0
    other = Task(5, 1, 0, 1, 5, [], 0.0, expect=2)  # a second front adds its own expectation
    tracker.arrived(other)
    assert tracker.expected() == 5


def test_version_folders_share_the_model_folder_code(tmp_path: Path) -> None:
    from tandem.kinds import builtin_kinds
    from tandem.serving.repository import scan_repository

    src = Path(__file__).resolve().parents[1] / "fixtures" / "repo" / "echo" / "model.py"
    model = tmp_path / "repo" / "m"
    for v in ("1", "2"):
        (model / v).mkdir(parents=True)
        (model / v / "tandem.yaml").write_text(f"queue_size: {v}\n")
    (model / "model.py").write_text(src.read_text())
    entries = scan_repository(tmp_path / "repo", builtin_kinds())
    assert [(e.key, e.config.queue_size, e.code) for e in entries] == [("m:1", 1, model), ("m:2", 2, model)]
    (model / "model.py").unlink()
    with pytest.raises(ConfigError, match="no model.py"):
        scan_repository(tmp_path / "repo", builtin_kinds())
