"""Several processes as one run: the process group, each rank's share, and randomness drawn from counters.

Every random draw is a function of counters, not of hidden state: :func:`seed_everything` seeds python,
numpy and torch from (seed, step, rank) before every step, so a resumed run replays the same randomness.
"""
import os
import random
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from ..data import SkipLog
from ..devices import resolve_device

__all__ = ['Dist', 'setup_distributed', 'distributed', 'seed_everything', 'gather_paths']


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> Tuple[Dist, torch.device]:
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank, local_rank = int(os.environ.get('RANK', '0')), int(os.environ.get('LOCAL_RANK', '0'))
    device = resolve_device(device_name)
    if device.type == 'cuda':
        device = torch.device('cuda', local_rank if world > 1 else device.index or 0)  # one GPU per process
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return Dist(rank, world, local_rank), device


def distributed() -> bool:
    """Whether torch.distributed holds a process group (a run over several processes)."""
    return dist.is_available() and dist.is_initialized()


def seed_everything(*parts: int) -> None:
    """Seed python, numpy and torch from a tuple of counters."""
    s = hash(parts) & 0x7FFFFFFF
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def gather_paths(skips: SkipLog) -> List[str]:
    paths = sorted(skips.paths)
    if distributed():
        gathered: List[Optional[List[str]]] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, paths)
        paths = sorted({p for part in gathered for p in (part or [])})
    return paths
