"""Batch statistics synchronised over the ranks of a process group, on any device.

``torch.nn.SyncBatchNorm`` only runs on GPUs (NCCL). :class:`DistBatchNorm2d` computes the
same thing with plain tensor ops and a differentiable all-reduce, so that a K-rank CPU (gloo)
run normalises with the statistics of the whole global batch, as one process with that batch
does, up to floating-point order. The
trainer uses it under DDP on the CPU and torch's SyncBatchNorm on GPUs
(:func:`convert_sync_batchnorm`).

Per channel, over the global batch (count = sum over ranks of N*H*W):
``mean = all_reduce(sum x) / count``, ``var = all_reduce(sum (x - mean)^2) / count`` (two passes,
as one process's BatchNorm: no E[x^2] - mean^2 cancellation), ``y = (x - mean) / sqrt(var +
eps) * weight + bias``; the running statistics take ``mean`` and the unbiased
``var * count / (count - 1)`` with BatchNorm's momentum rule. The all-reduces are
differentiable (their backward all-reduces the gradients), so the gradient of the sum of the
ranks' losses is exact. Low-precision inputs are normalised in float32. Outside training, or
without an initialised process group of more than one rank, it is ``nn.BatchNorm2d``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistBatchNorm2d", "convert_sync_batchnorm"]


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks; the backward sums the incoming gradients over the ranks (the gradient
    of the sum of every rank's loss)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone()
        dist.all_reduce(out)
        return out


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(t)


class DistBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics are those of the global batch over all ranks.

    Input ``[N, C, H, W]`` (N may differ between ranks, and be 0 on some); output the same shape
    and dtype. Same parameters, buffers and state-dict keys as ``nn.BatchNorm2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        count = torch.full((1,), x.numel() // max(c, 1), dtype=xf.dtype, device=x.device)
        packed = _all_reduce(torch.cat([xf.sum(dim=(0, 2, 3)), count]))
        total = packed[c]
        if float(total.detach()) < 2:
            raise ValueError(
                f"DistBatchNorm2d: expected more than 1 value per channel over all ranks, got {int(total)}"
            )
        mean = packed[:c] / total
        centred = xf - mean[None, :, None, None]
        var = _all_reduce((centred * centred).sum(dim=(0, 2, 3))) / total
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                unbiased = var.detach() * (total / (total - 1))
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Synchronise every ``BatchNorm2d`` of ``model`` over the ranks (for DDP); returns the model.

    CUDA models get ``torch.nn.SyncBatchNorm`` (NCCL kernels); others :class:`DistBatchNorm2d`.
    Converted in place (the root is returned), reusing the parameter and buffer tensors, so an
    optimizer built on the model's parameters stays valid.
    """
    param = next(model.parameters(), None)
    if param is not None and param.is_cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if isinstance(model, nn.BatchNorm2d) and not isinstance(model, DistBatchNorm2d):
        return _to_dist(model)
    for name, child in model.named_children():
        model.add_module(name, convert_sync_batchnorm(child))
    return model


def _to_dist(bn: nn.BatchNorm2d) -> DistBatchNorm2d:
    out = DistBatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if bn.affine:
        out.weight, out.bias = bn.weight, bn.bias
    if bn.track_running_stats:
        out.running_mean, out.running_var, out.num_batches_tracked = (
            bn.running_mean,
            bn.running_var,
            bn.num_batches_tracked,
        )
    out.train(bn.training)
    return out
