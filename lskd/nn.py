"""Module versions of the distillation operators, for use in training code."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .ops import md_masks, pod_distill, sop_distill

__all__ = ["PODDistillLoss", "SOPDistillLoss", "MDMasks"]


class PODDistillLoss(nn.Module):
    """Local POD distance (MD when masks are given); see :func:`lskd.ops.pod_distill`.

    ``forward(student [N, C, H, W], teacher, spatial_mask=None [N, 1, H, W], channel_mask=None [N, C])``.
    """

    def __init__(
        self,
        scales: Sequence[int] = (1, 2, 4),
        square: bool = True,
        reduction: str = "mean",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.scales = tuple(scales)
        self.square = square
        self.reduction = reduction
        self.backend = backend

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        spatial_mask: Optional[torch.Tensor] = None,
        channel_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return pod_distill(
            student, teacher, spatial_mask, channel_mask, self.scales, self.square, self.reduction, self.backend
        )

    def extra_repr(self) -> str:
        return f"scales={self.scales}, square={self.square}, reduction={self.reduction!r}, backend={self.backend!r}"


class SOPDistillLoss(nn.Module):
    """Second-order context pooling distance (MCD); see :func:`lskd.ops.sop_distill`."""

    def __init__(
        self,
        groups: int = 20,
        window: Optional[int] = 5,
        stride: int = 2,
        reduction: str = "mean",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.groups = groups
        self.window = window
        self.stride = stride
        self.reduction = reduction
        self.backend = backend

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        spatial_mask: Optional[torch.Tensor] = None,
        channel_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return sop_distill(
            student,
            teacher,
            spatial_mask,
            channel_mask,
            self.groups,
            self.window,
            self.stride,
            self.reduction,
            self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"groups={self.groups}, window={self.window}, stride={self.stride}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}"
        )


class MDMasks(nn.Module):
    """MD masks from three teacher feature sets; see :func:`lskd.ops.md_masks`.

    ``forward(feat, feat_bg_erased, feat_new_erased, labels [N, Hl, Wl], old_classes)``
    returns ``(spatial_mask [N, 1, H, W] bool, channel_mask [N, C] bool)``.
    """

    def __init__(self, ignore_index: int = 255, eps: float = 1e-8, backend: str = "auto") -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.eps = eps
        self.backend = backend

    def forward(
        self,
        feat: torch.Tensor,
        feat_bg_erased: torch.Tensor,
        feat_new_erased: torch.Tensor,
        labels: torch.Tensor,
        old_classes: int,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        return md_masks(
            feat, feat_bg_erased, feat_new_erased, labels, old_classes, self.ignore_index, self.eps, self.backend
        )
