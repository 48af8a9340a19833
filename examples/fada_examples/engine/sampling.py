"""Iteration-indexed, seeded data sampling: what makes ``--resume`` exact.

Training is iteration based (as the official code, which repeats the image list up to
MAX_ITER x BATCH_SIZE and shuffles it). Here the k-th image drawn by the whole job (all ranks) is
a pure function of ``(seed, k)``:

- :class:`IterationBatchSampler` yields, for iterations ``start .. stop-1``, the batch of *draws*
  ``k = it * global_batch + rank * per_rank + j``; draw ``k`` picks ``perm_e[k mod n]`` with
  ``e = k div n`` and ``perm_e`` a permutation seeded by ``(seed, e)`` -- every image once per
  epoch, ranks disjoint (the role of DistributedSampler). With a class-balanced list (``draws``,
  the official list, :func:`fada_examples.data.sampling.source_draw_list`), the rank's ``p``-th
  item is ``draws[perm[rank + world * p]]``, ``perm`` a seeded permutation of the list shared by
  all ranks: the official ``DistributedSampler`` over the shuffled list;
- :class:`SeededSampleDataset` seeds torch / numpy / python RNGs with ``(seed, k)`` around each
  ``__getitem__`` (restoring them afterwards), so random scale / crop / flip / colour jitter are
  the same whatever the number of workers and whether the run was interrupted.

A resumed run therefore only needs the iteration number to continue with identical batches.
"""
from __future__ import annotations

import random
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["IterationBatchSampler", "SeededSampleDataset", "draw_seed"]

_MASK = (1 << 63) - 1


def draw_seed(seed: int, stream: int, k: int) -> int:
    """A 63-bit seed mixing (seed, stream, draw) (splitmix64-style)."""
    x = (seed * 0x9E3779B97F4A7C15 + stream * 0xBF58476D1CE4E5B9 + k * 0x94D049BB133111EB + 1) & ((1 << 64) - 1)
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & ((1 << 64) - 1)
    x ^= x >> 31
    return x & _MASK


class IterationBatchSampler(Sampler):
    """Batches of ``(index, draw)`` for iterations ``[start_iter, stop_iter)`` on this rank."""

    def __init__(self, num_items: int, batch_size: int, *, seed: int, stream: int = 0, start_iter: int = 0,
                 stop_iter: int, rank: int = 0, world_size: int = 1,
                 draws: Optional[Sequence[int]] = None) -> None:
        if num_items < 1:
            raise ValueError("the data set is empty")
        self.num_items = int(num_items)
        self.batch_size = int(batch_size)
        self.seed, self.stream = int(seed), int(stream)
        self.start_iter, self.stop_iter = int(start_iter), int(stop_iter)
        self.rank, self.world_size = int(rank), int(world_size)
        self.draws = list(draws) if draws else None
        self._perms: Dict[int, List[int]] = {}

    def __len__(self) -> int:
        return max(0, self.stop_iter - self.start_iter)

    def _perm(self, epoch: int) -> List[int]:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            g = torch.Generator().manual_seed(draw_seed(self.seed, self.stream, -1 - epoch) & 0xFFFFFFFFFFFF)
            n = len(self.draws) if self.draws else self.num_items
            self._perms[epoch] = torch.randperm(n, generator=g).tolist()
        return self._perms[epoch]

    def index_of(self, k: int) -> int:
        """The data set index of global draw ``k``."""
        if self.draws:
            it, rest = divmod(k, self.batch_size * self.world_size)
            rank, j = divmod(rest, self.batch_size)
            epoch, pos = divmod(rank + self.world_size * (it * self.batch_size + j), len(self.draws))
            return int(self.draws[self._perm(epoch)[pos]])
        epoch, pos = divmod(k, self.num_items)
        return self._perm(epoch)[pos]

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        global_batch = self.batch_size * self.world_size
        for it in range(self.start_iter, self.stop_iter):
            base = it * global_batch + self.rank * self.batch_size
            yield [(self.index_of(base + j), base + j) for j in range(self.batch_size)]


class SeededSampleDataset(Dataset):
    """Wraps a data set so that item ``(index, draw)`` is produced with RNGs seeded by the draw."""

    def __init__(self, dataset: Dataset, seed: int, stream: int = 0) -> None:
        self.dataset = dataset
        self.seed, self.stream = int(seed), int(stream)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        if not isinstance(item, tuple):
            return self.dataset[item]
        index, k = item
        s = draw_seed(self.seed, self.stream, k)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            random.seed(s)
            np.random.seed(s & 0xFFFFFFFF)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
