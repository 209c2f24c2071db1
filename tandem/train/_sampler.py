"""Which sample indices make up batch (epoch, index) on rank r: a pure function of the seed, never of the workers.

A permutation seeded by (seed, epoch) is dealt to the ranks by position: rank r of W takes positions r::W, so the
W per-rank batches of one step together hold exactly the samples of the one-process global batch of
batch_size * W. Without drop_last the permutation is padded by wrapping around (as DistributedSampler does) so
every rank has the same number of batches and no rank waits on a collective the others never reach.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["EpochBatchSampler", "mix_seed", "num_batches", "rank_batches"]

_SEED_MASK = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (Python's hash() is salted per process, so it cannot be used)."""
    text = ":".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & _SEED_MASK


def _per_rank(n: int, batch_size: int, drop_last: bool, world_size: int) -> int:
    if drop_last:
        return (n // (batch_size * world_size)) * batch_size
    return -(-n // world_size)


def num_batches(n: int, batch_size: int, drop_last: bool, world_size: int) -> int:
    """Batches per epoch on each rank (the same on every rank)."""
    return -(-_per_rank(n, batch_size, drop_last, world_size) // batch_size)


def rank_batches(n: int, batch_size: int, *, seed: int, epoch: int, shuffle: bool, drop_last: bool,
                 rank: int, world_size: int) -> list[list[int]]:
    """The sample indices of every batch of `epoch` on `rank`, in order."""
    if n == 0:
        return []
    if shuffle:
        gen = torch.Generator().manual_seed(mix_seed(seed, epoch))
        order = torch.randperm(n, generator=gen)
    else:
        order = torch.arange(n)
    per_rank = _per_rank(n, batch_size, drop_last, world_size)
    # positions r, r+W, r+2W, ... of the (wrapped) permutation
    positions = torch.arange(per_rank) * world_size + rank
    mine = order[positions % n].tolist()
    return [mine[i:i + batch_size] for i in range(0, per_rank, batch_size)]


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields the batches of one epoch from batch `start` on, each as a list of (epoch, sample index) keys.

    The epoch travels with every key so that workers (persistent ones included) need no per-epoch state to seed
    a sample's augmentation. `set_position` is called before each `iter(DataLoader)`.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, shuffle: bool, drop_last: bool, rank: int,
                 world_size: int) -> None:
        super().__init__()
        self.n, self.batch_size = n, batch_size
        self.shuffle, self.drop_last, self.rank, self.world_size = shuffle, drop_last, rank, world_size
        self.seed = seed
        self.epoch = 0
        self.start = 0
        self._cache: tuple[tuple[int, int], list[list[int]]] | None = None

    def set_position(self, epoch: int, start: int, seed: int | None = None) -> None:
        """Serve `epoch` from batch `start` on the next `iter()`."""
        if seed is not None:
            self.seed = seed
        self.epoch, self.start = epoch, start

    def batches(self) -> list[list[int]]:
        """All batches of the current epoch (computed once per (seed, epoch))."""
        key = (self.seed, self.epoch)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, rank_batches(
                self.n, self.batch_size, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle,
                drop_last=self.drop_last, rank=self.rank, world_size=self.world_size))
        return self._cache[1]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        # built eagerly: DataLoader reads the iterator at reset time, before set_position could change again
        epoch = self.epoch
        return iter([[(epoch, i) for i in b] for b in self.batches()[self.start:]])

    def __len__(self) -> int:
        return max(0, len(self.batches()) - self.start)
