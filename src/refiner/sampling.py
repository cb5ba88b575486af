"""How a run draws its images: seeded per-sample augmentation, a resumable sampler, unreadable files skipped.

Augmentation randomness is a function of (seed, epoch, sample index), so a run is reproducible
whatever the number of loader workers, and resuming mid-epoch needs only the position in the
epoch; the sampler's order is a function of (seed, epoch) and gives each rank its share.
"""
import hashlib
import math
import random
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Sequence, Set

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = ['EpochSampler', 'SeededTransformDataset', 'SkipLog', 'collate_skipping']


def _sample_seed(*parts: int) -> int:
    digest = hashlib.blake2b(','.join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'little') & (2 ** 63 - 1)


class SeededTransformDataset(Dataset):
    """Applies a transform with every RNG (python, numpy, torch) seeded from (seed, epoch, index).

    Returns (tensor, target) or (None, path) for a file that could not be read.
    """

    def __init__(self, base: Dataset, transform: Callable, seed: int = 0) -> None:
        self.base, self.transform, self.seed = base, transform, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        img, target, path = self.base.load(index)
        if img is None:
            return None, path
        s = _sample_seed(self.seed, self.epoch, index)
        random.seed(s)
        np.random.seed(s % (2 ** 32))
        torch.manual_seed(s)
        return self.transform(img), target


@dataclass
class SkipLog:
    """Files skipped because they could not be read (unique paths)."""
    paths: Set[str] = field(default_factory=set)

    def add(self, paths: Sequence[str]) -> None:
        self.paths.update(paths)

    def __len__(self) -> int:
        return len(self.paths)


def collate_skipping(batch):
    """Stack the readable samples; return (images, targets, skipped paths)."""
    good = [b for b in batch if b[0] is not None]
    skipped = [b[1] for b in batch if b[0] is None]
    if not good:
        return None, None, skipped
    images = torch.stack([b[0] for b in good])
    targets = torch.tensor([b[1] for b in good], dtype=torch.long)
    return images, targets, skipped


class EpochSampler(Sampler[int]):
    """A (distributed) sampler whose order is a function of (seed, epoch), that can start mid-epoch.

    Each of ``world_size`` ranks takes every world_size-th index of the shuffled order (padded to
    a multiple of the global batch when ``drop_last`` is False), from ``start`` on.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                 rank: int = 0, world_size: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.shuffle, self.drop_last = n, batch_size, seed, shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch * self.batch_size

    def _order(self) -> List[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(_sample_seed(self.seed, self.epoch, -1))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per_step = self.batch_size * self.world_size
        if self.drop_last:
            order = order[: (self.n // per_step) * per_step]
        elif len(order) % per_step:
            pad = per_step - len(order) % per_step
            order = order + order[:pad] if self.shuffle else order + [-1] * pad
        return order[self.rank::self.world_size]

    def batches_per_epoch(self) -> int:
        per_step = self.batch_size * self.world_size
        return self.n // per_step if self.drop_last else math.ceil(self.n / per_step)

    def __iter__(self) -> Iterator[int]:
        return iter(i for i in self._order()[self.start:] if i >= 0)

    def __len__(self) -> int:
        return max(len([i for i in self._order() if i >= 0]) - self.start, 0)
