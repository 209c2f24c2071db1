"""`threads: auto` splits the CPUs among the worker replicas that share them (ModelEntry.threads).

Every worker taking all cores oversubscribed a small machine: 3 models on 2 cores timed out requests
at low load. The supervisor records every replica's device on the entry it hands a worker
(`share_cpus`); GPU replicas count in no one's share, and an explicit `threads: N` always wins.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tandem.config import BatchingConfig, ModelConfig, ServerConfig
from tandem.serving import repository
from tandem.serving.repository import ModelEntry, share_cpus
from tandem.serving.supervisor import Supervisor


def _entry(name: str, index: int = 0, *, device: str = "cpu", instances: int = 1,
           threads: int | str = "auto") -> ModelEntry:
    config = ModelConfig(name=name, device=device, instances=instances, threads=threads)  # type: ignore[arg-type]
    return ModelEntry(index, config, BatchingConfig(), (), (), 1, Path("."))


@pytest.fixture
def cpus(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Set how many CPUs this process may use: `cpus(n)`."""
    return lambda n: monkeypatch.setattr(repository, "available_cpus", lambda: n)


def _threads(entries: list[ModelEntry]) -> list[int]:
    """The threads each entry's workers get when the server runs all of `entries`."""
    return [share_cpus(e, entries).threads() for e in entries]


def test_an_entry_alone_splits_the_cpus_among_its_own_replicas(cpus: Any) -> None:
    cpus(8)
    assert _entry("a", instances=2).threads() == 4  # unknown share (built outside a server): as before
    assert _entry("a", instances=16).threads() == 1  # at least one thread
    assert _threads([_entry("a", instances=2)]) == [4]  # served alone: the same


def test_auto_threads_are_split_among_every_cpu_replica(cpus: Any) -> None:
    cpus(2)  # the soak benchmark's machine: 3 models, each used to take both cores
    assert _threads([_entry("a", 0), _entry("b", 1), _entry("c", 2)]) == [1, 1, 1]
    cpus(12)
    entries = [_entry("a", 0, instances=2), _entry("b", 1), _entry("c", 2)]  # 4 replicas on the CPU
    assert _threads(entries) == [3, 3, 3]
    cpus(16)
    assert _threads(entries) == [4, 4, 4]  # rounded down: never more threads than cores


def test_an_explicit_thread_count_always_wins(cpus: Any) -> None:
    cpus(12)
    pinned, auto = _entry("a", 0, threads=6), _entry("b", 1)
    assert _threads([pinned, auto]) == [6, 6]  # the pinned replica still takes one share
    assert _threads([_entry("a", 0, threads=32), _entry("b", 1)]) == [32, 6]  # even past the cores
    cpus(2)
    assert _threads([_entry("a", 0, threads=2), _entry("b", 1), _entry("c", 2)]) == [2, 1, 1]


def test_gpu_replicas_do_not_count_against_the_cpu_share(cpus: Any) -> None:
    cpus(8)
    entries = [_entry("a", 0), _entry("b", 1, device="cuda"), _entry("c", 2, device="cuda:1", instances=2)]
    # a is the only CPU replica; a GPU replica keeps CPUs / its own instances, as before
    assert _threads(entries) == [8, 8, 4]


@pytest.mark.parametrize(("cuda", "expected"), [(True, [8, 8]), (False, [4, 4])])
def test_an_auto_device_counts_where_it_resolves(cpus: Any, monkeypatch: pytest.MonkeyPatch, cuda: bool,
                                                 expected: list[int]) -> None:
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    cpus(8)
    assert _threads([_entry("a", 0, device="cpu"), _entry("b", 1, device="auto")]) == expected


def test_share_cpus_counts_the_entry_once_and_every_replica(cpus: Any) -> None:
    a, b = _entry("a", 0, instances=2), _entry("b", 1, device="cuda")
    assert share_cpus(a, [a, b]).replica_devices == share_cpus(a, [b]).replica_devices == ("cpu", "cpu", "cuda")
    assert share_cpus(a, [a, b]) == share_cpus(a, [b])
    assert a.replica_devices == ()  # the entry itself is left as it was (entries are frozen)


# -- the supervisor hands every worker its share -------------------------------------------------------------

class _FakeProcess:
    def __init__(self, target: Any, args: tuple[Any, ...], name: str) -> None:
        self.target, self.args, self.name, self.pid = target, args, name, None

    def start(self) -> None:
        pass

    def is_alive(self) -> bool:
        return False


class _FakeContext:
    """Records the processes the supervisor would start, and starts none."""

    def __init__(self) -> None:
        self.started: list[_FakeProcess] = []

    def Process(self, target: Any, args: tuple[Any, ...], name: str) -> _FakeProcess:  # noqa: N802
        self.started.append(_FakeProcess(target, args, name))
        return self.started[-1]


@pytest.fixture
def supervisor(monkeypatch: pytest.MonkeyPatch) -> Iterator[Supervisor]:
    kinds: Any = {"model": SimpleNamespace(worker=lambda entry: print, arena_bytes=lambda entry: 0)}
    sup = Supervisor([], ServerConfig(), kinds, n_fronts=1)
    sup.mp = _FakeContext()  # type: ignore[assignment]
    monkeypatch.setattr(sup, "await_ready", lambda procs, watch=False: None)
    yield sup
    sup.shutdown()


def _spawned(sup: Supervisor) -> dict[str, int]:
    """Threads per started worker, by process name, as the worker would compute them."""
    return {p.name: p.args[0].threads() for p in sup.mp.started}  # type: ignore[attr-defined]


def test_every_worker_gets_the_share_of_the_served_set(supervisor: Supervisor, cpus: Any) -> None:
    cpus(6)
    supervisor.entries = [_entry("a", 0, instances=2), _entry("b", 1), _entry("c", 2, device="cuda")]
    for entry in supervisor.entries:
        supervisor.spawn_replicas(entry)
    assert _spawned(supervisor) == {"tandem-accel-a:1-0": 2, "tandem-accel-a:1-1": 2, "tandem-accel-b:1-0": 2,
                                    "tandem-accel-c:1-0": 6}
    assert [p.entry for p in supervisor.procs] == [supervisor.entries[i] for i in (0, 0, 1, 2)]  # as configured


def test_a_live_load_shares_with_what_is_served_after_it(supervisor: Supervisor, cpus: Any) -> None:
    cpus(12)
    a, old_b = _entry("a", 0), _entry("b", 1)
    supervisor.entries = [a, old_b, _entry("c", 2)]
    new_b = _entry("b", 3, instances=2)
    supervisor.live._start("b", [new_b])
    # a, c and the two new replicas of b share the CPUs; the old b retires once they are up. Workers
    # already running (a, c, old b) keep the threads they started with.
    assert _spawned(supervisor) == {"tandem-accel-b:1-0": 3, "tandem-accel-b:1-1": 3}
    supervisor.entries = [a, new_b]  # c unloaded: a worker (re)started now gets the larger share
    supervisor.spawn_replicas(a)
    assert _spawned(supervisor)["tandem-accel-a:1-0"] == 4  # a + b's two replicas on 12 CPUs
