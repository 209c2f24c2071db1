"""Shared-memory tensor arenas: fixed-size slots in one file under /dev/shm.

The supervisor creates one arena per (front process, model) and unlinks every arena at shutdown,
so a kill -9 of any worker never leaks a segment. A front owns its arena's slots: it writes a
request's input tensors into a free slot, the accelerator worker reads them, writes the outputs
back into the same slot, and the front reads them and frees the slot. Only small metadata
(`TensorMeta`: name, dtype, shape, offset) travels over the control channel.

Byte layout of an arena (little endian):

    offset 0                        ARENA_HEADER (64 bytes)
        u64 magic  u64 n_slots  u64 slot_bytes  (rest reserved)
    offset 64 + i * slot_bytes      slot i
        u64 owner       request id holding the slot, 0 = free
        u64 reserved
        payload         tensors back to back, each 64-byte aligned, C order

The owner word fences stale work: a worker reads inputs and writes outputs only while the slot's
owner is still the request id it was given. A request that timed out, or whose worker was
restarted, has had its slot freed (owner 0) or reused (another id), so late writes are dropped.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tandem.envs import shm_dir
from tandem.serving.messages import TensorMeta

__all__ = ["Arena", "SlotPool", "arena_bytes", "check_shm_space"]

MAGIC = 0x54414E44454D3031  # "TANDEM01"
ARENA_HEADER = 64
SLOT_HEADER = 16
ALIGN = 64


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def arena_bytes(n_slots: int, slot_payload: int) -> int:
    return ARENA_HEADER + n_slots * (SLOT_HEADER + _align(slot_payload))


def check_shm_space(total: int, directory: str | None = None) -> None:
    """Fail with a clear message when the shared-memory filesystem cannot hold `total` bytes."""
    directory = directory or shm_dir()
    if not os.path.isdir(directory):
        raise RuntimeError(f"shared-memory directory {directory} does not exist; set TANDEM_SHM_DIR")
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if free < total:
        raise RuntimeError(
            f"{directory} has {free / 2**20:.0f} MiB free but the arenas need {total / 2**20:.0f} MiB; "
            "enlarge it (docker: --shm-size=1g) or lower queue_size / max_request_rows / cpu_workers")


@dataclass
class Arena:
    """One memory-mapped arena of `n_slots` slots of `slot_bytes` each (header included)."""

    path: Path
    n_slots: int
    slot_bytes: int
    _mm: mmap.mmap
    _owners: np.ndarray  # u64 view of each slot's owner word

    @classmethod
    def create(cls, name: str, n_slots: int, slot_payload: int, directory: str | None = None) -> Arena:
        path = Path(directory or shm_dir()) / name
        slot_bytes = SLOT_HEADER + _align(slot_payload)
        size = ARENA_HEADER + n_slots * slot_bytes
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        mm[:24] = struct.pack("<QQQ", MAGIC, n_slots, slot_bytes)
        return cls._from_mmap(path, mm)

    @classmethod
    def attach(cls, path: str | Path) -> Arena:
        fd = os.open(path, os.O_RDWR)
        try:
            mm = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        return cls._from_mmap(Path(path), mm)

    @classmethod
    def _from_mmap(cls, path: Path, mm: mmap.mmap) -> Arena:
        magic, n_slots, slot_bytes = struct.unpack_from("<QQQ", mm, 0)
        if magic != MAGIC:
            raise RuntimeError(f"{path} is not a Tandem arena")
        owners = np.ndarray((n_slots,), dtype=np.uint64, buffer=mm, offset=ARENA_HEADER,
                            strides=(slot_bytes,))
        return cls(path, n_slots, slot_bytes, mm, owners)

    @property
    def payload_bytes(self) -> int:
        return self.slot_bytes - SLOT_HEADER

    def _base(self, slot: int) -> int:
        return ARENA_HEADER + slot * self.slot_bytes + SLOT_HEADER

    def owner(self, slot: int) -> int:
        return int(self._owners[slot])

    def set_owner(self, slot: int, owner: int) -> None:
        self._owners[slot] = owner

    def write(self, slot: int, arrays: dict[str, np.ndarray]) -> list[TensorMeta]:
        """Copy `arrays` into `slot`; raises ValueError when they do not fit."""
        metas: list[TensorMeta] = []
        offset = 0
        for name, arr in arrays.items():
            arr = np.ascontiguousarray(arr)
            end = offset + arr.nbytes
            if end > self.payload_bytes:
                raise ValueError(f"tensors need more than the slot's {self.payload_bytes} bytes")
            dst = np.ndarray(arr.shape, arr.dtype, buffer=self._mm, offset=self._base(slot) + offset)
            dst[...] = arr
            metas.append(TensorMeta(name, arr.dtype.str, arr.shape, offset))
            offset = _align(end)
        return metas

    def view(self, slot: int, meta: TensorMeta) -> np.ndarray:
        """A zero-copy view of one tensor in `slot`; valid until the slot is freed."""
        shape = tuple(meta.shape)
        dtype = np.dtype(meta.dtype)
        if meta.offset + int(np.prod(shape)) * dtype.itemsize > self.payload_bytes:
            raise ValueError("tensor metadata points outside the slot")
        return np.ndarray(shape, dtype, buffer=self._mm, offset=self._base(slot) + meta.offset)

    def close(self) -> None:
        self._owners = np.empty(0, np.uint64)  # drop the view before closing the map
        try:
            self._mm.close()
        except BufferError:  # a view is still alive somewhere; the map goes with the process
            pass

    def unlink(self) -> None:
        self.path.unlink(missing_ok=True)


class SlotPool:
    """The free slots of one arena, owned by a single front process (not shared)."""

    def __init__(self, arena: Arena) -> None:
        self.arena = arena
        self._free = list(range(arena.n_slots - 1, -1, -1))

    @property
    def free(self) -> int:
        """Slots free right now."""
        return len(self._free)

    def acquire(self, owner: int) -> int | None:
        if not self._free:
            return None
        slot = self._free.pop()
        self.arena.set_owner(slot, owner)
        return slot

    def release(self, slot: int) -> None:
        self.arena.set_owner(slot, 0)
        self._free.append(slot)
