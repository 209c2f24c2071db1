"""Adapter bookkeeping for one engine: known adapters, a host-memory LRU, and device bank slots.

    known (name -> folder)  --load (thread)-->  host LRU (max_cpu_loras)  --copy-->  bank slot (max_loras)

Loading from disk runs on a background thread, so a request for a cold adapter waits while every
other request keeps decoding. A bank slot is pinned while any running sequence uses it; the
least recently used unpinned slot is evicted when a new adapter needs one.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from tandem.llm.lora import AdapterWeights, LoraBank, load_adapter
from tandem.llm.messages import AdapterInfo
from tandem.llm.model import LlamaSpec

__all__ = ["AdapterStore"]

logger = logging.getLogger(__name__)


class AdapterStore:
    """Which adapters exist, which are in host memory, which sit in which device slot."""

    def __init__(self, spec: LlamaSpec, bank: LoraBank, max_cpu_loras: int) -> None:
        self.spec, self.bank, self.max_cpu_loras = spec, bank, max_cpu_loras
        self.known: dict[str, Path] = {}
        self.host: OrderedDict[str, AdapterWeights] = OrderedDict()
        self.loading: dict[str, Future[AdapterWeights]] = {}
        self.load_ms: dict[str, float] = {}
        self.broken: dict[str, str] = {}  # adapters dropped because a reload failed -> why
        self.slot_of: dict[str, int] = {}
        self.refs = [0] * (bank.max_loras + 1)
        self.slot_lru: OrderedDict[int, str] = OrderedDict()  # occupied slots, least recently used first
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-load")

    # -- registration ------------------------------------------------------------------------------
    def add_now(self, name: str, path: Path) -> None:
        """Load and validate synchronously (start-up); raises AdapterError."""
        self.finish_add(self._load_and_time(name, path))

    def add(self, name: str, path: Path) -> Future[AdapterWeights]:
        """Start loading on the background thread; the adapter becomes known when the future succeeds."""
        return self.pool.submit(self._load_and_time, name, path)

    def _load_and_time(self, name: str, path: Path) -> AdapterWeights:
        t0 = time.perf_counter()
        weights = load_adapter(name, path, self.spec, self.bank.max_rank)
        self.load_ms[name] = (time.perf_counter() - t0) * 1000
        return weights

    def finish_add(self, weights: AdapterWeights) -> None:
        """Make a loaded adapter known (call on the engine thread). Replaces one of the same name."""
        self.remove(weights.name)
        self.broken.pop(weights.name, None)
        self.known[weights.name] = weights.path
        self._to_host(weights)

    def remove(self, name: str) -> bool:
        """Forget an adapter; running sequences keep their slot until they finish."""
        found = self.known.pop(name, None) is not None
        self.host.pop(name, None)
        slot = self.slot_of.pop(name, None)
        if slot is not None:
            self.slot_lru.pop(slot, None)
            if self.refs[slot] == 0:
                self.bank.modules_in[slot] = set()
        return found

    def _to_host(self, weights: AdapterWeights) -> None:
        self.host[weights.name] = weights
        self.host.move_to_end(weights.name)
        while len(self.host) > self.max_cpu_loras:
            evicted, _ = self.host.popitem(last=False)
            logger.info("adapter %s evicted from host memory (max_cpu_loras=%d)", evicted, self.max_cpu_loras)

    # -- use by sequences --------------------------------------------------------------------------
    def poll(self) -> None:
        """Move finished background loads of evicted adapters into host memory."""
        for name, fut in list(self.loading.items()):
            if fut.done():
                del self.loading[name]
                try:
                    weights = fut.result()
                except Exception as e:  # noqa: BLE001 - e.g. its files were removed: forget it, say why
                    logger.exception("reloading adapter %s failed", name)
                    if self.known.pop(name, None) is not None:
                        self.broken[name] = f"adapter {name!r} could not be reloaded from disk: {e}"
                    continue
                if name in self.known:
                    self._to_host(weights)

    def acquire(self, name: str) -> int | None:
        """Bank slot holding `name`, placing it if possible; None = not yet (loading, or all slots pinned).

        The caller checked that `name` is known. Pins the slot; `release` unpins it.
        """
        slot = self.slot_of.get(name)
        if slot is None:
            weights = self.host.get(name)
            if weights is None:
                if name not in self.loading:
                    self.loading[name] = self.pool.submit(self._load_and_time, name, self.known[name])
                return None
            slot = self._free_slot()
            if slot is None:
                return None
            self.bank.write(slot, weights)
            self.slot_of[name] = slot
        if name in self.host:
            self.host.move_to_end(name)
        self.slot_lru[slot] = name
        self.slot_lru.move_to_end(slot)
        self.refs[slot] += 1
        return slot

    def _free_slot(self) -> int | None:
        for slot in range(1, self.bank.max_loras + 1):
            if self.refs[slot] == 0 and slot not in self.slot_lru:
                return slot
        for slot, name in self.slot_lru.items():  # least recently used unpinned
            if self.refs[slot] == 0:
                del self.slot_lru[slot]
                self.slot_of.pop(name, None)
                return slot
        return None

    def release(self, slot: int) -> None:
        if slot:
            self.refs[slot] -= 1

    def infos(self) -> list[AdapterInfo]:
        out = []
        for name, path in sorted(self.known.items()):
            w = self.host.get(name)
            out.append(AdapterInfo(name=name, path=str(path), rank=w.rank if w else 0, nbytes=w.nbytes() if w else 0,
                                   on_device=name in self.slot_of, load_ms=round(self.load_ms.get(name, 0.0), 2)))
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
