"""Single-process and torch.distributed (DDP) set-up.

``torchrun --nproc_per_node=K -m lskd train ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` then starts the default process
group with NCCL when CUDA is used and gloo on the CPU, and pins each rank to ``cuda:LOCAL_RANK``.
Tests (and other launchers) can pass ``rank``, ``world_size`` and an ``init_method`` such as
``file:///tmp/x`` instead.

Conventions of the trainer under DDP:

* the global batch (``--batch-size``) is split evenly over the ranks (it must be divisible);
* each rank reads its shard of a per-epoch permutation drawn from a generator seeded by
  (seed, step, epoch) -- the same permutation on every rank, like ``DistributedSampler``;
* BatchNorm is synchronised over the ranks: torch's SyncBatchNorm on GPUs, and on the CPU
  (gloo, where SyncBatchNorm does not run) :class:`lskd.models.DistBatchNorm2d`, so that every
  rank normalises with the statistics of the global batch, as one process with that batch does
  (up to floating-point order; the ranks' augmentation draws differ from one process's);
* only rank 0 writes files and prints; the confusion matrices are summed over the ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["DistContext", "init_distributed", "cleanup_distributed", "select_device", "barrier", "broadcast_object"]


@dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, its ``device``, ``local_rank``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0


def select_device(device: Optional[str], local_rank: int = 0) -> torch.device:
    """``"auto"``/None -> ``cuda:LOCAL_RANK`` when CUDA is available, else CPU; ``"cuda"`` gets the
    local rank's index; anything else is passed to ``torch.device``."""
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(dev)
    return dev


def init_distributed(
    device: Optional[str] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    init_method: Optional[str] = None,
    backend: Optional[str] = None,
    timeout_s: float = 1800.0,
) -> DistContext:
    """Start the default process group if this process is one of several, else a 1-rank context.

    Args:
        device: ``"auto" | "cpu" | "cuda" | "cuda:N"``.
        rank, world_size: explicit values (default: the ``RANK`` / ``WORLD_SIZE`` variables).
        init_method: e.g. ``"file:///tmp/pg"`` (default ``"env://"`` when the variables are set).
        backend: ``"nccl"`` / ``"gloo"`` (default: NCCL for CUDA devices, gloo for the CPU).
    """
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    world = int(world_size) if world_size is not None else env_world
    rk = int(rank) if rank is not None else int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rk if world_size is not None else 0)))
    dev = select_device(device, local)
    if world <= 1:
        return DistContext(0, 1, 0, dev, False)
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local, dev, False)
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    kwargs = dict(backend=backend, rank=rk, world_size=world, timeout=timedelta(seconds=timeout_s))
    if init_method is not None:
        kwargs["init_method"] = init_method
    if dev.type == "cuda" and backend == "nccl":
        kwargs["device_id"] = dev
    dist.init_process_group(**kwargs)
    return DistContext(rk, world, local, dev, True)


def cleanup_distributed(ctx: DistContext) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if ctx.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """``dist.barrier()`` when distributed (no-op otherwise)."""
    if ctx.distributed and dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def broadcast_object(ctx: DistContext, obj):
    """Rank 0's ``obj`` on every rank (e.g. an error message or a decision)."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
