"""Seeded batch orders and loaders: what makes a run reproducible and a resumed run identical.

The epoch's image order comes from a generator seeded by (seed, step, epoch); the augmentation
RNG (torch's, in the main process or the DataLoader workers) is reseeded from (seed, step,
epoch, rank) at the start of every epoch. A run resumed from an epoch checkpoint therefore
replays exactly the remaining epochs.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import numpy as np
import torch

from ..data import pad_collate, seed_worker
from .config import RunError

__all__ = ["mix_seed", "epoch_batches", "make_loader", "search_split"]


def mix_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (numpy SeedSequence)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def epoch_batches(
    n: int, per_rank: int, seed: int, step: int, epoch: int, rank: int = 0, world_size: int = 1
) -> List[List[int]]:
    """The batches of one rank for one epoch (indices into the step's training subset).

    One permutation of ``range(n)`` per (seed, step, epoch), identical on every rank, padded by
    wrapping to a multiple of ``world_size`` and split ``perm[rank::world_size]`` (as
    ``DistributedSampler``); then cut into batches of ``per_rank``, dropping an incomplete last
    batch unless it is the only one (as MiB/PLOP's ``drop_last``).
    """
    if n < 1:
        return []
    g = torch.Generator().manual_seed(mix_seed(seed, step, epoch, 0x5A3D))
    perm = torch.randperm(n, generator=g).tolist()
    total = math.ceil(n / world_size) * world_size
    perm = (perm * math.ceil(total / n))[:total]
    mine = perm[rank::world_size]
    batches = [mine[i : i + per_rank] for i in range(0, len(mine), per_rank)]
    if len(batches) > 1 and len(batches[-1]) < per_rank:
        batches.pop()
    return batches


def make_loader(
    subset, batches: List[List[int]], seed: int, workers: int, pin_memory: bool
) -> torch.utils.data.DataLoader:
    """A loader of ``subset`` over the given batches; its workers are seeded from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        subset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=pad_collate,
        worker_init_fn=seed_worker,
        generator=g,
        pin_memory=pin_memory,
    )


def search_split(n: int, seed: int, step: int, fraction: float, world_size: int) -> Tuple[List[int], List[int]]:
    """``(lower, held_out)``: indices into the step's training subset, split once per (seed, step);
    ``fraction`` of the images (at least 2 per rank, for BatchNorm) are held out for the search's
    upper level."""
    g = torch.Generator().manual_seed(mix_seed(seed, step, 0x5EA7C4))
    perm = torch.randperm(n, generator=g).tolist()
    k = max(int(round(fraction * n)), 2 * world_size)
    if n - k < 2 * world_size:
        raise RunError(
            f"step {step} has {n} training images: too few to hold out {k} for the search "
            f"(--search-split {fraction}, {world_size} rank(s))"
        )
    return sorted(perm[k:]), sorted(perm[:k])
