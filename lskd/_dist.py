"""One collective shared by the learnable weightings (lskd.weighting, lskd.search)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist


def average_over_ranks_(tensors: Sequence[torch.Tensor], group: Optional[object] = None) -> bool:
    """Average ``tensors`` over the ranks of ``group`` in place, with ONE all_reduce of their
    concatenation (moved to the GPU for NCCL when they live on the CPU). Returns False, changing
    nothing, without an initialised process group of more than one rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    world = dist.get_world_size(group)
    if world <= 1 or not tensors:
        return False
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if dist.get_backend(group) == "nccl" and not flat.is_cuda:
        flat = flat.cuda()
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat.div_(world)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n
    return True
